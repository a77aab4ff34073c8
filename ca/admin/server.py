"""The admin listener of ``pkictl serve``: the operator's web page (fleet, pairing requests,
revocation, expiry timeline) over HTTPS on its own port, open only to operator certificates.

TLS is mutual with ``CERT_OPTIONAL``: a browser without a certificate gets a page saying how to
get one (``pkictl enroll-operator``), one with a certificate that is no operator's (a node's)
gets 403. Every POST needs the CSRF token bound to the operator's certificate and a same-origin
``Origin`` (and ``Sec-Fetch-Site`` when sent); every answer carries a Content-Security-Policy
without inline script and forbids framing. Each action is audited under the operator's name.
See docs/design.md, "Admin listener".
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import logging
import secrets
import ssl
from typing import TYPE_CHECKING, Awaitable, Callable, Sequence

from aiohttp import web

from .page import SCRIPT, STYLE, dashboard, how_to_page, refused_page, result_page
from ..admission import AdmissionLimits
from ..errors import NotEnrolledError, PKIError
from ..est.front import FrontLimits, TLSFront
from ..fleet import fleet_document, fleet_view, gateway_states
from ..logfmt import bare, quoted
from ..operators import NotAnOperator, OperatorIdentity, identify_operator
from ..renewal import certificate_state, renewal_time
from .timeline import Bar, timeline_svg

if TYPE_CHECKING:
    from ..authority import CertificateAuthority

__all__ = ["AdminService", "SECURITY_HEADERS", "CSP"]

log = logging.getLogger("pkictl.admin.server")

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers that predate it
    "X-Content-Type-Options": "nosniff",
    # Not no-referrer: under it Chromium sends "Origin: null" with a form's POST, which the
    # same-origin check must refuse; same-origin still leaks nothing to another site.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
_STATIC = {"/admin.js": (SCRIPT, "text/javascript"), "/admin.css": (STYLE, "text/css")}
_MAX_FORM = 4096  # bytes: the largest form here is a few hundred
_DISCONNECTED_AFTER = dt.timedelta(minutes=10)  # as pkictl nodes' default
# A page for a few people: few connections, most of them kept for clients with a certificate.
_LIMITS = FrontLimits(admission=AdmissionLimits(total=64, per_peer=32, reserved=32))


def _html(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text, content_type="text/html", charset="utf-8")


class AdminService:
    """The admin page of one CA on ``listen``.

    Args:
        ca: the loaded CA, used on the serving event loop (its inventory connection is this thread's).
        listen: ``(host, port)``; port 0 picks a free one.
        context: returns the TLS server context a new connection gets (the EST service's: its own
            certificate, ``CERT_OPTIONAL``, verifying against the trust anchor); asked once per
            connection, so that a renewed service certificate is served without a restart.
        hosts: the names and addresses the page is reached by (those of the service certificate);
            a request whose Host is another gets 421, so that a name rebound to this host by
            another site's DNS (DNS rebinding) does not reach the page.
        refresh: seconds between the page's polls of /fleet.json.
    """

    def __init__(self, ca: CertificateAuthority, listen: tuple[str, int], context: Callable[[], ssl.SSLContext], *,
                 hosts: Sequence[str] = (), refresh: float = 3.0) -> None:
        self.ca = ca
        self.listen = listen
        self.hosts = frozenset(h.lower().strip("[]") for h in (*hosts, listen[0]) if h not in ("", "0.0.0.0", "::"))
        self._context = context
        self.refresh = refresh
        self._secret = secrets.token_bytes(32)  # CSRF tokens die with the process: a restart asks for a reload
        self._runner: web.AppRunner | None = None
        self._front: TLSFront | None = None

    # -- identity and CSRF -----------------------------------------------------------------------

    def csrf_token(self, operator: OperatorIdentity) -> str:
        """The token every form of ``operator`` carries: HMAC-SHA256 of their certificate's
        fingerprint under this process's secret (a page served to one certificate is no use with
        another, and nothing is stored)."""
        return hmac.new(self._secret, b"pkictl-admin-csrf:" + operator.fingerprint.encode(), hashlib.sha256).hexdigest()

    def _operator(self, request: web.Request) -> OperatorIdentity:
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        return identify_operator(der, inventory=self.ca.inventory, trust_domain=self.ca.settings.trust_domain, now=self.ca.clock.now())

    def _same_origin(self, request: web.Request) -> str | None:
        """Why a POST is not same-origin, or None (the CSRF defence besides the token: a form
        posted from another site carries that site's Origin, and Sec-Fetch-Site cross-site)."""
        expected = f"https://{request.host}"
        origin = request.headers.get("Origin")
        if origin is None:
            return f"no Origin header; want Origin: {expected}"
        if origin != expected:
            return f"Origin {quoted(origin)}; want Origin: {expected}"
        site = request.headers.get("Sec-Fetch-Site")
        if site is not None and site != "same-origin":
            return f"Sec-Fetch-Site {quoted(site)}; want same-origin"
        return None

    # -- HTTP ------------------------------------------------------------------------------------

    def app(self, front: TLSFront) -> web.Application:
        """The routes; ``front``'s middleware times each request's body."""
        app = web.Application(client_max_size=_MAX_FORM, middlewares=[self._headers, front.middleware])
        app.add_routes([
            web.get("/", self.page),
            web.get("/fleet.json", self.fleet_json),
            web.get("/admin.js", self.static),
            web.get("/admin.css", self.static),
            web.post("/approve", self._action(self._approve)),
            web.post("/deny", self._action(self._deny)),
            web.post("/revoke", self._action(self._revoke)),
        ])
        return app

    @web.middleware
    async def _headers(self, request: web.Request, handler) -> web.StreamResponse:
        """The security headers on every answer, refusals and aiohttp's own 404/405 included."""
        try:
            host = (request.url.host or "").lower().strip("[]")
        except ValueError:  # a Host header that is no host at all
            host = ""
        try:
            if host not in self.hosts:
                log.warning("admin refused peer=%s reason='misdirected' detail=%s", request.remote, quoted(f"Host {request.host}"))
                response = _html(421, refused_page(title="421 Misdirected Request", detail=f"Host {quoted(request.host)}; want one of "
                                                   f"{', '.join(sorted(self.hosts))} (the names of this service's certificate)"))
            else:
                response = await handler(request)
        except web.HTTPException as exc:
            response = _html(exc.status, refused_page(title=f"{exc.status} {exc.reason}", detail=f"{request.method} {request.path}"))
            if "Allow" in exc.headers:
                response.headers["Allow"] = exc.headers["Allow"]
        except NotAnOperator as exc:
            log.warning("admin refused peer=%s reason=%s detail=%s", request.remote, bare(exc.reason), quoted(str(exc)))
            if exc.reason == "no certificate":
                response = _html(403, how_to_page(origin=f"https://{request.host}"))
            else:
                response = _html(403, refused_page(title="Not an operator certificate", detail=str(exc)))
        response.headers.update(SECURITY_HEADERS)
        return response

    async def static(self, request: web.Request) -> web.Response:
        """The page's script and style sheet (same origin: script-src 'self'), to anyone: no data in them."""
        text, content_type = _STATIC[request.path]
        return web.Response(text=text, content_type=content_type, charset="utf-8")

    def _fleet(self, now: dt.datetime) -> dict:
        rows = fleet_view(self.ca, now=now, disconnected_after=_DISCONNECTED_AFTER)
        fleet = fleet_document(rows, gateway_states(self.ca, now=now))
        requests = [{"name": r["name"], "code": r["code"], "peer": r["peer"], "age_seconds": int(now.timestamp() - r["requested_at"])}
                    for r in self.ca.inventory.pending_requests(now=now, ttl=self.ca.settings.pending_request_ttl)]
        return {**fleet, "requests": requests, "now": now.isoformat()}

    def _bars(self, now: dt.datetime) -> list[Bar]:
        fraction = self.ca.settings.renewal_fraction
        bars = []
        for record in self.ca.inventory.records():
            if record.kind in ("root", "issuing") or record.not_before is None or record.not_after is None:
                continue
            state = "revoked" if record.status == "revoked" else certificate_state(now, record.not_before, record.not_after, fraction=fraction)
            due = renewal_time(record.not_before, record.not_after, fraction=fraction) if record.kind != "operator" else None
            bars.append(Bar(f"{record.kind} {record.name}", record.serial, record.not_before, record.not_after, due, state))
        return bars

    async def page(self, request: web.Request) -> web.Response:
        """GET /: the fleet, the pairing requests and the timeline, for an operator."""
        operator = self._operator(request)
        now = self.ca.clock.now()
        fleet = self._fleet(now)
        text = dashboard(operator=operator.name, fleet=fleet, requests=fleet["requests"], timeline=timeline_svg(self._bars(now), now=now),
                         token=self.csrf_token(operator), refresh=self.refresh, now=now)
        return _html(200, text)

    async def fleet_json(self, request: web.Request) -> web.Response:
        """GET /fleet.json: what the page's script polls (``pkictl nodes --json`` plus the requests)."""
        self._operator(request)
        return web.json_response(self._fleet(self.ca.clock.now()))

    def _action(self, act: Callable[[OperatorIdentity, dict[str, str]], str]) -> Callable[[web.Request], Awaitable[web.Response]]:
        """A POST handler: operator, same origin, CSRF token, then ``act`` (which returns what was
        done); every refusal and every outcome is audited under the operator's name."""
        async def handler(request: web.Request) -> web.Response:
            operator = self._operator(request)
            action = request.path.strip("/")
            form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
            problem = self._same_origin(request)
            if problem is None and not hmac.compare_digest(form.get("csrf", ""), self.csrf_token(operator)):
                problem = "the form's CSRF token is missing or not this operator's; reload the page and try again"
            if problem is not None:
                self._audit_refusal(operator, action, form, "CSRFRefused", problem)
                return _html(403, refused_page(title="Refused: not a request from this page", detail=problem))
            try:
                done = act(operator, form)
            except PKIError as exc:
                log.warning("admin %s refused operator=%s detail=%s", action, bare(operator.name), quoted(str(exc)))
                return _html(400, refused_page(title=f"{action} refused", detail=str(exc)))
            log.info("admin %s by operator=%s: %s", action, bare(operator.name), quoted(done))
            return _html(200, result_page(message=done))

        return handler

    def _audit_refusal(self, operator: OperatorIdentity, action: str, form: dict[str, str], error: str, reason: str) -> None:
        log.warning("admin %s refused operator=%s reason=%s", action, bare(operator.name), quoted(reason))
        try:
            self.ca.audit.append("refused", operation=f"admin {action}", subject=form.get("name") or form.get("serial") or "?",
                                 error=error, reason=reason, operator=operator.name)
        except (OSError, PKIError) as exc:
            log.error("cannot record a refusal in the audit log: %s", exc)

    def _approve(self, operator: OperatorIdentity, form: dict[str, str]) -> str:
        try:
            name, code = _field(form, "name"), _field(form, "code")
            replaced = self.ca.approve(name, code=code, by=operator.name)
        except PKIError as exc:  # the CA audits no refused approval itself
            self._audit_refusal(operator, "approve", form, type(exc).__name__, str(exc))
            raise
        also = "".join(f"; it replaces serial {r.serial:x}, revoked (superseded) once the new one is issued" for r in replaced)
        return f"approved {name} ({code.upper()}): its agent gets the certificate at its next poll{also}"

    def _deny(self, operator: OperatorIdentity, form: dict[str, str]) -> str:
        try:
            name = _field(form, "name")
            count = self.ca.deny(name, by=operator.name)
        except PKIError as exc:
            self._audit_refusal(operator, "deny", form, type(exc).__name__, str(exc))
            raise
        return f"denied {count} request(s) of {name}"

    def _revoke(self, operator: OperatorIdentity, form: dict[str, str]) -> str:
        try:
            serial, reason = _field(form, "serial"), _field(form, "reason")
            # By serial only, and one that exists: find_revocable would take a hex-looking
            # unknown serial for a name (node "abc") and revoke every certificate of it.
            record = self.ca.inventory.get(int(serial, 16)) if all(c in "0123456789abcdefABCDEF" for c in serial) else None
            if record is None:
                raise NotEnrolledError(f"serial {quoted(serial)}: no certificate of this CA has it; reload the page")
        except PKIError as exc:
            self._audit_refusal(operator, "revoke", form, type(exc).__name__, str(exc))
            raise
        records = self.ca.revoke(f"{record.serial:x}", reason=reason, by=operator.name)  # audits its own refusals, with the operator
        return "revoked " + ", ".join(f"{r.kind} {r.name} serial {r.serial:x}" for r in records) + f" ({reason}); the CRL is re-signed"

    # -- process ---------------------------------------------------------------------------------

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Where the listener is bound, once started."""
        assert self._front is not None, "started"
        return self._front.addresses

    async def start(self) -> None:
        """Bind and serve; TLS per connection by :class:`pkictl.est.front.TLSFront`, as the EST
        service's (each new connection takes the current context; refused handshakes are logged).

        Raises:
            PKIError: the address cannot be bound (:func:`pkictl.sockets.bind_problem` says why and what to do).
        """
        def protocol() -> asyncio.BaseProtocol:
            assert runner.server is not None, "made by setup()"
            return runner.server()

        front = self._front = TLSFront(protocol, self._context, handshake_timeout=10.0, limits=_LIMITS)
        runner = self._runner = web.AppRunner(self.app(front), access_log=None)
        await runner.setup()
        try:
            await front.start(*self.listen)
        except PKIError:
            await self.close()
            raise

    async def close(self) -> None:
        if self._front is not None:
            await self._front.close()
            self._front = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def _field(form: dict[str, str], name: str) -> str:
    value = form.get(name, "").strip()
    if not value or len(value) > 128:
        raise PKIError(f"the form field {name} is {'missing' if not value else 'too long'}; use the page's own buttons")
    return value
