"""The agent's EST client (RFC 7030): first enrollment with a pinned root, renewal with the
current certificate, and fetching the trust bundle and the CRL.

The rotation calls the client from worker threads, so its methods are synchronous; each request
runs with aiohttp (the HTTP library pkictl serve is built on; no HTTP is parsed here) on one
event loop of the process, in a thread of its own.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import logging
import concurrent.futures
import os
import ssl
import threading
import time
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import urlsplit

import aiohttp
from cryptography import x509

from pkictl.errors import AuthenticationError, PathValidationError, PKIError, StoreError
from pkictl.files import atomic_write
from pkictl.paths import validate_path
from pkictl.est.wire import EST_PREFIX, PKCS10, REFUSAL_HEADER, approval_code, decode_certs_only, encode_csr, root_fingerprint
from pkictl.fleet_report import REPORT_CONTENT_TYPE, REPORT_PATH
from pkictl.store import Credential, CredentialStore
from pkictl.file_errors import load_into_context
from pkictl.tls import alert_reason, load_trust_anchors

from .errors import CredentialUnusable, RenewalError, ServiceBusy

__all__ = ["ESTClient", "refresh_crl", "refresh_trust_bundle", "select_chain", "self_signed"]

_TIMEOUT = 30.0  # seconds per request
log = logging.getLogger(__name__)


class _Unreachable(Exception):
    """The server in use gave no answer at all (its message says which and why): the next
    replica, if any, is asked instead."""


def self_signed(certificate: x509.Certificate) -> bool:
    return certificate.issuer == certificate.subject


def select_chain(leaf: x509.Certificate, cacerts: list[x509.Certificate]) -> tuple[x509.Certificate, ...]:
    """The intermediates from ``cacerts`` that lead from ``leaf`` to one of its self-signed roots
    (issuer first), as cryptography's path builder finds them (:func:`pkictl.paths.validate_path`)
    at the leaf's ``not_valid_before``: the path as it stood when the certificate was issued.
    Empty when none validates; the successor's own verification (against the pinned trust
    anchors, now) then says why."""
    roots = [c for c in cacerts if self_signed(c)]
    try:
        path = validate_path(leaf, [c for c in cacerts if not self_signed(c)], roots, leaf.not_valid_before_utc)
    except PathValidationError:
        return ()
    return tuple(path[1:-1])


class _Response:
    def __init__(self, status: int, headers, body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    @property
    def reason(self) -> str:
        return self.body.decode(errors="replace").strip()


class ESTClient:
    """An EST server at ``base_url`` (``https://host:port``), trusted through ``anchors``.

    Args:
        base_url: the server, e.g. ``https://ca.example.lan:8443``.
        fallbacks: other replicas of the same CA (``https://host:port`` each), tried in order
            when the server in use cannot be reached (no TCP connection, no answer within the
            timeout); the first that answers is used from then on (:attr:`base_url`). A server
            that answers, even with a refusal or a TLS error, is not left for another.
        anchors_path: PEM file of the trust anchors (the bundle's ``ca.pem``).
        store: the credential to authenticate renewals with (None while enrolling).
        busy_attempts: requests of one enrollment at most while the server answers 503 with a
            Retry-After (it sheds load: RFC 7030 4.2.3), >= 1.
        busy_wait_max: seconds one enrollment waits in all on Retry-After; a longer wait is
            left to the renewal schedule (:class:`pki_agent.errors.ServiceBusy`).
        sleep: waits that many seconds (tests inject their own: nothing sleeps there); a True
            return (``threading.Event.wait`` of an event that is set) means stop retrying.
    """

    def __init__(self, base_url: str, *, anchors_path: Path | None, store: CredentialStore | None = None,
                 busy_attempts: int = 4, busy_wait_max: float = 300.0, sleep: Callable[[float], object] = time.sleep,
                 fallbacks: Sequence[str] = ()) -> None:
        if busy_attempts < 1:
            raise ValueError(f"busy_attempts: got {busy_attempts}, want at least 1")
        self.busy_attempts, self.busy_wait_max, self._sleep = busy_attempts, busy_wait_max, sleep
        for url in (base_url, *fallbacks):
            parts = urlsplit(url)
            if parts.scheme != "https" or not parts.hostname:
                raise PKIError(f"EST server URL {url!r}: want https://HOST[:PORT]")
        self._urls = [url.rstrip("/") for url in (base_url, *fallbacks)]
        self._in_use = 0  # index into _urls: the server that answered last
        self.anchors_path = anchors_path
        self.store = store

    @property
    def base_url(self) -> str:
        """The EST server in use: ``base_url``, or the fallback that answered last."""
        return self._urls[self._in_use]

    @property
    def est_client(self) -> ESTClient:
        """This client (:class:`pki_agent.rotation.rotate.RenewalSource`: the CA is reached over EST)."""
        return self

    def maintain(self) -> None:
        """Nothing: the CA host does its own upkeep (:class:`pki_agent.rotation.rotate.RenewalSource`);
        what an agent fetches between renewals is :class:`pki_agent.rotation.upkeep.ESTUpkeep`'s."""
        return None

    # -- transport -----------------------------------------------------------------------------

    def _context(self, *, client: bool, verify: bool = True) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if not verify:  # only to fetch the CA certificates that are then checked by fingerprint
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            return ctx
        assert self.anchors_path is not None, "verify=False until the trust anchor is known"
        load_trust_anchors(ctx, self.anchors_path)  # a damaged ca.pem is named with its fix
        if client:
            assert self.store is not None
            version = self.store.current_version_dir()
            load_into_context(lambda: ctx.load_cert_chain(version / "fullchain.pem", version / "privkey.pem"),
                              version / "fullchain.pem", fix="restore the credential version (pki-agent doctor names what is wrong)")
        return ctx

    def _request(self, method: str, path: str, *, body: bytes | None = None, headers: dict | None = None,
                 client: bool = False, verify: bool = True) -> _Response:
        """One exchange with the server in use, or with the next replica while it cannot be
        reached (``fallbacks``).

        Raises:
            RenewalError: no server could be reached (each named with its reason), or the one
                that answered does not prove it is our CA.
            CredentialUnusable: the server refused our certificate in the TLS handshake.
        """
        context = self._context(client=client, verify=verify)
        first = self._in_use
        order = [(first + step) % len(self._urls) for step in range(len(self._urls))]
        unreachable: list[str] = []
        for position, index in enumerate(order):
            try:
                response = self._exchange_with(self._urls[index], method, path, body, headers or {}, client, context)
            except _Unreachable as exc:
                unreachable.append(str(exc))
                if position + 1 < len(order):
                    log.warning("%s; trying the next replica, %s", exc, self._urls[order[position + 1]])
                continue
            self._in_use = index  # one assignment: a concurrent request sees the old server or this one
            return response
        raise RenewalError("; ".join(unreachable)) from None

    def _exchange_with(self, url: str, method: str, path: str, body: bytes | None, headers: dict, client: bool,
                       context: ssl.SSLContext) -> _Response:
        exchange = _exchange(method, url + path, body, headers, context)
        try:
            return asyncio.run_coroutine_threadsafe(exchange, _client_loop()).result(_TIMEOUT + 5)
        except (aiohttp.ClientError, asyncio.TimeoutError, concurrent.futures.TimeoutError, ssl.SSLError, OSError) as exc:
            reason = _cause(exc)
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise RenewalError(
                    f"the EST server {url} does not prove it is our CA ({reason.verify_message}): "
                    f"its certificate must chain to {self.anchors_path} and name {urlsplit(url).hostname}"
                ) from None
            if client and _refused_after_handshake(reason):
                # TLS 1.3: the server checks our certificate after the client's handshake has
                # "succeeded", so a refusal arrives as an alert or EOF on the first read (docs/design.md).
                said = alert_reason(reason)
                why = {"expired or not yet valid": "expired", "unknown CA": "another CA"}.get(said or "", "refused")
                raise CredentialUnusable(why, f"the EST server {url} refused our certificate at the TLS layer "
                                              f"({said or reason}): it is expired, not issued by this CA, or not for clientAuth") from None
            raise _Unreachable(f"cannot reach the EST server {url}: {reason or type(exc).__name__}") from None

    def _enrollment(self, path: str, *, body: bytes, headers: dict, client: bool) -> _Response:
        """POST an enrollment, again after the server's Retry-After while it answers 503
        (RFC 7030 4.2.3, RFC 9110 10.2.3), at most ``busy_attempts`` times and ``busy_wait_max``
        seconds in all.

        Raises:
            ServiceBusy: still 503 after that, or a 503 without a usable Retry-After.
            RenewalError, CredentialUnusable: as :meth:`_request`.
        """
        waited = 0.0
        for attempt in range(1, self.busy_attempts + 1):
            response = self._request("POST", path, body=body, headers=headers, client=client)
            if response.status != 503:
                return response
            retry_after = _retry_after(response.headers.get("Retry-After") if response.headers else None)
            if retry_after is None or attempt == self.busy_attempts or waited + retry_after > self.busy_wait_max:
                after = "" if retry_after is None else f"; it asks to retry in {retry_after:g} s"
                raise ServiceBusy(f"{path.rsplit('/', 1)[-1]}: the EST server {self.base_url} is busy (HTTP 503) after {attempt} "
                                  f"attempt(s) and {waited:g} s of waiting{after}: {response.reason[:200]}", retry_after)
            if self._sleep(retry_after) is True:  # threading.Event.wait: the agent is stopping
                raise ServiceBusy(f"{path.rsplit('/', 1)[-1]}: the EST server {self.base_url} is busy (HTTP 503) and this "
                                  f"agent is stopping: not retried", retry_after)
            waited += retry_after
        raise AssertionError("unreachable: the last attempt returns or raises")  # pragma: no cover

    # -- RFC 7030 operations ---------------------------------------------------------------------

    def cacerts(self, *, verify: bool = True) -> list[x509.Certificate]:
        """GET /cacerts (RFC 7030 4.1)."""
        response = self._request("GET", f"{EST_PREFIX}/cacerts", verify=verify)
        if response.status != 200:
            raise RenewalError(f"{self.base_url} cacerts: HTTP {response.status}: {response.reason}")
        return decode_certs_only(response.body)

    def pinned_root(self, fingerprint: str) -> list[x509.Certificate]:
        """Fetch the CA certificates without trusting anyone yet and keep them only if the root
        matches ``fingerprint`` (``sha256:<hex>``, given out of band: RFC 7030 4.1.1).

        Raises:
            AuthenticationError: no root with that fingerprint: the wrong server, or someone in between.
        """
        wanted = fingerprint.lower().replace(":", "").removeprefix("sha256")
        certificates = self.cacerts(verify=False)
        roots = [c for c in certificates if self_signed(c)]
        match = [c for c in roots if root_fingerprint(c).removeprefix("sha256:") == wanted]
        if not match:
            shown = ", ".join(root_fingerprint(c) for c in roots) or "no root"
            raise AuthenticationError(
                f"the CA at {self.base_url} presented {shown}, not sha256:{wanted}: wrong CA, or someone in between; nothing was written"
            )
        return certificates

    def simple_enroll(self, csr: x509.CertificateSigningRequest, *, name: str, token: str | None) -> x509.Certificate | tuple[str, int]:
        """POST /simpleenroll (RFC 7030 4.2.1).

        Returns:
            The certificate, or ``(reason, retry_after seconds)`` while approval is pending (202).

        Raises:
            AuthenticationError: 401/403 (wrong token, denied).
            ServiceBusy: 503 after the bounded retries on Retry-After.
            RenewalError: any other refusal or network failure.
        """
        headers = {"Content-Type": PKCS10}
        if token:
            headers["Authorization"] = "Basic " + base64.b64encode(f"{name}:{token}".encode()).decode()
        response = self._enrollment(f"{EST_PREFIX}/simpleenroll", body=encode_csr(csr), headers=headers, client=False)
        if response.status == 200:
            return decode_certs_only(response.body)[0]
        if response.status == 202:
            return response.reason, int(response.headers.get("Retry-After", "10") or 10)
        if response.status in (401, 403):
            raise AuthenticationError(f"the EST server refused the enrollment: {response.reason}")
        raise RenewalError(f"simpleenroll: HTTP {response.status}: {response.reason}")

    def simple_reenroll(self, csr: x509.CertificateSigningRequest, current: Credential) -> tuple[x509.Certificate, tuple[x509.Certificate, ...]]:
        """POST /simplereenroll (RFC 7030 4.2.2), authenticated by the current certificate; the
        chain comes from /cacerts. A :class:`pki_agent.rotation.rotate.RenewalSource`.

        Raises:
            CredentialUnusable: the current certificate can no longer renew (revoked, expired,
                another CA, unknown to the CA; said by the server's ``Pkictl-Refusal`` header or
                its TLS alert).
            AuthenticationError: any other 401/403.
            ServiceBusy: 503 after the bounded retries on Retry-After.
            RenewalError: any other failure (the current credential stays in service).
        """
        response = self._enrollment(f"{EST_PREFIX}/simplereenroll", body=encode_csr(csr), headers={"Content-Type": PKCS10},
                                    client=True)
        refusal = response.headers.get(REFUSAL_HEADER) if response.headers else None
        if response.status == 403 and refusal:
            raise CredentialUnusable(refusal, f"the EST server refused the renewal: {response.reason}")
        if response.status in (401, 403):
            raise AuthenticationError(f"the EST server refused the renewal: {response.reason}")
        if response.status != 200:
            raise RenewalError(f"simplereenroll: HTTP {response.status}: {response.reason}")
        certificate = decode_certs_only(response.body)[0]
        return certificate, select_chain(certificate, self.cacerts())

    def crl_pem(self, *, etag: str | None = None) -> tuple[bytes | None, str | None]:
        """GET /crl.pem: every CRL the CA publishes, PEM; conditional on ``etag`` (RFC 9110
        13.1.2), so that polling an unchanged CRL every minute costs one small round trip.

        Returns:
            ``(pem, etag)``: ``pem`` is None when the server answered 304 Not Modified.

        Raises:
            RenewalError: unreachable, or anything but a PEM CRL or a 304.
        """
        response = self._request("GET", "/crl.pem", headers={"If-None-Match": etag} if etag else None)
        if response.status == 304 and etag:
            return None, etag
        if response.status != 200 or b"-----BEGIN X509 CRL-----" not in response.body:
            raise RenewalError(f"{self.base_url}/crl.pem: HTTP {response.status}: {response.reason[:200]}")
        return response.body, response.headers.get("ETag")

    def gateway_report(self, body: bytes) -> None:
        """POST this gateway's connection table (JSON, :mod:`pkictl.fleet_report`) to the CA,
        authenticated by the gateway's current certificate.

        Raises:
            RenewalError: unreachable, or refused (the answer's status and text).
        """
        response = self._request("POST", REPORT_PATH, body=body, headers={"Content-Type": REPORT_CONTENT_TYPE}, client=True)
        if response.status != 204:
            raise RenewalError(f"{self.base_url}{REPORT_PATH}: HTTP {response.status}: {response.reason[:200]}")

    def wait_for_certificate(
        self, csr: x509.CertificateSigningRequest, *, name: str, token: str | None, deadline: float,
        say: Callable[[str], None], sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
    ) -> x509.Certificate:
        """Enroll, polling while the request waits for approval, until ``deadline`` (monotonic s).

        Raises:
            RenewalError: still pending at the deadline.
        """
        code = approval_code(csr.public_key())
        told = False
        while True:
            result = self.simple_enroll(csr, name=name, token=token)
            if isinstance(result, x509.Certificate):
                return result
            reason, retry_after = result
            if not told:
                say(f"waiting for approval: code {code}; on the CA host: pkictl requests, then pkictl approve {name} --code {code}")
                told = True
            if clock() + retry_after > deadline:
                raise RenewalError(f"no approval before the deadline ({reason}); run pki-agent enroll again to keep waiting")
            sleep(retry_after)


def _retry_after(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """Seconds from a Retry-After field (RFC 9110 10.2.3: delay-seconds or an HTTP-date), at
    least 0; None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(int(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now()) if when.tzinfo is not None else None


_LOOP: dict[int, asyncio.AbstractEventLoop] = {}  # by process id: a forked child starts its own
_LOOP_LOCK = threading.Lock()


def _client_loop() -> asyncio.AbstractEventLoop:
    """The event loop every EST request of this process runs on, in a thread of its own.

    A loop per request (``asyncio.run``) would close before the TLS transport's shutdown has
    run and leave its socket unclosed; this one lives as long as the process, so a closed
    connection finishes closing."""
    with _LOOP_LOCK:
        loop = _LOOP.get(os.getpid())
        if loop is None:
            loop = _LOOP[os.getpid()] = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="est-client", daemon=True).start()
        return loop


async def _exchange(method: str, url: str, body: bytes | None, headers: dict, context: ssl.SSLContext) -> _Response:
    """One request on a connection of its own, with aiohttp (the HTTP library of pkictl serve too)."""
    connector = aiohttp.TCPConnector(ssl=context, force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=_TIMEOUT)) as session:
        async with session.request(method, url, data=body, headers=headers, allow_redirects=False) as response:
            return _Response(response.status, response.headers, await response.read())


def _cause(exc: BaseException) -> BaseException | None:
    """The TLS or socket error under aiohttp's wrapping of ``exc``: what says why."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return exc.certificate_error
    if isinstance(exc, aiohttp.ClientSSLError) and exc.os_error is not None:
        return exc.os_error
    seen: BaseException = exc
    while seen.__cause__ is not None and not isinstance(seen, (ssl.SSLError, ConnectionResetError)):
        seen = seen.__cause__
    return seen


def _refused_after_handshake(reason) -> bool:
    """An alert, EOF or reset once our certificate was sent: how TLS 1.3 says "refused"."""
    if isinstance(reason, (ssl.SSLError, ConnectionResetError, aiohttp.ServerDisconnectedError)):
        return True
    text = str(reason).upper()
    return any(word in text for word in ("ALERT", "EOF", "RESET", "REMOTE END CLOSED"))


def refresh_crl(client: "ESTClient", crl: Path, etag: str | None = None) -> tuple[bool, str | None]:
    """Fetch the CA's CRLs into ``crl`` (atomically, only when they changed).

    Args:
        etag: the ETag of the last fetch, for a conditional request.

    Returns:
        ``(changed, etag)``.

    Raises:
        CRLRollbackError: the server's CRL of some issuer is older than the installed one (a lower
            CRL number, or the same with other content: RFC 5280 5.2.3), as a replaying or
            rolled-back server would send; the file is unchanged.
        PKIError, OSError: the server could not be reached or answered garbage; the file is
            unchanged then.
    """
    from pkictl.crl_numbers import held_crls, refuse_older
    from pkictl.revocation import crls_from_pem, load_crls

    data, etag = client.crl_pem(etag=etag)
    if data is None or (crl.exists() and crl.read_bytes() == data):
        return False, etag
    offered = crls_from_pem(data, source=f"{client.base_url}/crl.pem")  # every block parses before it replaces the file
    try:
        installed = load_crls(crl)
    except StoreError:
        installed = []  # none yet, or unreadable: nothing to compare with, the fetched file replaces it
    refuse_older(held_crls(installed), offered, source=f"{client.base_url}/crl.pem (installed: {crl})")
    atomic_write(crl, data)
    return True, etag


def refresh_trust_bundle(client: "ESTClient", store: CredentialStore) -> list[str]:
    """Fetch the trust bundle into ``store``'s ``ca.pem``; write it only if it changed.

    The trust bundle is taken only if it still holds one of the current anchors: it was fetched
    over a channel authenticated by them, and a root rotation adds the new root before the old
    one goes (continuity).

    Returns:
        What changed, as log phrases (empty when nothing did).

    Raises:
        PKIError, OSError: the server could not be reached or answered garbage; nothing on disk
            changed then.
    """
    roots = [c for c in client.cacerts() if self_signed(c)]
    anchors = store.load_trust_anchors()
    if any(a in roots for a in anchors) and set(roots) != set(anchors):
        store.write_trust_anchors(roots)
        return [f"trust bundle updated: {len(roots)} root(s)"]
    return []
