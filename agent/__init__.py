"""pki-agent: the rotation daemon (renew at 2/3 of the lifetime, install atomically, hot reload)
and the gateway's mTLS listener that it hosts."""

__all__: list[str] = []
