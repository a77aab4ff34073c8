"""One log line per EST request: ``answered`` (INFO) or ``refused`` (WARNING), with the peer, the
claimed identity, the HTTP status and the exact reason; everything from the peer escaped.

Every 4xx and 5xx answer is a refusal; 202 (waiting for approval, RFC 7030 4.2.3) is not. The
line follows the gateway listener's format (``refused peer=ADDR:PORT reason='...' ...``)::

    refused peer=192.168.1.20:51514 method=POST path='/.well-known/est/simplereenroll' status=403 reason='revoked' node=TW serial=3a9f... detail='certificate serial 3a9f... is revoked (...)'
    answered peer=192.168.1.20:51530 method=POST path='/.well-known/est/simplereenroll' status=200 node=TW serial=51c2... duration=4.1ms

The identity is what the request claims: the client certificate's CN and serial on
simplereenroll, the HTTP Basic name on simpleenroll, and the CSR's CN (``csr=``). A request
aiohttp could not even parse (garbage after the handshake) is logged the same way, without a
traceback: a client's mistake is a line, never a stack.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, ClassVar

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ..errors import (AccessDenied, AlreadyEnrolledError, AuditError, AuthenticationError, CertificateUnusable, InventoryError,
                     InvalidNameError, KeyProtectionError, LintError, NotEnrolledError, PassphraseError, PKIError, PolicyError,
                     RequestLimitError, StoreError)
from ..logfmt import bare, peer_name, quoted

__all__ = ["BadAuthorization", "MalformedRequest", "NoClientCertificate", "QuietClientErrors", "Refusal", "RequestLog", "classify", "note", "outcome", "remember_peer"]

log = logging.getLogger("pkictl.serve")

_OUTCOME = web.RequestKey("pkictl.outcome", tuple)  # (reason, detail), set by the service's middleware
_IDENTITY = web.RequestKey("pkictl.identity", dict)  # {"node": ..., "serial": ..., "csr": ...}
_PEER = web.RequestKey("pkictl.peer", str)  # host:port, kept while the transport is there


class NoClientCertificate(AuthenticationError):
    """simplereenroll without a TLS client certificate (RFC 7030 4.2.2 authenticates by it)."""


class BadAuthorization(AuthenticationError):
    """simpleenroll with an Authorization header that is not HTTP Basic NAME:TOKEN."""


class MalformedRequest(PKIError):
    """A simpleenroll / simplereenroll body that is no CSR, or sent with the wrong Content-Type:
    400 on both (on simplereenroll a PolicyError would read as a 403, "this certificate may not
    renew", which a client takes as final)."""


@dataclasses.dataclass(frozen=True)
class Refusal:
    """How the service answers an exception: status, stable reason, the message for the client."""

    status: int
    reason: str
    detail: str


# The other PolicyError messages of CertificateAuthority.simple_reenroll (RFC 7030 4.2.2) -> reasons;
# a certificate that can no longer renew says why itself (CertificateUnusable.reason).
_RENEWAL_REASONS = (
    ("differs from the current certificate", "identity changed"),
    ("alternative names differ", "identity changed"),
    ("reuses the current key", "key reused"),
    ("signature does not verify", "bad CSR"),
    ("rotate the issuing CA first", "issuing CA expiring"),
)
_HTTP_REASONS = {400: "bad request", 404: "not found", 405: "method not allowed", 408: "body timeout", 413: "body too large",
                 429: "too many requests", 503: "unavailable"}


def classify(exc: BaseException, *, renewing: bool) -> Refusal | None:
    """The answer to ``exc`` raised while handling an EST request, or None if it is no refusal.

    Args:
        exc: what the handler raised.
        renewing: the request is a simplereenroll (a PolicyError then refuses the certificate,
            403; on simpleenroll it refuses the request, 400).
    """
    if isinstance(exc, web.HTTPException):
        return Refusal(exc.status, _HTTP_REASONS.get(exc.status, exc.reason or "refused"), exc.reason or str(exc))
    detail = " ".join(str(exc).split())
    if isinstance(exc, MalformedRequest):
        return Refusal(400, "bad request", detail)
    if isinstance(exc, NoClientCertificate):
        return Refusal(401, "no client certificate", detail)
    if isinstance(exc, BadAuthorization):
        return Refusal(401, "bad authorization", detail)
    if isinstance(exc, AuthenticationError):
        return Refusal(401, "bad token", detail)
    if isinstance(exc, CertificateUnusable):  # revoked, expired, not yet valid, another CA, unknown
        return Refusal(403, exc.reason, detail)
    if isinstance(exc, AccessDenied):
        return Refusal(403, "denied", detail)
    if isinstance(exc, AlreadyEnrolledError):
        return Refusal(403, "already enrolled", detail)
    if isinstance(exc, NotEnrolledError):
        return Refusal(403, "not enrolled", detail)
    if isinstance(exc, InvalidNameError):
        return Refusal(400, "invalid name", detail)
    if isinstance(exc, RequestLimitError):
        return Refusal(429, "too many pending requests", detail)
    if isinstance(exc, LintError):
        return Refusal(403 if renewing else 400, "lint", detail)
    if isinstance(exc, PolicyError):
        if renewing:
            reason = next((r for pattern, r in _RENEWAL_REASONS if pattern in detail), "policy")
            return Refusal(403, reason, detail)
        return Refusal(400, "policy", detail)
    if isinstance(exc, (KeyProtectionError, PassphraseError, StoreError, InventoryError, AuditError)):
        return Refusal(500, "CA error", detail)  # the CA host's own files, not the client's request
    if isinstance(exc, PKIError):
        return Refusal(400, "refused", detail)
    return None


def note(request: web.BaseRequest, **identity: object) -> None:
    """Remember what ``request`` claims (``node``, ``serial``, ``csr``) for its log line."""
    request.setdefault(_IDENTITY, {}).update((k, v) for k, v in identity.items() if v is not None)


def outcome(request: web.BaseRequest, reason: str | None, detail: str | None) -> None:
    """Set the reason and detail of ``request``'s log line (the middleware, once per request)."""
    request[_OUTCOME] = (reason, detail)


class RequestLog(web.AbstractAccessLogger):
    """aiohttp's access logger, writing the lines described in the module docstring.

    aiohttp calls it once per answered request, including requests it could not parse and
    answered itself (no outcome set: reason ``bad HTTP request``).
    """

    # Told of every answer, (path, status, reason, seconds), for the metrics; see counting(). A
    # tuple, not a bare function: a function as class attribute would become a method.
    on_answer: ClassVar[tuple[Callable[[str, int, "str | None", float], None], ...]] = ()

    @classmethod
    def counting(cls, on_answer: Callable[[str, int, "str | None", float], None]) -> type["RequestLog"]:
        """This logger, also calling ``on_answer(path, status, reason, seconds)`` for every answer
        (``path`` is "" for a request aiohttp could not parse)."""
        return type("CountingRequestLog", (cls,), {"on_answer": (on_answer,)})

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        try:
            if self.on_answer:
                handled = _OUTCOME in request
                reason = request[_OUTCOME][0] if handled else "bad HTTP request"
                for hook in self.on_answer:
                    hook(request.path if handled else "", response.status, reason, time)
            self._log(request, response, time)
        except Exception:  # a log line must never break an answer
            log.exception("could not log a request")

    @staticmethod
    def _log(request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        status = response.status
        if status < 400 and not log.isEnabledFor(logging.INFO):
            return
        handled = _OUTCOME in request
        reason, detail = request[_OUTCOME] if handled else ("bad HTTP request", getattr(response, "text", None) or response.reason)
        peer = request.get(_PEER) or _peer(request)
        identity = request.get(_IDENTITY, {})
        fields = f"peer={peer}"
        if handled:
            fields += f" method={bare(request.method)} path={quoted(request.path)}"
        fields += f" status={status}"
        if status >= 400 or reason:
            fields += f" reason={quoted(reason)}"
        if "node" in identity:
            fields += f" node={bare(identity['node'])}"
        if "serial" in identity:
            fields += f" serial={identity['serial']:x}"
        if "csr" in identity:
            fields += f" csr={bare(identity['csr'])}"
        if status >= 400:
            event = {"event": "refused", "peer": peer, "status": status, "reason": reason, "detail": detail,
                     **{k: (f"{v:x}" if k == "serial" else v) for k, v in identity.items()}}
            level = logging.ERROR if status == 500 else logging.WARNING  # 500: the CA's own trouble
            log.log(level, "refused %s detail=%s", fields, quoted(" ".join(str(detail).split())), extra={"pki_event": event})
        else:  # the common case: a plain line, no fields dict (one per renewal under load)
            suffix = f" detail={quoted(detail)}" if detail else ""
            log.info("answered %s duration=%.1fms%s", fields, time * 1000, suffix)


def remember_peer(request: web.BaseRequest) -> str:
    """``host:port`` of ``request``'s client, kept for its log line (the transport may be gone by then)."""
    peer = request.get(_PEER)
    if peer is None:
        peer = request[_PEER] = _peer(request)
    return peer


def _peer(request: web.BaseRequest) -> str:
    transport = request.transport
    return peer_name(transport.get_extra_info("peername") if transport is not None else None)


class QuietClientErrors(logging.Filter):
    """Drop aiohttp's "Error handling request" tracebacks for requests it could not parse: the
    client's mistake, which :class:`RequestLog` logs as a refusal line. Anything else passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, HttpProcessingError)
