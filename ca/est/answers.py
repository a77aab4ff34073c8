"""How the EST service words its 4xx answers: what was wrong and what was expected, with every
value from the peer escaped and cut short (docs/design.md, "What a CSR must carry").

The refusals of the CA itself (a wrong token, a revoked certificate) say so in their own
messages; this module words the ones of the HTTP layer (unknown path, wrong method, a body too
large, a wrong Content-Type, a body that is no CSR) and the expectations they point to.
"""

from __future__ import annotations

from aiohttp import HttpVersion11, web

from .wire import EST_PREFIX, PKCS10
from .csrattrs import IDENTITY_FORM
from ..logfmt import quoted
from ..policy import MAX_CSR_BYTES

__all__ = [
    "BASIC_WANTED",
    "CLIENT_CERTIFICATE_WANTED",
    "CSR_BODY_WANTED",
    "MAX_ANSWER_CHARS",
    "ROUTES",
    "echo",
    "expect_continue",
    "http_refusal",
    "text_answer",
    "unrouted",
]

# (method, path, what it is): every path pkictl serve answers (RFC 7030 3.2.2, 4.1, 4.2, 4.5).
ROUTES = (
    ("GET", f"{EST_PREFIX}/cacerts", "the CA certificates"),
    ("GET", f"{EST_PREFIX}/csrattrs", "what a CSR must carry"),
    ("POST", f"{EST_PREFIX}/simpleenroll", "a first certificate"),
    ("POST", f"{EST_PREFIX}/simplereenroll", "a renewal"),
    ("GET", "/crl", "the issuing CA's CRL, DER"),
    ("GET", "/crl.pem", "every active CRL, PEM"),
)
# RFC 7030 operations pkictl does not offer, and why (a client probing for them learns it).
_NOT_OFFERED = {
    f"{EST_PREFIX}/serverkeygen": "pkictl never makes the key of a node: a key is made where it is used (RFC 7030 4.4 is optional)",
    f"{EST_PREFIX}/fullcmc": "pkictl does not speak Full CMC (RFC 7030 4.3 is optional)",
}
_ECHO_CHARS = 100  # of a path, method or header value quoted back to the client
MAX_ANSWER_CHARS = 2000  # of any answer's text: a CSR's subject is quoted in some, and a CSR is up to 16 KiB

# No single quotes in these: a log line quotes a detail as repr does, and would switch to double quotes.
BASIC_WANTED = ("HTTP Basic authentication with user = the node name and password = the one-time token that "
                "pkictl enroll-node NAME --token printed on the CA host (e.g. curl -u TW:TOKEN), or no "
                "Authorization header at all to wait for approval by the operator")
CSR_BODY_WANTED = (f"the body base64 of a DER PKCS#10 CSR (RFC 7030 4.2.1), at most {MAX_CSR_BYTES} bytes, e.g. "
                   "openssl req -new ... -outform DER | openssl base64, with subject CN=<name> or empty and a "
                   f"subjectAltName, if any, of exactly URI:{IDENTITY_FORM}; GET {EST_PREFIX}/csrattrs lists the key types accepted")
CLIENT_CERTIFICATE_WANTED = ("the certificate being renewed as the TLS client certificate, sent with its chain (e.g. curl "
                             "--cert fullchain.pem --key privkey.pem); a first certificate comes from simpleenroll")


def echo(value: object) -> str:
    """``value`` as the answer may quote it: escaped (:func:`pkictl.logfmt.quoted`) and at most
    about 100 characters (cut with ``...``)."""
    text = str(value)
    return quoted(text) if len(text) <= _ECHO_CHARS else quoted(text[:_ECHO_CHARS]) + "..."


def _served() -> str:
    return ", ".join(f"{method} {path}" for method, path, _ in ROUTES)


def http_refusal(exc: web.HTTPException, request: web.BaseRequest) -> str | None:
    """The text of an aiohttp refusal that aiohttp words only by its status (404, 405, 413), or
    None for any other.

    Args:
        exc: what aiohttp raised (routing, or reading a body over ``client_max_size``).
        request: the request refused; its method and path are quoted back escaped and cut short.
    """
    if isinstance(exc, web.HTTPNotFound):
        why = _NOT_OFFERED.get(request.path.rstrip("/"))
        if why:
            return f"{echo(request.path)} is not offered: {why}; this EST server serves {_served()}"
        return f"no resource at {echo(request.path)}: this EST server serves {_served()} (one CA, no CA label in the path)"
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = sorted(exc.allowed_methods - {"HEAD"}) or sorted(exc.allowed_methods)
        want = " or ".join(allowed)
        hint = f" with {CSR_BODY_WANTED}" if allowed == ["POST"] else ""
        return f"method {echo(request.method)} on {echo(request.path)}: want {want}{hint}"
    if isinstance(exc, web.HTTPRequestEntityTooLarge) and request.path.startswith("/pkictl/"):
        return (f"request body over {MAX_CSR_BYTES} bytes: a gateway report is at most {MAX_CSR_BYTES} bytes of JSON "
                "(about 60 nodes)")
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return (f"request body over {MAX_CSR_BYTES} bytes: want a CSR body of at most {MAX_CSR_BYTES} bytes "
                f"(a base64 P-256 or RSA-4096 CSR is under 4 KiB; Content-Type {PKCS10})")
    return None


def text_answer(status: int, reason: str, **headers: str) -> web.Response:
    """An EST error: the status code and a plain-text reason (RFC 7030 4.2.3), at most
    :data:`MAX_ANSWER_CHARS` characters."""
    if len(reason) > MAX_ANSWER_CHARS:
        reason = reason[:MAX_ANSWER_CHARS] + "..."
    return web.Response(status=status, text=reason + "\n", content_type="text/plain", headers=headers)


async def expect_continue(request: web.BaseRequest) -> web.StreamResponse | None:
    """The Expect handler of every route (RFC 9110 10.1.1): ``100-continue`` is answered as
    aiohttp's own handler does; any other expectation is a 417 quoting it escaped. aiohttp's own
    417 fails with a 500 on a value that is no UTF-8, before any middleware can answer it
    (docs/design.md, "Fuzz tests")."""
    expect = request.headers.get("Expect", "")
    if expect.lower() != "100-continue":
        return text_answer(417, f"Expect {echo(expect)}: want 100-continue or no Expect header (RFC 9110 10.1.1)")
    if request.version == HttpVersion11:  # HTTP/1.0 has no 100 (Continue)
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the 100 is not part of the answer's size
    return None


async def unrouted(request: web.BaseRequest) -> web.StreamResponse:
    """The handler of every path and method no route serves: the 404 or 405 aiohttp's router
    would answer, raised here so that an Expect header on an unknown path meets
    :func:`expect_continue` too, and the refusal is worded by :func:`http_refusal`.

    Raises:
        web.HTTPMethodNotAllowed: a path of :data:`ROUTES` with another method.
        web.HTTPNotFound: any other path.
    """
    allowed = {method for method, path, _ in ROUTES if path == request.path}
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed | ({"HEAD"} if "GET" in allowed else set()))
    raise web.HTTPNotFound()
