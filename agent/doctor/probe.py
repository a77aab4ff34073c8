"""Network probes of ``pki-agent doctor``: a test connection to the gateway as this node, and one
request to the EST server for its clock (HTTP ``Date``) and its CRL. Every wait is bounded.

What a node can learn from a refused test connection depends on the gateway. An OpenSSL server
(nginx, haproxy, ``openssl s_server``) sends an alert that names the reason: a leaf sent without
its chain arrives as ``TLSV1_ALERT_UNKNOWN_CA``, no certificate as
``TLSV13_ALERT_CERTIFICATE_REQUIRED``, a revoked one as ``SSLV3_ALERT_CERTIFICATE_REVOKED``;
pki-agent's own listener sends OpenSSL's alerts too. That is the outcome ``refused``: the gateway
refused this node's certificate. What pki-agent's listener decides after the handshake (the
allow list, EKU, a CA certificate as client) and an upstream it cannot connect to both end the
connection with a close_notify and no alert, right after the node's TLS 1.3 handshake
"succeeded": the outcome ``closed``, which the node cannot split further (docs/design.md, "What
a node can tell from the gateway's refusals"); the doctor then names the cause from this host's
own files where it can (tests/test_doctor_gateway.py, tests/test_doctor_node.py).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import email.utils
import http.client
import socket
import ssl
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509

from pkictl.clock import Clock
from pkictl.est.wire import EST_PREFIX
from pkictl.tls import harden

__all__ = ["GatewayProbe", "probe_gateway", "ESTProbe", "probe_est", "served_certificate", "tcp_connect"]


@dataclasses.dataclass(frozen=True)
class GatewayProbe:
    """The outcome of one test connection.

    Attributes:
        outcome: ``accepted``, ``refused`` (the gateway refused our certificate with a TLS
            alert, RFC 8446 6.2), ``closed`` (the handshake completed, then the gateway closed
            without an alert: its authorization or its upstream), ``server-rejected`` (we would
            not take the gateway's certificate) or ``unreachable``.
        detail: the alert's reason, the verification message, or the socket error.
        verify_code: the X509_V_ERR_* code when ``server-rejected``.
        server_certificate: the gateway's certificate (fetched again without verification when
            ours rejected it), or None.
        version: the TLS version negotiated.
    """

    outcome: str
    detail: str = ""
    verify_code: int | None = None
    server_certificate: x509.Certificate | None = None
    version: str = ""


def _client_context(version_dir: Path, anchors: Path) -> ssl.SSLContext:
    """What this node sends (fullchain.pem: leaf and chain, as the tunnel does) and trusts (ca.pem)."""
    ctx = harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.load_verify_locations(cafile=str(anchors))
    ctx.load_cert_chain(str(version_dir / "fullchain.pem"), str(version_dir / "privkey.pem"))
    return ctx


def served_certificate(address: tuple[str, int], server_name: str | None, *, timeout: float,
                       context: ssl.SSLContext | None = None) -> x509.Certificate | None:
    """The certificate a TLS server at ``address`` presents, without verifying it (None if the
    handshake fails before it arrives). Without a client certificate a gateway refuses the
    connection right after: it appears in its log as a refused client."""
    if context is None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection(address, timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=server_name) as tls:
                der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError):
        return None
    return x509.load_der_x509_certificate(der) if der else None


def probe_gateway(version_dir: Path, anchors: Path, address: tuple[str, int], server_name: str, *,
                  timeout: float = 5.0, settle: float = 1.0) -> GatewayProbe:
    """Connect to the gateway as this node and report what happened.

    Args:
        version_dir: the live credential version (its fullchain.pem and privkey.pem are sent).
        anchors: ca.pem, to verify the gateway against, with ``server_name``.
        address: the gateway's ``(host, port)``.
        server_name: the DNS name or IP address the node dials (verified against the certificate).
        timeout: seconds for the TCP connection and the handshake.
        settle: seconds to wait after a TLS 1.3 handshake for the gateway's verdict on our
            certificate (an alert or EOF); a connection still open then was accepted. A gateway
            whose upstream connect takes longer than this to fail is reported as accepting.
    """
    ctx = _client_context(version_dir, anchors)
    try:
        raw = socket.create_connection(address, timeout=timeout)
    except OSError as exc:
        return GatewayProbe("unreachable", exc.strerror or str(exc))
    try:
        tls = ctx.wrap_socket(raw, server_hostname=server_name)
    except ssl.SSLCertVerificationError as exc:
        raw.close()
        return GatewayProbe("server-rejected", exc.verify_message or str(exc), exc.verify_code,
                            served_certificate(address, server_name, timeout=timeout))
    except ssl.SSLError as exc:  # TLS 1.2: the gateway's alert arrives during the handshake
        raw.close()
        return GatewayProbe("refused", exc.reason or str(exc))
    except OSError as exc:
        raw.close()
        return GatewayProbe("refused", f"closed during the handshake ({type(exc).__name__})")
    with tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None, "after a handshake, the server's certificate is there"
        served = x509.load_der_x509_certificate(der)
        version = tls.version() or ""
        tls.settimeout(settle)
        try:
            data = tls.recv(1)
        except TimeoutError:
            return GatewayProbe("accepted", "the connection stayed open", server_certificate=served, version=version)
        except ssl.SSLError as exc:
            reason = exc.reason or str(exc)
            # An alert is a verdict on our certificate; a TCP close without close_notify is not.
            outcome = "refused" if "ALERT" in reason else "closed"
            return GatewayProbe(outcome, reason, server_certificate=served, version=version)
        except OSError as exc:
            return GatewayProbe("closed", f"connection {type(exc).__name__} after the handshake", server_certificate=served, version=version)
    if data:
        return GatewayProbe("accepted", "the upstream spoke first", server_certificate=served, version=version)
    return GatewayProbe("closed", "closed right after the handshake, without an alert", server_certificate=served, version=version)


@dataclasses.dataclass(frozen=True)
class ESTProbe:
    """One exchange with the EST server.

    Attributes:
        error: None, or why the exchange failed (then nothing else is set).
        verify_failed: the server did not prove it is our CA (certificate verification failed).
        skew: server clock minus ours (its ``Date`` header against the middle of the request by
            our clock); None without a Date header.
        crl_pem: the body of ``/crl.pem``, or None if that request failed.
    """

    error: str | None = None
    verify_failed: bool = False
    skew: dt.timedelta | None = None
    crl_pem: bytes | None = None


def probe_est(ca_url: str, anchors: Path, clock: Clock, *, timeout: float = 5.0) -> ESTProbe:
    """GET ``/cacerts`` (RFC 7030 4.1) for the server's ``Date`` (RFC 9110 6.6.1), then ``/crl.pem``,
    over one TLS connection verified against ``anchors`` and the URL's host."""
    parts = urlsplit(ca_url)
    if not parts.hostname:  # listener.ca_url's pattern lets https://:PORT through
        return ESTProbe(error=f"{ca_url!r} names no host: want https://HOST[:PORT]")
    ctx = harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.load_verify_locations(cafile=str(anchors))
    connection = http.client.HTTPSConnection(parts.hostname, parts.port or 443, context=ctx, timeout=timeout)
    try:
        before = clock.now()
        connection.request("GET", f"{EST_PREFIX}/cacerts")
        response = connection.getresponse()
        response.read()
        after = clock.now()
        date = response.getheader("Date")
        skew = None
        if date:
            try:
                skew = email.utils.parsedate_to_datetime(date) - (before + (after - before) / 2)
            except (TypeError, ValueError):
                skew = None
        connection.request("GET", "/crl.pem")
        crl = connection.getresponse()
        body = crl.read()
        return ESTProbe(skew=skew, crl_pem=body if crl.status == 200 else None)
    except ssl.SSLCertVerificationError as exc:
        return ESTProbe(error=exc.verify_message or str(exc), verify_failed=True)
    except (OSError, ssl.SSLError, http.client.HTTPException) as exc:
        return ESTProbe(error=getattr(exc, "strerror", None) or str(exc) or type(exc).__name__)
    finally:
        connection.close()


def tcp_connect(address: tuple[str, int], *, timeout: float) -> str | None:
    """None if a TCP connection to ``address`` opens (and is closed at once), else the error."""
    try:
        socket.create_connection(address, timeout=timeout).close()
    except OSError as exc:
        return exc.strerror or str(exc)
    return None
