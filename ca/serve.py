"""``pkictl serve``: the CA as an EST service (RFC 7030) over HTTPS, with its own certificate,
which it renews itself, and the CRL over HTTP.

Endpoints (RFC 7030 3.2.2): ``GET /.well-known/est/cacerts``, ``POST .../simpleenroll`` (a
one-time token in HTTP Basic authentication, or the operator's approval: 202 + Retry-After until
then), ``POST .../simplereenroll`` (authenticated only by the client's current certificate), and
``GET /crl`` (DER, the current issuing CA's) and ``GET /crl.pem`` (every active CRL).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import signal
import ssl
import time
from typing import Callable

from aiohttp import BasicAuth, web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .authority import CertificateAuthority
from .errors import (AccessDenied, AlreadyEnrolledError, AuthenticationError, CertificateUnusable, NotEnrolledError, PendingApproval,
                     PKIError, PolicyError)
from .est import EST_PREFIX, PKCS7_CERTS_ONLY, PKIX_CRL, REFUSAL_HEADER, decode_csr_body, encode_certs_only
from .policy import MAX_CSR_BYTES
from .renewal import is_due
from .revocation import load_crls
from .signers import SignerPool, SignerUnavailable
from .store import Credential, CredentialStore

__all__ = ["ESTService", "RateLimiter", "SERVICE_NAME"]

log = logging.getLogger("pkictl.serve")
SERVICE_NAME = "est"  # the name of the service's own certificate in the inventory


class RateLimiter:
    """A token bucket per key: ``rate`` requests per second, bursts up to ``burst``.

    Args:
        rate: sustained requests per second.
        burst: how many may come at once.
        clock: monotonic seconds (injectable).
    """

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self._clock = rate, burst, clock
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, key: str) -> float:
        """0 if a request of ``key`` may pass now, else the seconds to wait."""
        now = self._clock()
        tokens, last = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens >= 1:
            self._buckets[key] = (tokens - 1, now)
            if len(self._buckets) > 100_000:  # forget idle clients rather than grow without bound
                self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < 60}
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1 - tokens) / self.rate


def _text(status: int, reason: str, **headers: str) -> web.Response:
    """An EST error: the status code and a plain-text reason (RFC 7030 4.2.3)."""
    return web.Response(status=status, text=reason + "\n", content_type="text/plain", headers=headers)


class ESTService:
    """The EST service of ``ca``.

    Args:
        ca: the loaded CA (its issuing key signs).
        listen: ``(host, port)``; port 0 picks a free port.
        dns_names, ip_addresses: names nodes use to reach the service (its certificate's SANs).
        retry_after: seconds a pending enrollment is told to wait (RFC 7030 4.2.3).
        check_interval: seconds between checks of the service certificate and the CRL.
        handshake_timeout: seconds a client has to finish its TLS handshake.
        rate, burst: per client address (enroll, cacerts) or identity (reenroll).
        signers: worker processes that issue (:class:`pkictl.signers.SignerPool`, started by
            :meth:`run`); None issues on the event loop with ``ca`` itself.
    """

    def __init__(
        self,
        ca: CertificateAuthority,
        *,
        listen: tuple[str, int],
        dns_names: list[str] | None = None,
        ip_addresses: list[str] | None = None,
        retry_after: int = 10,
        check_interval: float = 60.0,
        handshake_timeout: float = 10.0,
        rate: float = 5.0,
        burst: int = 20,
        signers: SignerPool | None = None,
    ) -> None:
        self.ca = ca
        self.signers = signers
        self.listen = listen
        self.dns_names = list(dns_names or [])
        self.ip_addresses = list(ip_addresses or [])
        if not self.dns_names and not self.ip_addresses:
            # No names given: only a service bound to one address (loopback, for tests and a
            # single host) can name itself; the CLI refuses a wider --listen without names.
            self.ip_addresses = [listen[0] if listen[0] not in ("", "0.0.0.0", "::") else "127.0.0.1"]
        self.retry_after = retry_after
        self.check_interval = check_interval
        self.handshake_timeout = handshake_timeout
        self.limiter = RateLimiter(rate, burst)
        self.store = CredentialStore(ca.home / "service")
        self._context: ssl.SSLContext | None = None
        self._server: asyncio.base_events.Server | None = None
        self._runner: web.AppRunner | None = None

    # -- the service's own credential ---------------------------------------------------------

    def ensure_credential(self) -> Credential:
        """Issue the service certificate if there is none, renew it when due, and (re)build the
        TLS context from it. Returns the credential in service."""
        from .profile import generate_key

        now = self.ca.clock.now()
        credential = self.store.load() if self.store.live.is_symlink() else None
        wanted = sorted([f"DNS:{d.lower()}" for d in self.dns_names] + [f"IP:{i}" for i in self.ip_addresses])
        if credential is not None:
            from .authority import san_strings

            cert = credential.certificate
            fresh = not is_due(now, cert.not_valid_before_utc, cert.not_valid_after_utc, fraction=self.ca.settings.renewal_fraction)
            if fresh and sorted(san_strings(cert)) == wanted:
                self._build_context()
                return credential
        key = generate_key()
        cert = self.ca.issue("service", SERVICE_NAME, key.public_key(), dns_names=self.dns_names,
                             ip_addresses=self.ip_addresses, first=False)
        credential = Credential(key, cert, self.ca.chain)
        if self.store.live.is_symlink():
            self.store.install(credential)
            self.store.write_trust_anchors(self.ca.trust_anchors)
        else:
            CredentialStore.create(self.store.directory, credential, self.ca.trust_anchors)
        log.info("service certificate serial %x, not after %s", cert.serial_number, cert.not_valid_after_utc.isoformat())
        self._build_context()
        return credential

    def _new_context(self) -> ssl.SSLContext:
        version = self.store.current_version_dir()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_TICKET
        ctx.num_tickets = 0
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
        # Optional at the TLS layer: simpleenroll comes without a certificate; simplereenroll
        # demands one. A certificate that is presented must chain to our root.
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.load_verify_locations(cafile=self.store.trust_anchors_path)
        ctx.load_cert_chain(version / "fullchain.pem", version / "privkey.pem")
        return ctx

    def _build_context(self) -> None:
        current = self._new_context()
        if self._context is None:
            base = self._new_context()

            def pick(ssl_object, server_name, _base):  # fires with and without SNI (DESIGN.md)
                ssl_object.context = self._current
            base.sni_callback = pick
            self._context = base
        self._current = current

    # -- HTTP -----------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_CSR_BYTES, middlewares=[self._errors])
        app.add_routes([
            web.get(f"{EST_PREFIX}/cacerts", self.cacerts),
            web.post(f"{EST_PREFIX}/simpleenroll", self.simpleenroll),
            web.post(f"{EST_PREFIX}/simplereenroll", self.simplereenroll),
            web.get("/crl", self.crl_der),
            web.get("/crl.pem", self.crl_pem),
        ])
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        started = time.monotonic()
        peer = request.remote or "?"
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            # Keep the headers that are part of the answer: Retry-After of a 429 (RFC 6585 4), Allow of a 405.
            kept = {name: exc.headers[name] for name in ("Retry-After", "Allow") if name in exc.headers}
            response = _text(exc.status, exc.reason or str(exc), **kept)
        except SignerUnavailable as exc:
            response = _text(503, str(exc), **{"Retry-After": str(self.retry_after)})
        except PendingApproval as exc:
            response = _text(202, str(exc), **{"Retry-After": str(self.retry_after)})
        except AuthenticationError as exc:  # missing or invalid credentials
            # Basic authentication (a token) helps only a first enrollment; a renewal needs a certificate.
            challenge = {} if request.path.endswith("simplereenroll") else {"WWW-Authenticate": 'Basic realm="pkictl EST"'}
            response = _text(401, str(exc), **challenge)
        except (AccessDenied, AlreadyEnrolledError, NotEnrolledError) as exc:  # a decision, not a malformed request
            response = _text(403, str(exc))
        except CertificateUnusable as exc:  # renewing with a certificate that can no longer renew
            response = _text(403, str(exc), **{REFUSAL_HEADER: exc.reason})
        except PolicyError as exc:  # renewing: the certificate may not renew; enrolling: a bad request
            response = _text(403 if request.path.endswith("simplereenroll") else 400, str(exc))
        except PKIError as exc:
            response = _text(400, str(exc))
        log.info("%s %s %s -> %d (%.1f ms)", peer, request.method, request.path, response.status, (time.monotonic() - started) * 1000)
        return response

    def _limit(self, key: str) -> None:
        wait = self.limiter.allow(key)
        if wait:
            raise web.HTTPTooManyRequests(reason=f"too many requests from {key}; retry in {wait:.1f} s", headers={"Retry-After": str(max(1, round(wait)))})

    async def _csr(self, request: web.Request) -> x509.CertificateSigningRequest:
        # A malformed request is a 400 on both endpoints (on simplereenroll a PolicyError would
        # read as a 403, "this certificate may not renew", which a client takes as final).
        try:
            if request.content_type not in ("application/pkcs10", "application/octet-stream", ""):
                raise PolicyError(f"Content-Type {request.content_type}: want application/pkcs10 (RFC 7030 4.2.1)")
            return decode_csr_body(await request.read())
        except PolicyError as exc:
            raise web.HTTPBadRequest(reason=" ".join(str(exc).split())) from None

    async def cacerts(self, request: web.Request) -> web.Response:
        """RFC 7030 4.1: the trust anchor and the issuing CA certificates."""
        self._limit(request.remote or "?")
        body = encode_certs_only([*self.ca.trust_anchors, *self.ca.chain])
        return web.Response(body=body, headers={"Content-Type": PKCS7_CERTS_ONLY, "Content-Transfer-Encoding": "base64"})

    async def simpleenroll(self, request: web.Request) -> web.Response:
        """RFC 7030 4.2.1: a first certificate, with a token (HTTP Basic: node name, token) or approval."""
        self._limit(request.remote or "?")
        csr = await self._csr(request)
        name = token = None
        if "Authorization" in request.headers:
            try:
                auth = BasicAuth.decode(request.headers["Authorization"])
            except ValueError:
                raise AuthenticationError("Authorization: want HTTP Basic with the node name and its enrollment token") from None
            name, token = auth.login, auth.password
        if self.signers is not None:
            certificate = await self.signers.simple_enroll(csr, name=name, token=token, peer=request.remote or "?")
        else:
            certificate = self.ca.simple_enroll(csr, name=name, token=token, peer=request.remote or "?")
        return self._certificate(certificate)

    async def simplereenroll(self, request: web.Request) -> web.Response:
        """RFC 7030 4.2.2: a successor, authenticated by the current certificate over mTLS."""
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        if not der:
            raise AuthenticationError("simplereenroll needs the current certificate as the TLS client certificate")
        current = x509.load_der_x509_certificate(der)
        self._limit(f"serial:{current.serial_number:x}")
        csr = await self._csr(request)
        if self.signers is not None:
            return self._certificate(await self.signers.simple_reenroll(csr, current))
        return self._certificate(self.ca.simple_reenroll(csr, current))

    def _certificate(self, certificate: x509.Certificate) -> web.Response:
        # RFC 7030 4.2.3: "containing only the certificate that was issued"; clients take the
        # chain from /cacerts (a PKCS#7 SET OF would not keep a leaf-first order anyway).
        body = encode_certs_only([certificate])
        return web.Response(body=body, headers={"Content-Type": PKCS7_CERTS_ONLY, "Content-Transfer-Encoding": "base64"})

    async def crl_der(self, request: web.Request) -> web.Response:
        self._limit(request.remote or "?")
        crls = [c for c in load_crls(self.ca.crl_path) if c.issuer == self.ca.issuing.subject]
        return web.Response(body=crls[0].public_bytes(serialization.Encoding.DER), headers={"Content-Type": PKIX_CRL})

    async def crl_pem(self, request: web.Request) -> web.Response:
        self._limit(request.remote or "?")
        return web.Response(body=self.ca.crl_path.read_bytes(), headers={"Content-Type": "application/x-pem-file"})

    # -- process ---------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        self.ensure_credential()
        self.ca.refresh_crl()
        self._runner = web.AppRunner(self.app(), access_log=None, keepalive_timeout=15)
        await self._runner.setup()
        loop = asyncio.get_running_loop()
        host, port = self.listen
        self._server = await loop.create_server(self._runner.server, host or None, port, ssl=self._context,
                                                ssl_handshake_timeout=self.handshake_timeout)

    async def maintain(self) -> None:
        """Renew the service certificate when due and re-sign the CRL at half its validity."""
        try:
            self.ensure_credential()
            if self.ca.refresh_crl():
                log.info("CRL re-signed")
        except Exception as exc:  # noqa: BLE001 - keep serving with what works; retry next time
            log.error("maintenance failed: %s", exc, exc_info=not isinstance(exc, PKIError))

    async def run(self, *, ready: Callable[[int], None] | None = None, handle_signals: bool = True) -> None:
        """Serve until SIGTERM/SIGINT; SIGHUP reloads the service certificate from disk.

        Maintenance runs from APScheduler with ``misfire_grace_time=None`` and ``coalesce=True``
        (a 1 s grace silently skipped a job after a pause: DESIGN.md, "Renewal").
        """
        from apscheduler.schedulers.asyncio import AsyncIOScheduler

        stop = asyncio.Event()
        if self.signers is not None:
            await self.signers.start()
        await self.start()
        loop = asyncio.get_running_loop()
        scheduler = AsyncIOScheduler(event_loop=loop, timezone=dt.timezone.utc)
        scheduler.add_job(self.maintain, "interval", seconds=self.check_interval, misfire_grace_time=None,
                          coalesce=True, max_instances=1)
        scheduler.start()
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            loop.add_signal_handler(signal.SIGHUP, self._build_context)
        self._stop = stop
        if ready:
            ready(self.port)
        try:
            await stop.wait()
        finally:
            scheduler.shutdown(wait=False)
            self._server.close()
            await self._runner.cleanup()
            if self.signers is not None:
                await self.signers.close()

    def stop(self) -> None:
        self._stop.set()
