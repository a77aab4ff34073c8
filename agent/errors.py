"""The exception tree of the agent package: one root, one subclass per kind of failure."""

from pkictl.errors import PKIError

__all__ = ["AgentError", "ConfigError", "RenewalError", "CredentialUnusable", "PeerRejected", "ServiceBusy"]


class AgentError(PKIError):
    """Root of every error pki-agent raises on purpose; the message is meant for the operator."""


class ConfigError(AgentError):
    """The agent configuration file is missing, malformed or contradictory."""


class RenewalError(AgentError):
    """A renewal failed; the current credential stays installed and in service."""


class ServiceBusy(RenewalError):
    """The EST server kept answering 503 (it sheds load, RFC 7030 4.2.3) after the client's
    bounded retries; the current credential stays in service and the renewal is tried again later.

    Attributes:
        retry_after: the server's last Retry-After, seconds (None if it gave none).
    """

    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class CredentialUnusable(RenewalError):
    """This host's certificate can no longer renew itself: retrying changes nothing.

    Attributes:
        reason: ``revoked``, ``expired``, ``not yet valid``, ``another CA``, ``unknown`` (to the
            CA's inventory) or ``refused`` (the EST server refused it at the TLS layer and said
            no more).
        detail: what the CA or the TLS alert said.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class PeerRejected(AgentError):
    """A TLS peer completed the handshake but fails the gateway's authorization rules.

    Attributes:
        reason: a short, stable reason for logs and metrics (e.g. ``wrong purpose``).
        detail: what exactly was wrong, for the operator.
        node: the identity the certificate claims (node name, else its CN), when known.
        serial: the serial number of the certificate, when known.
    """

    def __init__(self, reason: str, detail: str, *, node: str | None = None, serial: int | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.node = node
        self.serial = serial
