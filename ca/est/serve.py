"""``pkictl serve``: the CA as an EST service (RFC 7030) over HTTPS, with its own certificate,
which it renews itself, and the CRL over HTTP.

Endpoints (RFC 7030 3.2.2): ``GET /.well-known/est/cacerts``, ``GET .../csrattrs`` (what a CSR
must carry, RFC 7030 4.5: :mod:`pkictl.est.csrattrs`), ``POST .../simpleenroll`` (a one-time token
in HTTP Basic authentication, user = the node name and password = the token, or the operator's
approval: 202 + Retry-After until then), ``POST .../simplereenroll`` (authenticated only by the
client's current certificate), and ``GET /crl`` (DER, the current issuing CA's) and ``GET
/crl.pem`` (every active CRL), both with a strong ETag for cheap polling (RFC 9110 8.8.3, 13.1.2).
Every 4xx says what was wrong and what was expected (:mod:`pkictl.est.answers`).

TLS is done per connection by :class:`pkictl.est.front.TLSFront`, which logs every client refused
in its handshake; every answer is logged by :class:`pkictl.est.log.RequestLog`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import hashlib
import ipaddress
import logging
import os
import random
import signal
import ssl
import threading
from typing import Callable, Iterator, TypeVar

from aiohttp import BasicAuth, web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from ..admin.server import AdminService
from ..authority import CertificateAuthority
from ..errors import CertificateUnusable, InvalidNameError, Overloaded, PendingApproval, PKIError, PolicyError
from .wire import EST_PREFIX, PKCS7_CERTS_ONLY, PKIX_CRL, REFUSAL_HEADER, decode_csr_body, encode_certs_only
from .answers import (BASIC_WANTED, CLIENT_CERTIFICATE_WANTED, CSR_BODY_WANTED, echo, expect_continue, http_refusal, text_answer,
                          unrouted)
from .csrattrs import CSRATTRS, encode_csr_attributes
from .front import FrontLimits, TLSFront
from ..fleet_report import REPORT_PATH, accept_report
from .log import (BadAuthorization, MalformedRequest, NoClientCertificate, QuietClientErrors, Refusal, RequestLog, classify, note,
                      outcome, remember_peer)
from ..logfmt import quoted
from ..names import validate_name
from ..policy import MAX_CSR_BYTES
from .ratelimit import RateLimiter
from ..inventory import Inventory
from ..revocation import crls_from_pem
from .metrics import ServiceMetrics, StatusServer
from .shedding import LoadShedder, SheddingPolicy
from .service_credential import SERVICE_NAME, ensure_service_credential
from .signers import SignerPool, SignerUnavailable
from ..storage.database import POOL_SIZE, DatabaseUnavailable
from ..sockets import bind_problem
from ..store import Credential, CredentialStore
from ..tls import load_credential

__all__ = ["ESTService", "RateLimiter", "SERVICE_NAME"]

log = logging.getLogger("pkictl.serve")
_T = TypeVar("_T")

# Seconds a gateway report, a note of where a certificate went, or a read of the shared CRLs
# waits for a database connection: each is tried again soon (the gateway's next report, the next
# follow interval), so it gives up early rather than pile up while the server is away.
RECORD_WAIT = 2.0
RECORD_THREADS = POOL_SIZE  # more would only wait for a pooled connection


_ENROLLMENT_PATHS = (f"{EST_PREFIX}/simpleenroll", f"{EST_PREFIX}/simplereenroll")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _common_name(name: x509.Name) -> str | None:
    values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(values[0].value) if values else None


def _etag_matches(header: str | None, etag: str) -> bool:
    """Whether an If-None-Match field value matches ``etag`` (RFC 9110 13.1.2: ``*`` or a list of
    entity tags, compared weakly: a ``W/`` prefix is ignored)."""
    if header is None:
        return False
    tags = [t.strip() for t in header.split(",")]
    return "*" in tags or any(t.removeprefix("W/") == etag for t in tags)


class ESTService:
    """The EST service of ``ca``.

    Args:
        ca: the loaded CA (its issuing key signs).
        listen: ``(host, port)``; port 0 picks a free port.
        dns_names, ip_addresses: names nodes use to reach the service (its certificate's SANs).
        retry_after: seconds a pending enrollment is told to wait (RFC 7030 4.2.3).
        check_interval: seconds between checks of the service certificate, the CRL and a new
            issuing CA (``pkictl rotate-issuing``).
        handshake_timeout: seconds a client has to finish its TLS handshake.
        rate, burst: per client address (enroll, cacerts, CRL) or identity (reenroll).
        signers: worker processes that issue (:class:`pkictl.est.signers.SignerPool`, started by
            :meth:`run`); None issues on the event loop with ``ca`` itself.
        limits: header and body timeouts and connection caps of the front
            (:class:`pkictl.est.front.FrontLimits`; its defaults when None).
        metrics_listen: ``(host, port)`` of the plain-HTTP ``/healthz`` and ``/metrics``
            endpoint (:mod:`pkictl.est.metrics`); None serves none.
        admin_listen: ``(host, port)`` of the operator's web page (:mod:`pkictl.admin.server`), served
            with the service's certificate (an IP address given here joins its SANs); None serves none.
        shedding: when ``simpleenroll`` / ``simplereenroll`` are answered 503 with a
            Retry-After instead of queued (:class:`pkictl.est.shedding.SheddingPolicy`; its
            defaults when None).
        shed_clock, shed_rng: the shedder's monotonic clock and random source (tests inject them).
        replica: the name of this replica's own service certificate in the inventory
            (:func:`pkictl.est.service_credential.ensure_service_credential`).
        follow_interval: seconds between reads of the newest CRLs from a database other replicas
            share (:meth:`pkictl.revocation.Revocation.publish`): the bound on how long a
            revocation made through another replica takes to reach this one's /crl. Unused on SQLite.
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
        limits: FrontLimits | None = None,
        metrics_listen: tuple[str, int] | None = None,
        admin_listen: tuple[str, int] | None = None,
        shedding: SheddingPolicy | None = None,
        shed_clock: Callable[[], float] | None = None,
        shed_rng: random.Random | None = None,
        replica: str = SERVICE_NAME,
        follow_interval: float = 2.0,
    ) -> None:
        self.ca = ca
        self.replica = replica
        self.follow_interval = follow_interval
        self.signers = signers
        self.listen = listen
        self.dns_names = list(dns_names or [])
        self.ip_addresses = list(ip_addresses or [])
        if not self.dns_names and not self.ip_addresses:
            # No names given: only a service bound to one address (loopback, for tests and a
            # single host) can name itself; the CLI refuses a wider --listen without names.
            self.ip_addresses = [listen[0] if listen[0] not in ("", "0.0.0.0", "::") else "127.0.0.1"]
        self.admin_listen = admin_listen
        self.admin: AdminService | None = None
        if admin_listen is not None and _is_ip(admin_listen[0]) and admin_listen[0] not in ("0.0.0.0", "::", *self.ip_addresses):
            self.ip_addresses.append(admin_listen[0])  # the browser checks the page's address too
        self.retry_after = retry_after
        self.check_interval = check_interval
        self.handshake_timeout = handshake_timeout
        self.limits = limits or FrontLimits()
        self.metrics = ServiceMetrics(self)
        self.metrics_listen = metrics_listen
        self.status_server: StatusServer | None = None
        self.credential: Credential | None = None  # the service's own, once ensure_credential() ran
        self.limiter = RateLimiter(rate, burst)
        self.shedder = LoadShedder(shedding, **({"clock": shed_clock} if shed_clock else {}), rng=shed_rng)
        self.store = CredentialStore(ca.home / "service")
        self._context: ssl.SSLContext | None = None
        self._front: TLSFront | None = None
        self._runner: web.AppRunner | None = None
        self._files: dict[str, tuple[tuple, bytes, str]] = {}  # CRL bodies and their ETags, by file state
        self._cacerts: tuple[tuple, bytes] | None = None
        # On a database server, the records a request leaves besides its certificate (a gateway's
        # report, where a certificate went) and the reads of CRLs other replicas signed run on
        # threads of their own, each with an inventory of its own that waits RECORD_WAIT for a
        # connection: on the event loop, a server that is away would stall every request, /crl
        # and /cacerts included. Not asyncio's default executor: asyncio.run() waits for it.
        self._records: concurrent.futures.ThreadPoolExecutor | None = None
        self._recorders = threading.local()  # .inventory: the thread's

    # -- the service's own credential and the CA it serves ------------------------------------

    def ensure_credential(self) -> Credential:
        """Renew the service certificate when due (:func:`pkictl.est.service_credential.ensure_service_credential`)
        and (re)build the TLS context from it. Returns the credential in service."""
        credential, _ = ensure_service_credential(self.ca, self.store, dns_names=self.dns_names, ip_addresses=self.ip_addresses,
                                                  name=self.replica)
        self._build_context()
        self.credential = credential
        return credential

    def _new_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_TICKET
        ctx.num_tickets = 0
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
        # Optional at the TLS layer: simpleenroll comes without a certificate; simplereenroll
        # demands one. A certificate that is presented must chain to our root.
        ctx.verify_mode = ssl.CERT_OPTIONAL
        load_credential(ctx, self.store)  # each file checked first: a damaged one is named with its fix
        return ctx

    def _build_context(self) -> None:
        """A fresh context from the files on disk; on any error the current one keeps serving."""
        self._context = self._new_context()  # each new connection takes the current one (TLSFront)

    def follow_rotation(self) -> bool:
        """Pick up a new issuing CA (``pkictl rotate-issuing``: published first, activated later)
        and promote one whose activation time has come. Cheap when nothing changed (two stat calls).

        Signing workers follow on their own, before each call they answer; this is for the
        serving process: /cacerts, /crl and issuance with ``--workers 0``.

        Returns:
            True if the issuing CA or the pending one changed.
        """
        try:
            changed = self.ca.refresh_issuing()
        except PKIError as exc:  # keep serving with the CA loaded; maintenance retries
            log.error("could not reload the issuing CA: %s", exc)
            return False
        if changed:
            self._cacerts = None
            pending = self.ca.pending
            log.info("issuing CA serial %x%s", self.ca.issuing.serial_number,
                     f"; next issuing CA serial {pending.certificate.serial_number:x} activates at {pending.activate_at.isoformat()}"
                     if pending else "")
        return changed

    def reload(self) -> None:
        """SIGHUP: rebuild the TLS context from disk and follow a rotation of the issuing CA."""
        try:
            self._build_context()
        except (OSError, ssl.SSLError, PKIError) as exc:
            log.error("reload: keeping the current TLS context: %s", exc)
        self.follow_rotation()
        log.info("reloaded (SIGHUP)")

    # -- HTTP -----------------------------------------------------------------------------------

    def app(self, front: TLSFront) -> web.Application:
        """The EST routes; ``front``'s middleware times each request's body (inside :meth:`_answer`,
        so that a 408 is answered and logged like every refusal)."""
        app = web.Application(client_max_size=MAX_CSR_BYTES, middlewares=[self._answer, front.middleware])
        app.add_routes([
            web.get(f"{EST_PREFIX}/cacerts", self.cacerts, expect_handler=expect_continue),
            web.get(f"{EST_PREFIX}/csrattrs", self.csrattrs, expect_handler=expect_continue),
            web.post(f"{EST_PREFIX}/simpleenroll", self.simpleenroll, expect_handler=expect_continue),
            web.post(f"{EST_PREFIX}/simplereenroll", self.simplereenroll, expect_handler=expect_continue),
            web.get("/crl", self.crl_der, expect_handler=expect_continue),
            web.get("/crl.pem", self.crl_pem, expect_handler=expect_continue),
            web.post(REPORT_PATH, self.gateway_report, expect_handler=expect_continue),
            web.route("*", "/{path:.*}", unrouted, expect_handler=expect_continue),  # last: what no route above serves
        ])
        return app

    @web.middleware
    async def _answer(self, request: web.Request, handler):
        """Turn every exception into its EST answer and set the request's log line (est_log)."""
        remember_peer(request)
        renewing = request.path.endswith("/simplereenroll")
        headers: dict[str, str] = {}
        hint = ""  # for the client only: how to do it right, which the log line need not repeat
        try:
            response = await handler(request)
            outcome(request, None, None)
            return response
        except PendingApproval as exc:  # no refusal: come back later (RFC 7030 4.2.3)
            outcome(request, "pending approval", str(exc))
            return text_answer(202, str(exc), **{"Retry-After": str(self.retry_after)})
        except SignerUnavailable as exc:
            refusal = Refusal(503, "signer unavailable", str(exc))
            headers["Retry-After"] = str(self.retry_after)
        except DatabaseUnavailable as exc:  # replicas on PostgreSQL: the server is away for now
            refusal = Refusal(503, "database unavailable", f"{exc}; retry")
            headers["Retry-After"] = str(self.retry_after)
        except Overloaded as exc:  # RFC 7030 4.2.3: come back after Retry-After
            refusal = Refusal(503, "overloaded", str(exc))
            headers["Retry-After"] = str(exc.retry_after)
        except Exception as exc:  # every request gets an answer and a log line
            classified = classify(exc, renewing=renewing)
            if classified is None:  # our bug, not the client's: the one case with a traceback
                log.exception("internal error answering %s %s", request.method, quoted(request.path))
                classified = Refusal(500, "internal error", f"{type(exc).__name__}: {exc}")
            refusal = classified
            if isinstance(exc, web.HTTPException):
                worded = http_refusal(exc, request)  # aiohttp says only "Not Found" and the like
                refusal = Refusal(refusal.status, refusal.reason, worded) if worded else refusal
                # Keep the headers that are part of the answer: Retry-After of a 429 (RFC 6585 4), Allow of a 405.
                headers.update((name, exc.headers[name]) for name in ("Retry-After", "Allow") if name in exc.headers)
            if isinstance(exc, MalformedRequest) or (refusal.status == 413 and request.path in _ENROLLMENT_PATHS):
                self._audit_body_refusal(request, refusal)
            if isinstance(exc, CertificateUnusable):  # why it can no longer renew, for the agent to act on
                headers[REFUSAL_HEADER] = exc.reason
            if refusal.status == 401 and not renewing:
                # Basic authentication (a token) helps only a first enrollment; a renewal needs a certificate.
                headers["WWW-Authenticate"] = 'Basic realm="pkictl EST"'
                if "HTTP Basic" not in refusal.detail:  # the CA's own words (a wrong token) say what, not how
                    hint = f"; want {BASIC_WANTED}"
        outcome(request, refusal.reason, refusal.detail)
        text = "internal error; the service's log has the details" if refusal.status == 500 else refusal.detail + hint
        return text_answer(refusal.status, text, **headers)

    def _audit_body_refusal(self, request: web.Request, refusal: Refusal) -> None:
        """Record a simpleenroll / simplereenroll refused for its body (not base64, not one CSR,
        the wrong Content-Type, too large) as the CA records its own refusals: it never reached
        the CA, and the audit log would otherwise miss it. A failure to write is logged, and the
        client still gets its answer."""
        operation = "simple_reenroll" if request.path.endswith("/simplereenroll") else "simple_enroll"
        try:
            self.ca.audit.append("refused", operation=operation, subject=f"request from {request.remote or '?'}",
                                 error="MalformedRequest" if refusal.status == 400 else "RequestEntityTooLarge",
                                 reason=refusal.detail, peer=request.remote or "?")
        except (OSError, PKIError) as exc:
            log.error("cannot record a refusal in the audit log: %s", exc)

    def _limit(self, key: str) -> None:
        wait = self.limiter.allow(key)
        if wait:
            raise web.HTTPTooManyRequests(reason=f"too many requests from {key}; retry in {wait:.1f} s", headers={"Retry-After": str(max(1, round(wait)))})

    @contextlib.contextmanager
    def _admitted(self) -> Iterator[None]:
        """Hold one of the enrollment requests admitted at once (:mod:`pkictl.est.shedding`) while
        the body runs; beyond the bound, refuse at once.

        Raises:
            Overloaded: the service has as many in hand as it answers in time.
        """
        retry_after = self.shedder.admit()
        if retry_after is not None:
            raise Overloaded(retry_after, self.shedder.pending)
        completed = False
        try:
            yield
            completed = True
        except PKIError:
            completed = True  # refused by the CA's policy: it did the work all the same
            raise
        finally:
            self.shedder.done(completed=completed)

    async def _csr(self, request: web.Request) -> x509.CertificateSigningRequest:
        # A malformed request is a 400 on both endpoints (MalformedRequest, never a 403).
        if request.content_type not in ("application/pkcs10", "application/octet-stream", ""):
            raise MalformedRequest(f"Content-Type {echo(request.content_type)}: want application/pkcs10 (RFC 7030 4.2.1) "
                                   f"with {CSR_BODY_WANTED}")
        try:
            csr = decode_csr_body(await request.read())
        except PolicyError as exc:
            raise MalformedRequest(f"{' '.join(str(exc).split())}; want {CSR_BODY_WANTED}") from None
        note(request, csr=_common_name(csr.subject))
        return csr

    async def cacerts(self, request: web.Request) -> web.Response:
        """RFC 7030 4.1: the trust anchor and the issuing CA certificates, a pending one included
        (published before it issues, so that clients hold it by then)."""
        self._limit(request.remote or "?")
        self.follow_rotation()
        state = (self.ca.issuing.serial_number, self.ca.pending.certificate.serial_number if self.ca.pending else None)
        if self._cacerts is None or self._cacerts[0] != state:
            issuers = [*self.ca.chain, *([self.ca.pending.certificate] if self.ca.pending else [])]
            self._cacerts = (state, encode_certs_only([*self.ca.trust_anchors, *issuers]))
        return web.Response(body=self._cacerts[1], headers={"Content-Type": PKCS7_CERTS_ONLY, "Content-Transfer-Encoding": "base64"})

    async def csrattrs(self, request: web.Request) -> web.Response:
        """RFC 7030 4.5: what a CSR must carry (:func:`pkictl.est.csrattrs.csr_attributes`), to anyone."""
        self._limit(request.remote or "?")
        return web.Response(body=encode_csr_attributes(), headers={"Content-Type": CSRATTRS, "Content-Transfer-Encoding": "base64"})

    async def simpleenroll(self, request: web.Request) -> web.Response:
        """RFC 7030 4.2.1: a first certificate, with a token (HTTP Basic: node name, token) or approval."""
        self._limit(request.remote or "?")
        name = token = None
        if "Authorization" in request.headers:
            try:
                auth = BasicAuth.decode(request.headers["Authorization"])
            except ValueError:
                raise BadAuthorization(f"the Authorization header is not HTTP Basic USER:PASSWORD; want {BASIC_WANTED}") from None
            name, token = auth.login, auth.password
            note(request, node=name)
        csr = await self._csr(request)
        try:
            if name is not None:
                validate_name(name)
        except InvalidNameError:  # its own message would quote the whole name
            raise InvalidNameError(f"HTTP Basic user {echo(name)} is no node name (a DNS label such as TW); want {BASIC_WANTED}") from None
        peer = request.remote or "?"
        with self._admitted():
            if self.signers is not None:
                certificate = await self.signers.simple_enroll(csr, name=name, token=token, peer=peer)
            else:
                self.follow_rotation()
                certificate = self.ca.simple_enroll(csr, name=name, token=token, peer=peer)
        if self.signers is None or not self.signers.records_peers:
            await self._note_peer(certificate, peer)
        return self._certificate(certificate)

    async def simplereenroll(self, request: web.Request) -> web.Response:
        """RFC 7030 4.2.2: a successor, authenticated by the current certificate over mTLS."""
        current = self._client_certificate(request, f"simplereenroll wants {CLIENT_CERTIFICATE_WANTED}")
        with self._admitted():
            csr = await self._csr(request)
            if self.signers is not None:
                successor = await self.signers.simple_reenroll(csr, current, peer=request.remote or "?")
            else:
                self.follow_rotation()
                successor = self.ca.simple_reenroll(csr, current)
        if self.signers is None or not self.signers.records_peers:
            await self._note_peer(successor, request.remote or "?")
        return self._certificate(successor)

    def _client_certificate(self, request: web.Request, wanted: str) -> x509.Certificate:
        """The TLS client certificate of ``request``, named in its log line and rate-limited by
        serial number; NoClientCertificate (saying what ``wanted``) without one."""
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        if not der:
            raise NoClientCertificate(f"no TLS client certificate came with this request; {wanted}")
        certificate = x509.load_der_x509_certificate(der)
        note(request, node=_common_name(certificate.subject), serial=certificate.serial_number)
        self._limit(f"serial:{certificate.serial_number:x}")
        return certificate

    async def _note_peer(self, certificate: x509.Certificate, peer: str) -> None:
        """Remember where ``certificate`` went (the fleet view's last renewal address); a failure
        to write is logged, and the client still gets its certificate."""
        try:
            await self._record(lambda inventory: inventory.record_issuance_peer(certificate.serial_number, peer))
        except (OSError, PKIError) as exc:
            log.error("cannot record where serial %x was issued to: %s", certificate.serial_number, exc)

    async def _record(self, write: Callable[[Inventory], _T]) -> _T:
        """Run ``write`` with an inventory: the CA's, here, on SQLite (a local file is never
        away); on a database server, the recorder's on the records thread, so that the event loop
        goes on serving while the write waits for a connection (at most RECORD_WAIT seconds).

        Raises:
            whatever ``write`` raises (DatabaseUnavailable when the server cannot be reached)."""
        if self.ca.inventory.engine == "sqlite":
            return write(self.ca.inventory)
        return await self._on_records_thread(write)

    async def _on_records_thread(self, write: Callable[[Inventory], _T]) -> _T:
        if self._records is None:
            self._records = concurrent.futures.ThreadPoolExecutor(max_workers=RECORD_THREADS, thread_name_prefix="pkictl-records")
        return await asyncio.get_running_loop().run_in_executor(self._records, self._with_recorder, write)

    def _with_recorder(self, write: Callable[[Inventory], _T]) -> _T:
        inventory = getattr(self._recorders, "inventory", None)
        if inventory is None:
            inventory = self._recorders.inventory = Inventory.open(self.ca.home, wait=RECORD_WAIT)
        return write(inventory)

    async def gateway_report(self, request: web.Request) -> web.Response:
        """A gateway's connection table (:mod:`pkictl.fleet_report`), authenticated by its
        gateway certificate over mTLS; 204 once stored."""
        current = self._client_certificate(request, f"{REPORT_PATH} wants the gateway's own")
        body, now = await request.read(), self.ca.clock.now()
        gateway, report = await self._record(lambda inventory: accept_report(inventory, current, body, now))
        log.debug("gateway report of %s: %d node(s)", gateway, len(report.nodes))
        return web.Response(status=204)

    def _certificate(self, certificate: x509.Certificate) -> web.Response:
        # RFC 7030 4.2.3: "containing only the certificate that was issued"; clients take the
        # chain from /cacerts (a PKCS#7 SET OF would not keep a leaf-first order anyway).
        body = encode_certs_only([certificate])
        return web.Response(body=body, headers={"Content-Type": PKCS7_CERTS_ONLY, "Content-Transfer-Encoding": "base64"})

    def _crl_file(self, kind: str) -> tuple[bytes, str]:
        """The body of ``/crl.pem`` (``pem``) or ``/crl`` (``der``) and its strong ETag, re-read only
        when crl.pem changed (its inode, size or mtime) or the issuing CA did."""
        info = os.stat(self.ca.crl_path)
        state = (info.st_ino, info.st_size, info.st_mtime_ns, self.ca.issuing.serial_number)
        cached = self._files.get(kind)
        if cached is None or cached[0] != state:
            data = self.ca.crl_path.read_bytes()
            if kind == "der":
                crls = [c for c in crls_from_pem(data, source=str(self.ca.crl_path)) if c.issuer == self.ca.issuing.subject]
                if not crls:
                    raise PKIError(f"{self.ca.crl_path} holds no CRL of the issuing CA {self.ca.issuing.subject.rfc4514_string()}")
                data = crls[0].public_bytes(serialization.Encoding.DER)
            cached = self._files[kind] = (state, data, '"' + hashlib.sha256(data).hexdigest()[:32] + '"')
        return cached[1], cached[2]

    def _crl_answer(self, request: web.Request, kind: str, content_type: str) -> web.Response:
        # A strong ETag (a hash of the bytes, RFC 9110 8.8.3) and no-cache: a cache may keep the
        # CRL but must ask each time; an unchanged CRL costs a 304 without a body (RFC 9110 15.4.5).
        self._limit(request.remote or "?")
        body, etag = self._crl_file(kind)
        headers = {"ETag": etag, "Cache-Control": "no-cache"}
        if _etag_matches(request.headers.get("If-None-Match"), etag):
            return web.Response(status=304, headers=headers)
        return web.Response(body=body, headers={"Content-Type": content_type, **headers})

    async def crl_der(self, request: web.Request) -> web.Response:
        """The current issuing CA's CRL, DER (RFC 5280 5, RFC 2585 4.2)."""
        self.follow_rotation()
        return self._crl_answer(request, "der", PKIX_CRL)

    async def crl_pem(self, request: web.Request) -> web.Response:
        """Every active CRL (one per issuing CA, a pending one included), PEM."""
        return self._crl_answer(request, "pem", "application/x-pem-file")

    # -- process ---------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        assert self._front is not None
        return self._front.addresses[0][1]

    async def start(self) -> None:
        self.follow_rotation()
        self.ensure_credential()
        self.ca.refresh_crl()
        aiohttp_log = logging.getLogger("pkictl.serve.http")
        if not any(isinstance(f, QuietClientErrors) for f in aiohttp_log.filters):
            aiohttp_log.addFilter(QuietClientErrors())

        def protocol() -> asyncio.BaseProtocol:
            assert runner.server is not None, "made by setup()"
            return runner.server()

        front = self._front = TLSFront(protocol, self._current_context, handshake_timeout=self.handshake_timeout, limits=self.limits,
                                       on_refusal=self.metrics.refused_handshake, pace=self.shedder.accept_budget)
        # The front's header_timeout closes an idle keep-alive connection; aiohttp's is a backstop.
        runner = self._runner = web.AppRunner(self.app(front), access_log_class=RequestLog.counting(self.metrics.answered), access_log=log, logger=aiohttp_log,
                                              keepalive_timeout=max(15.0, self.limits.header_timeout + 1))
        await runner.setup()
        await front.start(*self.listen)
        if self.admin_listen is not None:
            self.admin = AdminService(self.ca, self.admin_listen, self._current_context, hosts=[*self.dns_names, *self.ip_addresses])
            await self.admin.start()
        if self.metrics_listen is not None:
            self.status_server = StatusServer(self, self.metrics_listen)
            try:
                await self.status_server.start()
            except OSError as exc:
                raise PKIError(bind_problem(*self.metrics_listen, exc)) from exc

    @property
    def front(self) -> TLSFront | None:
        """The TLS front, once started."""
        return self._front

    def _current_context(self) -> ssl.SSLContext:
        """What a new connection gets (TLSFront asks once per connection)."""
        assert self._context is not None, "built by ensure_credential()"
        return self._context

    async def maintain(self) -> None:
        """Follow a rotation of the issuing CA, renew the service certificate when due, and
        re-sign the CRL at half its validity."""
        try:
            self.follow_rotation()
            # Renewing and re-signing read and write the database on the event loop: a server
            # that is away would hold every request for POOL_WAIT seconds each time. A probe on
            # a records thread first (RECORD_WAIT at most) skips this round instead.
            if self.ca.inventory.engine != "sqlite" and not await self._database_reachable():
                return
            self.ensure_credential()
            if self.ca.refresh_crl():
                log.info("CRL re-signed")
        except Exception as exc:  # keep serving with what works; retry next time
            log.error("maintenance failed: %s", exc, exc_info=not isinstance(exc, PKIError))

    async def _database_reachable(self) -> bool:
        try:
            await self._on_records_thread(lambda inventory: inventory.database.execute("SELECT 1"))
        except DatabaseUnavailable as exc:
            log.warning("maintenance skipped until the CA database is back: %s", exc)
            return False
        return True

    async def follow_database(self) -> None:
        """Replicas on one database: publish the CRLs another replica signed (one indexed read
        when nothing changed)."""
        try:
            if await self._on_records_thread(self.ca.revocation.publish):
                log.info("CRL from the shared database published (signed by another replica or pkictl revoke)")
        except Exception as exc:  # the database may be away for a moment: keep serving the CRL in hand
            log.error("could not read the CRLs from the database: %s", exc, exc_info=not isinstance(exc, PKIError))

    async def run(self, *, ready: Callable[[int], None] | None = None, handle_signals: bool = True) -> None:
        """Serve until SIGTERM/SIGINT; SIGHUP reloads the service certificate and the issuing CA from disk.

        Maintenance runs from APScheduler with ``misfire_grace_time=None`` and ``coalesce=True``
        (a 1 s grace silently skipped a job after a pause: docs/design.md, "Renewal").

        Raises:
            PKIError: start-up failed (the listen address cannot be bound, a --dns or --ip of the
                service certificate is refused, a signing worker cannot load the CA); nothing is
                left running, signing workers included.
        """
        if self.signers is not None:
            await self.signers.start()
        try:
            await self._serve(ready, handle_signals)
        finally:
            # Also when start-up fails: a worker ignores SIGTERM (it must not be cut off in an
            # issuance) and ends only when its pipe closes, so an open pipe kept the process alive.
            if self.signers is not None:
                await self.signers.close()

    async def _serve(self, ready: Callable[[int], None] | None, handle_signals: bool) -> None:
        from apscheduler.schedulers.asyncio import AsyncIOScheduler

        stop = asyncio.Event()
        try:
            await self.start()
        except BaseException:
            if self.admin is not None:
                await self.admin.close()
            if self.status_server is not None:
                await self.status_server.close()
            if self._runner is not None:
                await self._runner.cleanup()
            raise
        front, runner = self._front, self._runner
        assert front is not None and runner is not None, "made by start()"
        loop = asyncio.get_running_loop()
        scheduler = AsyncIOScheduler(event_loop=loop, timezone=dt.timezone.utc)
        scheduler.add_job(self.maintain, "interval", seconds=self.check_interval, misfire_grace_time=None,
                          coalesce=True, max_instances=1)
        if self.ca.inventory.engine != "sqlite":
            scheduler.add_job(self.follow_database, "interval", seconds=self.follow_interval, misfire_grace_time=None,
                              coalesce=True, max_instances=1)
        scheduler.start()
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            loop.add_signal_handler(signal.SIGHUP, self.reload)
        self._stop = stop
        if ready:
            ready(self.port)
        try:
            await stop.wait()
        finally:
            scheduler.shutdown(wait=False)
            if self._records is not None:
                # Writes under way finish (within RECORD_WAIT); a follow-up queued is dropped.
                self._records.shutdown(wait=False, cancel_futures=True)
            await front.close()
            if self.admin is not None:
                await self.admin.close()
            if self.status_server is not None:
                await self.status_server.close()
            await runner.cleanup()

    def stop(self) -> None:
        self._stop.set()
