"""What an agent that renews over EST fetches between renewals: the CRL for a gateway's listener
(every ``crl_refresh_interval``, conditional), the trust bundle (every ``refresh_interval``), and
a lookup of its own certificate in the CA's CRLs (with the trust bundle, and at once when the
gateway refuses this node), so that a revoked host learns it without waiting for its renewal.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from pathlib import Path
from typing import Protocol

from pkictl.clock import Clock
from pkictl.errors import PKIError
from pkictl.revocation import crls_from_pem
from pkictl.store import Credential, CredentialStore

from ..config import AgentConfig
from ..errors import CredentialUnusable
from ..est_client import ESTClient, refresh_crl, refresh_trust_bundle
from .reenroll import find_revocation

__all__ = ["ESTUpkeep", "UpkeepHost", "REFUSAL_CHECK_INTERVAL"]

log = logging.getLogger("pki_agent")

REFUSAL_CHECK_INTERVAL = 5.0  # seconds: at most one revocation check per this, however often the gateway refuses


class UpkeepHost(Protocol):
    """What the upkeep reads of its agent (:class:`pki_agent.daemon.Agent`) and tells it."""

    config: AgentConfig
    clock: Clock
    store: CredentialStore
    credential: Credential | None

    @property
    def unusable(self) -> CredentialUnusable | None: ...

    def reload_if_changed(self) -> None: ...

    def _credential_revoked(self, detail: str) -> None: ...


class ESTUpkeep:
    """The EST fetches of ``agent``, whose renewal source is ``client``.

    Args:
        agent: the agent (its config, clock, store and credential; it is told of a revocation
            through ``_credential_revoked`` and of a new CRL through ``reload_if_changed``).
        client: the agent's EST client.
    """

    def __init__(self, agent: UpkeepHost, client: ESTClient) -> None:
        self.agent, self.client = agent, client
        listener = agent.config.listener
        self.listener_crl: Path | None = listener.crl if listener is not None else None
        self._next_refresh: dt.datetime | None = None  # the first check refreshes at once
        self._crl_etag: str | None = None
        self._crl_failing = False
        self._refusal_check: asyncio.Task | None = None
        self._refusal_checked = float("-inf")  # loop time of the last check a refusal started

    async def maintain(self) -> None:
        """From the agent's periodic check: the trust bundle and, without a listener CRL (whose
        reload does it), the revocation lookup, once ``refresh_interval`` has passed."""
        now = self.agent.clock.now()
        if self._next_refresh is not None and now < self._next_refresh:
            return
        first = self._next_refresh is None
        self._next_refresh = now + self.agent.config.renewal.refresh_interval
        await asyncio.to_thread(self._refresh_trust_bundle)
        if self.listener_crl is None:
            await self.check_own_revocation(report=first)

    def _refresh_trust_bundle(self) -> None:
        """A failure keeps ``ca.pem``; it is tried again at the next refresh."""
        store = self.agent.store
        try:
            for change in refresh_trust_bundle(self.client, store):
                log.info("%s from %s", change, self.client.base_url)
        except (PKIError, OSError) as exc:
            log.warning("refresh of the trust bundle from %s failed (%s); keeping %s", self.client.base_url, exc, store.trust_anchors_path)

    async def refresh_crl(self) -> None:
        """Fetch the CA's CRLs into the listener's CRL file (a conditional request) and reload
        when they changed: how a revocation reaches a listener that renews over EST, within
        ``crl_refresh_interval`` of ``pkictl revoke``. A failure keeps the CRL on disk; it is
        logged once, and once more when the fetch works again."""
        assert self.listener_crl is not None
        try:
            changed, self._crl_etag = await asyncio.to_thread(refresh_crl, self.client, self.listener_crl, self._crl_etag)
        except (PKIError, OSError) as exc:
            if not self._crl_failing:
                log.warning("CRL refresh from %s failed (%s); the listener keeps %s and tries again every %s", self.client.base_url,
                            exc, self.listener_crl, self.agent.config.renewal.crl_refresh_interval)
            self._crl_failing = True
            return
        if self._crl_failing:
            log.info("CRL refresh from %s works again", self.client.base_url)
            self._crl_failing = False
        if changed:
            log.info("CRL refreshed from %s", self.client.base_url)
            self.agent.reload_if_changed()

    async def check_own_revocation(self, *, report: bool = False) -> None:
        """Look the agent's certificate up in the CA's CRLs: a revoked one is reported to the
        agent (which says so and, on a node with ``reenroll: approval``, re-pairs at once).

        Args:
            report: also log a line when it is not revoked (the check at start).
        """
        credential = self.agent.credential
        if credential is None or self.agent.unusable is not None:
            return
        client = self.client

        def fetch() -> str | None:
            data, _ = client.crl_pem()
            return find_revocation(credential.certificate, crls_from_pem(data or b"", source=f"{client.base_url}/crl.pem"))

        try:
            found = await asyncio.to_thread(fetch)
        except (PKIError, OSError) as exc:
            log.warning("cannot check serial %x against the CRL of %s: %s", credential.certificate.serial_number, client.base_url, exc)
            return
        if found is not None and self.agent.credential is credential:
            self.agent._credential_revoked(found)
        elif report:
            log.info("serial %x is not on the CRL of %s", credential.certificate.serial_number, client.base_url)

    def note_gateway_refusal(self, reason: str) -> None:
        """The gateway refused this node's certificate (the tunnel's callback, on the loop):
        check at once whether it was revoked, at most every :data:`REFUSAL_CHECK_INTERVAL`."""
        if self.agent.unusable is not None:
            return
        now = asyncio.get_running_loop().time()
        busy = self._refusal_check is not None and not self._refusal_check.done()
        if busy or now - self._refusal_checked < REFUSAL_CHECK_INTERVAL:
            return
        self._refusal_checked = now
        self._refusal_check = asyncio.ensure_future(self.check_own_revocation())
