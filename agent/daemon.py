"""The agent process: load the credential, schedule renewal, rotate, hot-reload the listener.

Scheduling is level-triggered: a periodic check asks "is the certificate on disk due?", and a
one-shot job wakes up at the due time. APScheduler's default misfire grace of 1 s silently skips
a job after a pause, so every job has ``misfire_grace_time=None`` and ``coalesce=True``
(../shared/DESIGN.md, "Renewal").
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
import signal
import ssl
from typing import Callable

from pkictl.clock import Clock, SystemClock
from pkictl.errors import PKIError
from pkictl.files import atomic_write
from pkictl.renewal import draw_jitter, renewal_time
from pkictl.store import Credential, CredentialStore

from .config import AgentConfig
from .errors import AgentError
from .listener import GatewayListener
from .metrics import AgentCounters, StatusServer
from .est_client import ESTClient, self_signed
from .rotation import LocalCA, RenewalSource, rotate
from .tls import ServerTLS, server_context
from .watch import credential_stamp, watch_files

__all__ = ["Agent", "backoff_delay"]

log = logging.getLogger("pki_agent")


def backoff_delay(failures: int, *, initial: float, maximum: float, rng: random.Random) -> float:
    """Seconds to wait after ``failures`` consecutive failed renewals (>= 1): exponential with
    full jitter in [initial, ...], capped at ``maximum``."""
    ceiling = min(maximum, initial * 2 ** (failures - 1))
    return rng.uniform(min(initial, ceiling), ceiling)


class Agent:
    """One host's rotation agent.

    Args:
        config: the validated configuration.
        clock: time source for every renewal decision.
        rng: randomness for jitter and backoff (seed it to reproduce a run).
        source: where successors come from; default the local CA of ``config.renewal.ca_home``.
    """

    def __init__(self, config: AgentConfig, *, clock: Clock | None = None, rng: random.Random | None = None, source: RenewalSource | None = None) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.rng = rng or random.Random()
        self.store = CredentialStore(config.credential_dir)
        if source is None and config.renewal.ca_home is not None:
            source = LocalCA(config.renewal.ca_home, self.clock, config.renewal.ca_passphrase_file)
        elif source is None and config.renewal.ca_url is not None:
            source = ESTClient(config.renewal.ca_url, anchors_path=self.store.trust_anchors_path, store=self.store)
        self.source = source
        self.credential: Credential | None = None
        self.listener: GatewayListener | None = None
        self._tls: ServerTLS | None = None
        self._loaded_stamp: tuple | None = None
        self._jitter = 0.0
        self._failures = 0
        self._next_attempt: dt.datetime | None = None
        self._renew_lock = asyncio.Lock()
        self._next_refresh = self.clock.now()
        self._stopped: asyncio.Event | None = None
        self._scheduler = None
        self.counters = AgentCounters()
        self.status_server: StatusServer | None = None

    # -- credential and context ---------------------------------------------------------------

    def current_tls(self) -> ServerTLS:
        """What new connections get (swapped whole on reload, never mutated)."""
        assert self._tls is not None, "reload() first"
        return self._tls

    def _disk_stamp(self) -> tuple:
        """What :meth:`reload` read from; a difference means something on disk changed since."""
        return credential_stamp(self.store, self.config.listener.crl if self.config.listener else None)

    def watched_paths(self) -> list:
        """The files whose change means "reload": the live link, the trust anchors, the CRL."""
        crl = self.config.listener.crl if self.config.listener else None
        return [self.store.live, self.store.trust_anchors_path, *([crl] if crl else [])]

    def reload_if_changed(self) -> None:
        """Reload if what is on disk differs from what was loaded (the file watcher's callback)."""
        if self._loaded_stamp is not None and self._disk_stamp() != self._loaded_stamp:
            log.info("credential, trust anchors or CRL changed on disk: reloading")
            self.reload()

    def reload(self) -> bool:
        """Rebuild everything from the credential on disk; on any error keep the old state.

        Returns:
            True if the new credential is in service, False if the old one was kept.

        Raises:
            AgentError: on the first load only (there is nothing old to keep).
        """
        stamp = self._disk_stamp()
        try:
            if self.config.listener is not None:
                tls = server_context(self.store, self.config.listener.crl)
                credential = tls.credential
            else:
                credential, tls = self.store.load(), None
        except (PKIError, ssl.SSLError, OSError) as exc:
            if self.credential is None:
                raise AgentError(f"cannot load the credential in {self.store.directory}: {exc}") from None
            log.error("reload failed, still serving serial %x: %s", self.credential.certificate.serial_number, exc)
            self.counters.reload_failures += 1
            return False
        self.counters.reloads += 1
        changed = self.credential is None or credential.certificate.serial_number != self.credential.certificate.serial_number
        self.credential, self._tls, self._loaded_stamp = credential, tls, stamp
        if tls is not None and tls.crl_next_update is not None:
            log.info("CRL loaded: %d revoked, next update %s", len(tls.revoked), tls.crl_next_update.isoformat())
        if tls is not None and tls.revoked and self.listener is not None:
            self.listener.close_revoked(tls.revoked)  # revocation reaches established connections too
        if changed:
            self._jitter = draw_jitter(self.rng, self.config.renewal.jitter) if self.config.renewal.jitter else 0.0
            self._failures = 0
            self._next_attempt = self.renewal_due()
            log.info(
                "credential %s serial %x, not after %s, renewal due %s",
                self.config.name, credential.certificate.serial_number,
                credential.certificate.not_valid_after_utc.isoformat(), self._next_attempt.isoformat(),
            )
        self._schedule_wakeup()
        return True

    @property
    def next_attempt(self) -> dt.datetime | None:
        """When the next renewal attempt is due: the renewal time, or a retry after a failure."""
        return self._next_attempt

    def renewal_due(self) -> dt.datetime:
        """When the current certificate is due: notBefore + (fraction - jitter) x lifetime."""
        assert self.credential is not None
        cert = self.credential.certificate
        return renewal_time(cert.not_valid_before_utc, cert.not_valid_after_utc, fraction=self.config.renewal.fraction, jitter=self._jitter)

    # -- renewal --------------------------------------------------------------------------------

    async def check(self) -> None:
        """The periodic check: keep the CRL fresh on the CA host, reload when the files on disk
        changed, and renew if the credential (or a retry) is due."""
        await self.maintain()
        if self._next_attempt is None or self.clock.now() < self._next_attempt or self._renew_lock.locked():
            return
        async with self._renew_lock:
            await self.renew()

    def _refresh_from_est(self) -> None:
        """Fetch the CRL (for the listener) and the trust bundle from the EST server; a failure
        keeps what is on disk and is retried at the next refresh."""
        self._next_refresh = self.clock.now() + self.config.renewal.refresh_interval
        source = self.source
        assert isinstance(source, ESTClient)
        try:
            crl = self.config.listener.crl if self.config.listener else None
            if crl is not None:
                data = source.crl_pem()
                if not crl.exists() or crl.read_bytes() != data:
                    atomic_write(crl, data)
                    log.info("CRL refreshed from %s", source.base_url)
            roots = [c for c in source.cacerts() if self_signed(c)]
            anchors = self.store.load_trust_anchors()
            # Continuity: a bundle fetched over a channel authenticated by the current anchor is
            # taken only if it still holds that anchor (a root rotation adds the new root first).
            if any(a in roots for a in anchors) and set(roots) != set(anchors):
                self.store.write_trust_anchors(roots)
                log.info("trust bundle updated from %s: %d root(s)", source.base_url, len(roots))
        except (PKIError, OSError) as exc:
            log.warning("refresh from %s failed (%s); keeping the CRL and trust bundle on disk", source.base_url, exc)

    async def maintain(self) -> None:
        """Re-sign the CA's CRL when due (CA host only) and reload if ``live`` or the CRL file changed.

        The CRL is re-signed by the long-running process on the CA host because an expired CRL
        locks every client out (DESIGN.md, "mTLS server checks").
        """
        if isinstance(self.source, LocalCA):
            try:
                if await asyncio.to_thread(self.source.refresh_crl):
                    log.info("CRL of the CA in %s re-signed", self.source.home)
            except Exception as exc:  # noqa: BLE001 - keep serving; status shows the CRL's age
                log.error("re-signing the CRL failed: %s", exc, exc_info=not isinstance(exc, PKIError))
        if isinstance(self.source, ESTClient) and self.clock.now() >= self._next_refresh:
            await asyncio.to_thread(self._refresh_from_est)
        self.reload_if_changed()

    async def renew(self) -> bool:
        """Rotate now: renew, install, reload. On failure keep serving and back off.

        Returns:
            True if a successor was installed and taken into service.
        """
        assert self.credential is not None
        current = self.credential
        if self.source is None:
            log.error(
                "renewal of %s is due but no renewal source is configured (renewal.ca_url or renewal.ca_home); "
                "the certificate expires at %s", self.config.name, current.certificate.not_valid_after_utc.isoformat(),
            )
            self._retry_later()
            return False
        try:
            successor = await asyncio.to_thread(rotate, self.store, current, self.source, self.clock)
        except Exception as exc:  # noqa: BLE001 - whatever failed, keep serving and retry
            self.counters.renewal_failures += 1
            self._retry_later()
            left = current.certificate.not_valid_after_utc - self.clock.now()
            log.error("renewal of %s failed (%s); still serving serial %x, %s left; next attempt %s",
                      self.config.name, exc, current.certificate.serial_number, left, self._next_attempt.isoformat(),
                      exc_info=not isinstance(exc, (PKIError, OSError)))  # a traceback only for the unexpected
            return False
        log.info("renewed %s: serial %x -> %x, not after %s", self.config.name, current.certificate.serial_number,
                 successor.certificate.serial_number, successor.certificate.not_valid_after_utc.isoformat())
        self.counters.renewals += 1
        return self.reload()

    def _retry_later(self) -> None:
        self._failures += 1
        cfg = self.config.renewal
        delay = backoff_delay(self._failures, initial=cfg.retry_initial.total_seconds(), maximum=cfg.retry_max.total_seconds(), rng=self.rng)
        self._next_attempt = self.clock.now() + dt.timedelta(seconds=delay)
        self._schedule_wakeup()

    def _schedule_wakeup(self) -> None:
        if self._scheduler is None or self._next_attempt is None:
            return
        # The scheduler runs on the wall clock; check() decides on self.clock, so an early or
        # late wake-up is harmless and the periodic check catches anything missed.
        delay = max(0.0, (self._next_attempt - self.clock.now()).total_seconds())
        run_date = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=delay)
        self._scheduler.add_job(self.check, "date", run_date=run_date, id="renewal", replace_existing=True,
                                misfire_grace_time=None, coalesce=True)

    # -- process ------------------------------------------------------------------------------

    async def run(self, *, handle_signals: bool = True, ready: Callable[[], None] | None = None) -> None:
        """Serve until SIGTERM/SIGINT or :meth:`stop`; SIGHUP reloads the credential from disk.

        Args:
            handle_signals: install the signal handlers (only possible in the main thread).
            ready: called once the listener is bound and the scheduler runs.

        Raises:
            AgentError: the credential cannot be loaded, or the listener cannot bind.
        """
        from apscheduler.schedulers.asyncio import AsyncIOScheduler

        loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self.reload()
        if self.source is None:
            log.warning("no renewal source configured (renewal.ca_url or renewal.ca_home): %s will not be renewed", self.config.name)
        if self.config.listener is not None:
            self.listener = GatewayListener(self.config.listener, self.current_tls, self.config.trust_domain)
            try:
                await self.listener.start()
            except OSError as exc:
                raise AgentError(f"listener: cannot listen on {self.config.listener.listen[0]}:{self.config.listener.listen[1]}: {exc}") from None
        if self.config.metrics is not None:
            self.status_server = StatusServer(self, self.config.metrics.listen)
            try:
                await self.status_server.start()
            except OSError as exc:
                raise AgentError(f"metrics: cannot listen on {self.config.metrics.listen[0]}:{self.config.metrics.listen[1]}: {exc}") from None
            log.info("metrics and health on %s", ", ".join(f"http://{h}:{p}/metrics" for h, p in self.status_server.addresses))
        self._scheduler = AsyncIOScheduler(event_loop=loop, timezone=dt.timezone.utc)
        self._scheduler.add_job(self.check, "interval", seconds=self.config.renewal.check_interval.total_seconds(),
                                id="check", misfire_grace_time=None, coalesce=True, max_instances=1)
        self._scheduler.start()
        self._schedule_wakeup()
        watcher = loop.create_task(watch_files(self.watched_paths(), self.reload_if_changed, self._stopped)) if self.config.watch else None
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stopped.set)
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        where = ", ".join(f"{h}:{p}" for h, p in self.listener.addresses) if self.listener else "no listener"
        log.info("ready: %s %s, %s", self.config.kind, self.config.name,
                 f"listening on {where}" if self.listener else where)
        if ready is not None:
            ready()
        try:
            await self._stopped.wait()
        finally:
            log.info("stopping")
            self._scheduler.shutdown(wait=False)
            if watcher is not None:
                self._stopped.set()
                await asyncio.wait({watcher}, timeout=5)
            if self.listener is not None:
                await self.listener.close()
            if self.status_server is not None:
                await self.status_server.close()

    def _on_sighup(self) -> None:
        log.info("SIGHUP: reloading the credential from disk")
        self.reload()

    def stop(self) -> None:
        """Ask :meth:`run` to return; call it on the agent's event loop."""
        if self._stopped is not None:
            self._stopped.set()
