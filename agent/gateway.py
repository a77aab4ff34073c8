"""For a gateway that is itself a Python asyncio server: the current mTLS context and the listener's authorization, without the forwarder.

Example, with ``asyncio.start_server``::

    from pki_agent.gateway import GatewayTLS
    from pki_agent.errors import PeerRejected

    tls = GatewayTLS("/var/lib/pki-agent/gw", allow=["tw"], crl="/var/lib/pki-agent/gw/crl.pem")

    async def handle(reader, writer):
        try:
            node = tls.authorize(writer.get_extra_info("ssl_object"))
        except PeerRejected as exc:
            log.warning("refused %s: %s", writer.get_extra_info("peername"), exc)
            writer.close()
            return
        ...  # node.name is the authenticated node, lower case

    server = await asyncio.start_server(handle, "0.0.0.0", 18789, ssl=tls.server_context,
                                        ssl_handshake_timeout=10)
    async with server, asyncio.TaskGroup() as tasks:
        tasks.create_task(tls.watch())  # reload when pki-agent installs a renewal or a new CRL
        await server.serve_forever()

``server_context`` is one fixed SSLContext whose SNI callback (called on every handshake, with
or without SNI) switches the connection to the current context: a reload reaches new
connections while established ones keep theirs (docs/design.md, "Hot reload").
``asyncio.start_server(ssl=...)`` drops failed handshakes without a word; to log each, accept
plain TCP and hand each socket to ``loop.connect_accepted_socket(..., ssl=tls.context)``, or run
TLS in a MemoryBIO over a plain transport as pki-agent's own listener does (agent/listener/server.py).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path
from typing import Iterable

from pkictl.errors import PKIError
from pkictl.store import CredentialStore

from .listener.authz import Authorizer, PeerIdentity, allowed_names
from .errors import AgentError, ConfigError
from .listener.tls import ServerTLS, server_context
from .rotation.watch import credential_stamp, watch_files

__all__ = ["GatewayTLS"]

log = logging.getLogger("pki_agent.gateway")


class GatewayTLS:
    """The gateway's current server context from a credential directory, and its authorization rules.

    Args:
        credential_dir: the gateway's bundle (``live -> archive/N``, ``ca.pem``), as written by
            ``pkictl enroll-gateway`` and kept up to date by ``pki-agent``.
        allow: node names let through (compared without case), or ``["*"]`` for every node
            certificate of the CA. Required, as ``listener.allow`` is.
        trust_domain: the SPIFFE trust domain of node identities.
        crl: PEM file of the CA's CRL(s); when given, revoked nodes are refused (OpenSSL during
            the handshake, :meth:`authorize` after it, also for a resumed session).

    Raises:
        ConfigError: ``allow`` is empty, mixes ``*`` with names, or holds an invalid name.
        AgentError: the credential or CRL cannot be loaded.
    """

    def __init__(self, credential_dir: str | Path, *, allow: Iterable[str], trust_domain: str = "pkictl.internal",
                 crl: str | Path | None = None) -> None:
        try:
            names = allowed_names(allow if isinstance(allow, str) else list(allow))
        except ValueError as exc:
            raise ConfigError(f"allow: {exc}") from None
        self.store = CredentialStore(Path(credential_dir))
        self.crl = Path(crl) if crl is not None else None
        self.authorizer = Authorizer(trust_domain, names)
        self._stamp = self._disk_stamp()
        try:
            self._current = server_context(self.store, self.crl)
        except (PKIError, ssl.SSLError, OSError) as exc:
            raise AgentError(f"cannot load the gateway credential in {self.store.directory}: {exc}") from None
        # Built by the same builder as every reloaded context: the SNI swap keeps the base's
        # verify mode, flags, versions and ticket settings (docs/design.md), so they must be strict.
        self._base = server_context(self.store, self.crl).context
        self._base.sni_callback = self._switch

    @property
    def current(self) -> ServerTLS:
        """The context, credential and revoked set new connections get (replaced whole on reload)."""
        return self._current

    @property
    def context(self) -> ssl.SSLContext:
        """The current server SSLContext: take it per connection (``start_tls``,
        ``connect_accepted_socket``); never mutate it."""
        return self._current.context

    @property
    def server_context(self) -> ssl.SSLContext:
        """A fixed SSLContext for ``asyncio.start_server(ssl=...)`` that serves each new
        handshake with :attr:`context` as it is at that moment."""
        return self._base

    def _switch(self, ssl_object: ssl.SSLObject, server_name: str | None, base: ssl.SSLContext) -> None:
        ssl_object.context = self._current.context

    def authorize(self, ssl_object: ssl.SSLObject | ssl.SSLSocket) -> PeerIdentity:
        """Authorize the peer of a completed handshake as pki-agent's listener does: not revoked
        on the current CRL, not a CA certificate (RFC 5280 4.2.1.9), clientAuth EKU (RFC 5280
        4.2.1.12), exactly one node identity, in ``allow``.

        Args:
            ssl_object: ``writer.get_extra_info("ssl_object")`` or an ``ssl.SSLSocket``.

        Returns:
            The authenticated node.

        Raises:
            PeerRejected: ``reason`` and ``detail`` say which rule failed (``node`` and
                ``serial`` are set when the certificate got that far).
        """
        return self.authorizer.check(ssl_object, self._current.revoked)

    def _disk_stamp(self) -> tuple:
        return credential_stamp(self.store, self.crl)

    def reload(self) -> bool:
        """Build a fresh context from the files; on any error keep the current one.

        Returns:
            True if the new context is in service, False if the old one was kept (logged).
        """
        stamp = self._disk_stamp()
        try:
            fresh = server_context(self.store, self.crl)
        except (PKIError, ssl.SSLError, OSError) as exc:
            log.error("reload of %s failed, still serving serial %x: %s", self.store.directory,
                      self._current.credential.certificate.serial_number, exc)
            return False
        self._current, self._stamp = fresh, stamp
        log.info("serving serial %x from %s (%d revoked)", fresh.credential.certificate.serial_number,
                 self.store.directory, len(fresh.revoked))
        return True

    def reload_if_changed(self) -> bool:
        """Reload if the live link, trust anchors or CRL differ from what was loaded.

        Returns:
            True if a new context went into service.
        """
        return self._disk_stamp() != self._stamp and self.reload()

    async def watch(self, stop: asyncio.Event | None = None) -> None:
        """Reload on every change of the files on disk until ``stop`` is set (or the task is
        cancelled); run it as a task beside the server."""
        paths = [self.store.live, self.store.trust_anchors_path, *([self.crl] if self.crl else [])]
        stop = stop or asyncio.Event()
        try:
            await watch_files(paths, self.reload_if_changed, stop)
        finally:
            stop.set()  # on cancellation too: ends the watcher's thread
