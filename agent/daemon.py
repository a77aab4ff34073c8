"""The agent process: load the credential, schedule renewal, rotate, hot-reload the listener,
run the post-rotation hooks, and keep the state file that ``pki-agent status`` reads.

Scheduling is level-triggered: a periodic check asks "is the certificate on disk due?", and a
one-shot job wakes up at the due time. APScheduler's default misfire grace of 1 s silently skips
a job after a pause, so every job has ``misfire_grace_time=None`` and ``coalesce=True``
(docs/design.md, "Renewal"). Every decision reads the injected clock, never the scheduler's:
a wake-up that comes early, late (laptop sleep, SIGSTOP) or after a clock jump is harmless.

Signals: SIGTERM/SIGINT stop, SIGHUP reloads from disk, SIGUSR1 renews now (``pki-agent
renew-now``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import random
import signal
import ssl
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from pkictl.clock import Clock, SystemClock
from pkictl.errors import CRLRollbackError, PKIError
from pkictl.formats import VersionLayout
from pkictl.renewal import draw_jitter, renewal_time
from pkictl.revocation import load_crls
from pkictl.store import Credential, CredentialStore
from pkictl.tls import client_context

from .config import AgentConfig
from .errors import AgentError, ConfigError, CredentialUnusable
from .endpoints import close_endpoints, describe_endpoints, start_endpoints
from .metrics import AgentCounters
from .est_client import ESTClient
from .rotation.reenroll import Reenrollment, find_revocation
from .rotation.hooks import HookContext, run_hooks
from .pidfile import PidFile
from .rotation.rotate import LocalCA, RenewalSource, rotate
from .rotation.schedule import backoff_delay, failure_log_level, renewal_floor, retry_delay
from .rotation.startup_checks import log_startup_findings
from .rotation.state import iso, read_state, state_path, write_state
from .listener.tls import ServerTLS, server_context
from .rotation.upkeep import ESTUpkeep
from .rotation.watch import credential_stamp, watch_files

if TYPE_CHECKING:
    from apscheduler.schedulers.asyncio import AsyncIOScheduler

    from .listener.fleet_push import FleetReporter
    from .listener.view import ListenerView
    from .metrics import StatusServer
    from .tunnel import NodeTunnel

__all__ = ["Agent", "backoff_delay"]

log = logging.getLogger("pki_agent")


def _layout(config: AgentConfig) -> VersionLayout:
    try:
        return config.version_layout()
    except ValueError as exc:  # the group was removed since the configuration was loaded
        raise ConfigError(f"credential_group: {exc}") from None


class Agent:
    """One host's rotation agent.

    Args:
        config: the validated configuration.
        clock: time source for every renewal decision.
        rng: randomness for jitter and backoff (seed it to reproduce a run).
        source: where successors come from; default the local CA of ``config.renewal.ca_home``.
        config_path: the configuration file, named in the start-up checks' fixes.
    """

    def __init__(self, config: AgentConfig, *, clock: Clock | None = None, rng: random.Random | None = None, source: RenewalSource | None = None,
                 config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.clock = clock or SystemClock()
        self.rng = rng or random.Random()
        self._stopping = threading.Event()  # set by stop(): cuts short a Retry-After wait in a worker thread
        self.store = CredentialStore(config.credential_dir, keep=config.renewal.keep_versions, layout=_layout(config))
        if source is None and config.renewal.ca_home is not None:
            source = LocalCA(config.renewal.ca_home, self.clock, config.renewal.ca_passphrase_file, self.store)
        elif source is None and config.renewal.ca_url is not None:
            # A Retry-After is waited in the rotation's thread; stop() cuts it short, so that a
            # stopping agent does not wait out a busy CA (the renewal is simply not done then).
            source = ESTClient(config.renewal.ca_url, anchors_path=self.store.trust_anchors_path, store=self.store,
                               sleep=self._stopping.wait, fallbacks=config.renewal.fallback_ca_urls)
        self.source = source
        self.credential: Credential | None = None
        self.listener: "ListenerView | None" = None
        self.tunnel: "NodeTunnel | None" = None
        self._tls: ServerTLS | None = None
        self._client_tls: tuple[ssl.SSLContext, int] | None = None
        self._loaded_stamp: tuple | None = None
        self._refused_stamp: tuple | None = None  # files a reload refused (damaged, an older CRL): said once, not retried
        # What the last refused reload said: a file rewritten in place is seen by the watcher
        # between its truncation and its write, so two stamps can name one damage: said once.
        self._refusal: str | None = None
        self._jitter = 0.0
        self._failures = 0
        self._next_attempt: dt.datetime | None = None
        self._renew_lock = asyncio.Lock()
        self._stopped: asyncio.Event | None = None
        self._scheduler: AsyncIOScheduler | None = None  # made by run()
        self._last_renewal: dt.datetime | None = None
        self._last_attempt: dict | None = None
        self._hook_results: list[dict] = []
        self._hooks_task: asyncio.Task | None = None
        self._started: dt.datetime | None = None
        self._running = False
        self._forced = 0  # renew-now requests handled: renew-now waits for this to grow
        self._forced_tasks: set[asyncio.Task] = set()  # renew-now requests waiting for the renewal lock
        self.state_path = state_path(config.credential_dir)
        self._last_renewal = self._last_renewal_on_disk()
        self.counters = AgentCounters()
        self.status_server: "StatusServer | None" = None
        self.fleet_reporter: "FleetReporter | None" = None
        est_client = source.est_client if source is not None else None
        self.reenrollment = Reenrollment(config, self.store, est_client)
        self.upkeep = ESTUpkeep(self, est_client) if est_client is not None else None

    def _last_renewal_on_disk(self) -> dt.datetime | None:
        """When this credential was last renewed, by an earlier run of the agent (its state file),
        so that the floor between renewals (``min_interval``) holds across restarts too: an
        agent in a crash loop must not renew at every start. A time ahead of the clock (the clock
        was set back) counts as now."""
        try:
            state = read_state(self.state_path) or {}
            last = state.get("last_renewal")
            return min(dt.datetime.fromisoformat(last), self.clock.now()) if isinstance(last, str) else None
        except (AgentError, ValueError, TypeError):
            return None  # an unreadable state file is rewritten; the floor then starts with this run

    # -- credential and context ---------------------------------------------------------------

    def conform_layout(self) -> bool:
        """Install the live credential again, as a new version, when the live version is not as
        the configuration asks (no combined.pem or keystore.p12, keys of another mode or group):
        so a new ``pkcs12`` or ``credential_group`` takes effect at start, not at the next
        renewal. The certificate and key stay the same, so no hook runs. A failure is logged and
        the version on disk kept.

        Returns:
            True if a new version was installed.
        """
        try:
            if not self.store.live.is_symlink() or (problem := self.store.layout_problem()) is None:
                return False
            credential = self.store.load()
            version = self.store.install(credential)
        except (PKIError, OSError) as exc:
            log.error("cannot install the credential in %s again as the configuration asks (combined.pem, pkcs12, "
                      "credential_group): %s; keeping the version on disk", self.store.directory, exc)
            return False
        log.info("installed serial %x again as version %s: %s", credential.certificate.serial_number, version.name, problem)
        return True

    def current_tls(self) -> ServerTLS:
        """What new connections get (swapped whole on reload, never mutated)."""
        assert self._tls is not None, "reload() first"
        return self._tls

    def current_client_tls(self) -> tuple[ssl.SSLContext, int]:
        """What new tunnel connections present: a client context of the current credential and
        its serial (swapped whole on reload, never mutated)."""
        assert self._client_tls is not None, "reload() first, with a tunnel configured"
        return self._client_tls

    def _disk_stamp(self) -> tuple:
        """What :meth:`reload` read from; a difference means something on disk changed since."""
        return credential_stamp(self.store, self.config.listener.crl if self.config.listener else None)

    def watched_paths(self) -> list:
        """The files whose change means "reload": the live link, the trust anchors, the CRL."""
        crl = self.config.listener.crl if self.config.listener else None
        return [self.store.live, self.store.trust_anchors_path, *([crl] if crl else [])]

    def reload_if_changed(self) -> None:
        """Reload if what is on disk differs from what was loaded (the file watcher's callback)."""
        if self._loaded_stamp is not None and self._disk_stamp() not in (self._loaded_stamp, self._refused_stamp):
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
            client_tls = None
            if self.config.listener is not None:
                tls = server_context(self.store, self.config.listener.crl, held=self._tls.crl_numbers if self._tls else None)
                credential = tls.credential
            elif self.config.tunnel is not None:
                context, credential = client_context(self.store)
                client_tls, tls = (context, credential.certificate.serial_number), None
            else:
                credential, tls = self.store.load(), None
        except CRLRollbackError as exc:  # the first load holds no CRL yet, so this is a reload
            assert self.credential is not None
            if stamp != self._refused_stamp and str(exc) != self._refusal:  # said once per state of the files, whoever asks again
                log.error("reload refused, still serving serial %x with its CRL: %s", self.credential.certificate.serial_number, exc)
            self._refused_stamp, self._refusal = stamp, str(exc)
            self.counters.reload_failures += 1
            return False
        except (PKIError, ssl.SSLError, OSError) as exc:
            if self.credential is None:
                raise AgentError(f"cannot load the credential in {self.store.directory}: {exc}") from None
            if stamp != self._refused_stamp and str(exc) != self._refusal:  # the same broken files are said once, not at every check or signal
                log.error("reload failed, still serving serial %x: %s", self.credential.certificate.serial_number, exc)
            self._refused_stamp, self._refusal = stamp, str(exc)
            self.counters.reload_failures += 1
            return False
        self.counters.reloads += 1
        self._refusal = None
        changed = self.credential is None or credential.certificate.serial_number != self.credential.certificate.serial_number
        self.credential, self._tls, self._loaded_stamp = credential, tls, stamp
        self._client_tls = client_tls
        if tls is not None and tls.crl_next_update is not None:
            if tls.crl_next_update <= self.clock.now():
                # OpenSSL refuses every client certificate against a CRL past its nextUpdate.
                log.error("CRL loaded from %s has EXPIRED (next update was %s): every node is refused until a fresh crl.pem "
                          "is installed (pkictl sign-crl on the CA host; with renewal.ca_url the agent fetches it)",
                          self.config.listener.crl if self.config.listener else "?", tls.crl_next_update.isoformat())
            else:
                log.info("CRL loaded: %d revoked, next update %s", len(tls.revoked), tls.crl_next_update.isoformat())
        if tls is not None and self.listener is not None:
            self.listener.reloaded(tls)  # revocations reach established connections, and every worker its new context
        if changed:
            self.reenrollment.unusable = None
            self._jitter = draw_jitter(self.rng, self.config.renewal.jitter) if self.config.renewal.jitter else 0.0
            self._failures = 0
            self._next_attempt = self.renewal_due()
            if self._last_renewal is not None:
                # The floor between two renewals: whatever made this one due so soon (a CA that
                # hands out near-expired certificates, a bug), the agent does not loop against the CA.
                floor = renewal_floor(self.config.renewal.min_interval, credential.certificate)
                self._next_attempt = max(self._next_attempt, self._last_renewal + floor)
            log.info(
                "credential %s serial %x, not after %s, renewal due %s",
                self.config.name, credential.certificate.serial_number,
                credential.certificate.not_valid_after_utc.isoformat(), self._next_attempt.isoformat(),
            )
        if tls is not None and tls.revoked and (credential.certificate.issuer.public_bytes(), credential.certificate.serial_number) in tls.revoked:
            listener = self.config.listener
            assert listener is not None and listener.crl is not None, "revocations come from the listener's CRL"
            self._credential_revoked(find_revocation(credential.certificate, load_crls(listener.crl)) or "on the CRL")
        self._schedule_wakeup()
        self.save_state()
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

    async def _first_check(self) -> None:
        """The check at start (the EST refresh and revocation check, not a period later), and a
        line once it is done: until then a credential changed on disk may still be taken up."""
        await self.check()
        log.info("start-up check done")

    async def check(self) -> None:
        """The periodic check: keep the CRL fresh on the CA host, reload when the files on disk
        changed, and renew if the credential (or a retry) is due."""
        await self.maintain()
        if self._next_attempt is None or self.clock.now() < self._next_attempt or self._renew_lock.locked():
            return
        async with self._renew_lock:
            await self.renew()

    async def maintain(self) -> None:
        """Re-sign the CA's CRL when due (CA host only) and reload if ``live`` or the CRL file changed.

        The CRL is re-signed by the long-running process on the CA host because an expired CRL
        locks every client out (docs/design.md, "mTLS server checks").
        """
        if self.source is not None:
            try:
                if said := await asyncio.to_thread(self.source.maintain):
                    log.info("%s", said)
            except Exception as exc:  # keep serving; status shows the CRL's age
                log.error("re-signing the CRL failed: %s", exc, exc_info=not isinstance(exc, PKIError))
        if self.upkeep is not None:
            await self.upkeep.maintain()
        self.reload_if_changed()

    async def renew(self, *, forced: bool = False) -> bool:
        """Rotate now: renew, install, reload, then start the hooks. On failure keep serving and
        back off.

        Args:
            forced: an operator's ``renew-now`` (logged as such; the schedule is not consulted).

        Returns:
            True if a successor was installed and taken into service.
        """
        assert self.credential is not None
        current = self.credential
        started = self.clock.now()
        if forced:
            self._forced += 1
            log.info("renewal of %s requested (renew-now)", self.config.name)
        if self.reenrollment.pairing is not None:  # the certificate cannot renew: a new one comes by approval
            return await self._poll_pairing(started, forced)
        if self.source is None:  # _failed logs it, with the time left
            self._failed(started, current, "no renewal source is configured (renewal.ca_url or renewal.ca_home)", forced)
            return False
        try:
            if started > current.certificate.not_valid_after_utc:
                raise CredentialUnusable("expired", f"serial {current.certificate.serial_number:x} expired at "
                                                    f"{current.certificate.not_valid_after_utc.isoformat()}")
            successor = await asyncio.to_thread(rotate, self.store, current, self.source, self.clock)
        except CredentialUnusable as exc:  # retrying changes nothing: say why, and re-pair if allowed
            self._mark_unusable(exc)
            if self.reenrollment.pairing is not None:
                return await self._poll_pairing(started, forced)
            self._failed(started, current, f"{exc.reason}: {exc.detail}", forced)
            return False
        except Exception as exc:  # noqa: BLE001 - whatever failed, keep serving and retry
            self._failed(started, current, str(exc), forced, exc_info=not isinstance(exc, (PKIError, OSError)))
            return False
        log.info("renewed %s: serial %x -> %x, not after %s", self.config.name, current.certificate.serial_number,
                 successor.certificate.serial_number, successor.certificate.not_valid_after_utc.isoformat())
        self.counters.renewals += 1
        self._last_renewal = self.clock.now()
        self._last_attempt = {"started": iso(started), "ended": iso(self._last_renewal), "forced": forced, "result": "renewed",
                              "serial": f"{successor.certificate.serial_number:x}", "error": None}
        in_service = self.reload()
        if not in_service:
            self.save_state()  # reload() saves only what it took into service
        if self.config.hooks and self.credential is not None:
            self._start_hooks(self.credential)
        return in_service

    def _credential_revoked(self, detail: str) -> None:
        if self.unusable is None or self.unusable.reason != "revoked":
            self._mark_unusable(CredentialUnusable("revoked", detail))

    @property
    def unusable(self) -> CredentialUnusable | None:
        """Why the certificate in service can no longer renew, or None."""
        return self.reenrollment.unusable

    def _mark_unusable(self, exc: CredentialUnusable) -> None:
        assert self.credential is not None
        if self.reenrollment.report(exc, self.credential.certificate):
            self._next_attempt = self.clock.now()  # the pairing request goes out at once
            self._schedule_wakeup()
        self.save_state()

    async def _poll_pairing(self, started: dt.datetime, forced: bool) -> bool:
        """Ask once whether the pairing request was approved; take what it gave into service."""
        assert self.credential is not None
        previous = self.credential.certificate.serial_number
        outcome = await asyncio.to_thread(self.reenrollment.poll, self.clock.now())
        if not isinstance(outcome, Credential):  # still waiting (when to ask again), or denied (None)
            self._next_attempt = outcome
            self._schedule_wakeup()
            self.save_state()
            return False
        log.info("re-enrolled %s: serial %x -> %x (approved at the CA), not after %s", self.config.name, previous,
                 outcome.certificate.serial_number, outcome.certificate.not_valid_after_utc.isoformat())
        self.counters.renewals += 1
        self._last_renewal = self.clock.now()
        self._last_attempt = {"started": iso(started), "ended": iso(self._last_renewal), "forced": forced, "result": "renewed",
                              "serial": f"{outcome.certificate.serial_number:x}", "error": None, "by": "pairing request"}
        in_service = self.reload()
        if self.config.hooks and self.credential is not None:
            self._start_hooks(self.credential)
        return in_service

    def _failed(self, started: dt.datetime, current: Credential, error: str, forced: bool, exc_info: bool = False) -> None:
        """Record a failed attempt, schedule the retry and log it, louder as expiry nears."""
        now = self.clock.now()
        cert = current.certificate
        self.counters.renewal_failures += 1
        self._failures += 1
        cfg = self.config.renewal
        delay = retry_delay(self._failures, left=cert.not_valid_after_utc - now, initial=cfg.retry_initial.total_seconds(),
                            maximum=cfg.retry_max.total_seconds(), rng=self.rng)
        self._next_attempt = now + dt.timedelta(seconds=delay)
        self._last_attempt = {"started": iso(started), "ended": iso(now), "forced": forced, "result": "failed",
                              "serial": None, "error": error}
        left = cert.not_valid_after_utc - now
        expired = left <= dt.timedelta(0)
        log.log(failure_log_level(now, cert.not_valid_before_utc, cert.not_valid_after_utc),
                "renewal of %s failed (%s); %s serial %x, %s; attempt %d, next attempt %s",
                self.config.name, error, "still serving the EXPIRED" if expired else "still serving", cert.serial_number,
                f"expired {-left} ago" if expired else f"{left} left", self._failures, self._next_attempt.isoformat(),
                exc_info=exc_info)  # a traceback only for the unexpected
        self._schedule_wakeup()
        self.save_state()

    # -- hooks and state ------------------------------------------------------------------------

    def _start_hooks(self, credential: Credential) -> None:
        """Run the hooks for ``credential`` after the previous run of them ends (in order, so a
        service never reloads an older credential after a newer one)."""
        previous = self._hooks_task
        context = HookContext(self.config.name, credential.certificate.serial_number, self.store.directory)

        async def run() -> None:
            if previous is not None:
                await asyncio.gather(previous, return_exceptions=True)
            results: list[dict] = []
            await run_hooks(self.config.hooks, context, results=results, clock=self.clock)
            self._hook_results = results
            self.save_state()

        self._hooks_task = asyncio.ensure_future(run())

    async def wait_for_hooks(self) -> None:
        """Wait until the hooks started so far have finished (``renew-now`` without a daemon)."""
        if self._hooks_task is not None:
            await asyncio.gather(self._hooks_task, return_exceptions=True)

    def state(self) -> dict:
        """What the state file holds (see :mod:`pki_agent.rotation.state`)."""
        cert = self.credential.certificate if self.credential else None
        listener = tunnel = None
        if self.listener is not None:
            listener = {"addresses": [f"{h}:{p}" for h, p in self.listener.addresses]}
        if self.tunnel is not None:
            tunnel = {"addresses": [f"{h}:{p}" for h, p in self.tunnel.addresses], "gateway": str(self.tunnel.gateway)}
        return {
            "name": self.config.name, "kind": self.config.kind, "pid": os.getpid(), "running": self._running,
            "started": iso(self._started), "updated": iso(self.clock.now()),
            "credential": None if cert is None else {
                "serial": f"{cert.serial_number:x}", "not_before": iso(cert.not_valid_before_utc),
                "not_after": iso(cert.not_valid_after_utc), "renewal_due": iso(self.renewal_due()),
            },
            "next_attempt": iso(self._next_attempt), "failures": self._failures,
            "last_attempt": self._last_attempt, "last_renewal": iso(self._last_renewal), "forced_attempts": self._forced,
            "listener": listener, "tunnel": tunnel, "hooks": self._hook_results,
            "status_server": [f"{h}:{p}" for h, p in self.status_server.addresses] if self.status_server is not None else None,
            **self.reenrollment.state(),
        }

    def save_state(self) -> None:
        """Rewrite the state file; a failure is logged, never fatal (the state is advisory)."""
        try:
            write_state(self.state_path, self.state())
        except OSError as exc:
            log.warning("cannot write the state file %s: %s", self.state_path, exc)

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
        """Serve until SIGTERM/SIGINT or :meth:`stop`; SIGHUP reloads the credential from disk,
        SIGUSR1 renews now. Holds the PID file (:mod:`pki_agent.pidfile`) while it runs.

        Args:
            handle_signals: install the signal handlers (only possible in the main thread).
            ready: called once the listener is bound and the scheduler runs.

        Raises:
            AgentError: another agent runs for this credential directory, the credential cannot
                be loaded, or the listener cannot bind.
        """
        loop = asyncio.get_running_loop()
        stopped = self._stopped = asyncio.Event()
        pid_file = PidFile(self.store.directory)
        pid_file.acquire()
        try:
            await self._serve(loop, stopped, handle_signals, ready)
        finally:
            self._running = False
            self.save_state()
            pid_file.release()

    async def _serve(self, loop: asyncio.AbstractEventLoop, stopped: asyncio.Event, handle_signals: bool,
                     ready: Callable[[], None] | None) -> None:
        from apscheduler.schedulers.asyncio import AsyncIOScheduler

        self._started = self.clock.now()
        for leftover in self.store.remove_leftovers():  # a write cut short by a full disk or a kill
            log.info("removed %s, left half-written by an interrupted write", leftover)
        self.conform_layout()
        self.reload()
        log_startup_findings(self.config, self.config_path, self.clock)  # a credential that loads may still be unusable
        if self.source is None:
            log.warning("no renewal source configured (renewal.ca_url or renewal.ca_home): %s will not be renewed", self.config.name)
        await start_endpoints(self)
        scheduler = self._scheduler = AsyncIOScheduler(event_loop=loop, timezone=dt.timezone.utc)
        scheduler.add_job(self.check, "interval", seconds=self.config.renewal.check_interval.total_seconds(),
                                id="check", misfire_grace_time=None, coalesce=True, max_instances=1)
        if self.upkeep is not None and self.upkeep.listener_crl is not None:
            # Its own job: the revocation bound is crl_refresh_interval, not check_interval.
            scheduler.add_job(self.upkeep.refresh_crl, "interval", seconds=self.config.renewal.crl_refresh_interval.total_seconds(),
                                    id="crl", misfire_grace_time=None, coalesce=True, max_instances=1,
                                    next_run_time=dt.datetime.now(dt.timezone.utc))
        scheduler.start()
        self._schedule_wakeup()
        watcher = loop.create_task(watch_files(self.watched_paths(), self.reload_if_changed, stopped)) if self.config.watch else None
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stopped.set)
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
            loop.add_signal_handler(signal.SIGUSR1, self.renew_soon)
        self._running = True
        self.save_state()
        log.info("ready: %s %s, %s", self.config.kind, self.config.name, describe_endpoints(self))
        if ready is not None:
            ready()
        first_check = loop.create_task(self._first_check())
        try:
            await stopped.wait()
        finally:
            first_check.cancel()
            log.info("stopping")
            scheduler.shutdown(wait=False)
            if watcher is not None:
                stopped.set()
                await asyncio.wait({watcher}, timeout=5)
            if self._hooks_task is not None and not self._hooks_task.done():
                self._hooks_task.cancel()  # kills a running hook's process group (agent/rotation/hooks.py)
                await asyncio.gather(self._hooks_task, return_exceptions=True)
            await close_endpoints(self)

    def _on_sighup(self) -> None:
        log.info("SIGHUP: reloading the credential from disk")
        self.reload()
        if self.reenrollment.ask_again():  # after a denial: a new key and a new pairing request
            self._next_attempt = self.clock.now()
            self._schedule_wakeup()
            self.save_state()

    def renew_soon(self) -> None:
        """Renew as soon as no renewal is in progress (SIGUSR1, ``pki-agent renew-now``)."""

        async def forced() -> None:
            async with self._renew_lock:
                await self.renew(forced=True)

        task = asyncio.ensure_future(forced())
        self._forced_tasks.add(task)  # held until done: the loop keeps only weak references to tasks
        task.add_done_callback(self._forced_tasks.discard)

    def stop(self) -> None:
        """Ask :meth:`run` to return; call it on the agent's event loop."""
        self._stopping.set()
        if self._stopped is not None:
            self._stopped.set()
