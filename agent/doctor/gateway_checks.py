"""Doctor checks over the network between a node and its gateway, and of a gateway's own listener.

On a node: a real test connection to the gateway with this node's credential, read as the
operator needs it (``the gateway certificate lacks the IP you dial``, ``this node sends its leaf
without the chain``, ``revoked``) rather than as a TLS error. On a gateway: is the listener up
and serving the live certificate, and does the upstream answer.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.x509.oid import NameOID

from pkictl.authority import san_strings
from pkictl.diagnosis.credential_checks import check_chain, check_identity, check_issuer, check_key_match, check_revocation, check_validity
from pkictl.diagnosis.credential_facts import describe
from pkictl.diagnosis.findings import Finding, Severity, check

from .probe import probe_gateway, served_certificate, tcp_connect

if TYPE_CHECKING:
    from .facts import AgentFacts

__all__ = ["GATEWAY_CHECKS", "ALERT_MEANINGS"]

E, W, OK = Severity.ERROR, Severity.WARNING, Severity.OK

# TLS alerts (RFC 8446 6.2) as OpenSSL names them on the client, when the gateway refused us.
ALERT_MEANINGS = {
    "TLSV1_ALERT_UNKNOWN_CA": "it cannot chain this node's certificate to a CA it trusts (a leaf sent without its chain, or another CA)",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "it found this node's certificate on its CRL",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "it takes this node's certificate (or its CRL) as expired",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "it received no client certificate",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "the handshake failed (TLS 1.2: no client certificate, or nothing in common)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "it rejected this node's certificate",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "this node's certificate is not for client authentication",
    "TLSV1_ALERT_DECRYPT_ERROR": "a signature did not verify (a key that does not match its certificate?)",
}
_NAME_MISMATCH = {62, 63, 64}  # X509_V_ERR_HOSTNAME/EMAIL/IP_ADDRESS_MISMATCH
_UNKNOWN_ISSUER = {2, 18, 19, 20, 21}  # unable to get (local) issuer, self-signed, unable to verify the leaf


def _local_cause(facts: "AgentFacts") -> Finding | None:
    """The first error this host's own files explain a refusal with (leaf without chain, revoked,
    expired, another CA, wrong identity)."""
    for function in (check_chain, check_revocation, check_validity, check_issuer, check_identity):
        for finding in function(facts.credential):
            if finding.severity == E:
                return finding
    return None


@check("gateway")
def check_gateway(facts: "AgentFacts"):
    """A test connection to the gateway as this node: it accepts us, and we accept its certificate
    for the name or IP address we dial."""
    if facts.gateway is None:
        if facts.config.kind == "node":
            yield Finding("gateway", OK, "", "not checked: give --gateway HOST:PORT (and --server-name) to test the connection")
        return
    (host, port), name = facts.gateway
    where = f"{host}:{port}" + (f" as {name}" if name != host else "")
    credential = facts.credential
    if facts.offline or credential.version is None or credential.certificate is None or isinstance(credential.anchors, str):
        yield Finding("gateway", OK, where, "not checked: --offline, or no usable credential here")
        return
    if any(f.severity == E for f in check_key_match(credential)):
        yield Finding("gateway", OK, where, "not checked: privkey.pem is not the key of cert.pem (the key-match finding)")
        return
    result = probe_gateway(credential.version, credential.directory / "ca.pem", (host, port), name,
                           timeout=facts.timeout, settle=facts.settle)
    if result.outcome == "accepted":
        yield Finding("gateway", OK, where, f"accepted {describe(credential.certificate)} ({result.version}, {result.detail})")
    elif result.outcome == "unreachable":
        yield Finding("gateway", E, where, f"cannot connect: {result.detail}", "the gateway's mTLS listener",
                      "check the address (--gateway, or the tunnel's gateway), that pki-agent runs on the gateway, and the firewall")
    elif result.outcome == "server-rejected":
        yield _server_rejected(facts, where, name, result)
    elif result.outcome == "closed":
        yield _closed(facts, where, result)
    else:
        meaning = ALERT_MEANINGS.get(result.detail, result.detail)
        cause = _local_cause(facts)
        if cause is not None:
            yield Finding("gateway", E, where, f"the gateway refused this node's certificate ({result.detail}): {meaning}; "
                          f"the cause found here: {_short(cause.problem)} (the {cause.check} finding)",
                          "the gateway to accept this node's certificate", cause.fix)
        else:
            yield Finding("gateway", E, where, f"the gateway refused this node's certificate during the handshake "
                          f"({result.detail}): {meaning}", "the gateway to accept this node's certificate",
                          "read the gateway's log for the reason (journalctl -u pki-agent there: 'refused peer=...'), and run "
                          "pki-agent doctor on the gateway")


def _short(text: str) -> str:
    return text if len(text) <= 120 else text[:117] + "..."


def _closed(facts: "AgentFacts", where: str, result) -> Finding:
    """The handshake completed and the gateway closed without an alert. pki-agent's listener does
    that both for a node its rules refuse (listener.allow, EKU, a CA certificate as client) and
    when its upstream cannot be connected: from here the two look the same (docs/design.md)."""
    cause = _local_cause(facts)
    if cause is not None:  # this node's own certificate breaks a rule the listener checks after the handshake
        return Finding("gateway", E, where, f"the gateway accepted the TLS handshake, then closed without an alert "
                       f"({result.detail}); the cause found here: {_short(cause.problem)} (the {cause.check} finding)",
                       "the gateway to keep the connection open", cause.fix)
    name = facts.config.name or "this node"
    return Finding("gateway", E, where, f"the gateway accepted the TLS handshake and then closed without an alert "
                   f"({result.detail}): either {name} is not in its listener.allow or its upstream is down; this node "
                   "cannot tell which, the gateway's log says it", "the gateway to keep the connection open",
                   f"on the gateway: journalctl -u pki-agent (\"refused ... reason='not allowed'\" names the allow list: add {name} "
                   "to listener.allow; \"upstream unreachable\" names the upstream: start it), or pki-agent doctor there")


def _server_rejected(facts: "AgentFacts", where: str, name: str, result) -> Finding:
    served = result.server_certificate
    shown = f"{describe(served)} naming {', '.join(san_strings(served)) or 'nothing'}" if served is not None else "its certificate"
    cn = served.subject.get_attributes_for_oid(NameOID.COMMON_NAME) if served is not None else []
    gateway = str(cn[0].value) if cn else "GATEWAY"
    if facts.credential.pin_mismatch:
        # Verified against a ca.pem we may not trust: nothing about the gateway follows from it.
        return Finding("gateway", E, where, f"this node cannot verify the gateway's certificate ({result.detail}): ca.pem is not "
                       f"the pinned root (the trust-anchor finding); {shown}", "ca.pem holding the pinned root",
                       "restore ca.pem as the trust-anchor finding says; nothing to change on the gateway")
    if result.verify_code in _NAME_MISMATCH:
        kind = "--ip" if result.verify_code == 64 else "--dns"
        return Finding("gateway", E, where, f"the gateway's certificate lacks the name this node dials: {shown}",
                       f"a gateway certificate naming {name}",
                       f"on the CA host: pkictl enroll-gateway {gateway} {kind} {name} (with its other --dns/--ip) --replace, and copy the "
                       f"bundle to the gateway; or dial a name it carries (--server-name, the tunnel's server_name)")
    if result.verify_code in (9, 10):
        state = "not yet valid" if result.verify_code == 9 else "expired"
        return Finding("gateway", E, where, f"the gateway's certificate is {state}: {shown}", "a current gateway certificate",
                       "run pki-agent doctor on the gateway" + ("; or this host's clock is behind" if result.verify_code == 9 else ""))
    chain = facts.credential.chain if isinstance(facts.credential.chain, list) else []
    if result.verify_code in _UNKNOWN_ISSUER and served is not None and any(c.subject == served.issuer for c in chain):
        return Finding("gateway", E, where, f"the gateway sends its certificate without the chain ({shown}, issued by our issuing CA)",
                       "the gateway's leaf followed by the issuing CA", "on the gateway serve fullchain.pem, not cert.pem")
    return Finding("gateway", E, where, f"the gateway's certificate does not chain to our trust anchor ({result.detail}): {shown}",
                   "a gateway certificate from our CA", "check that --gateway is our gateway; run pki-agent doctor there")


def _local(host: str) -> str:
    return {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


def _probe_listener(address: tuple[str, int], version: Path | None, *, timeout: float) -> tuple[str | None, x509.Certificate | None]:
    """``(why nothing listens, None)``, or ``(None, the certificate served)`` (None: not TLS).

    The test connection presents this gateway's live credential (``version``), so that the
    listener knows it for its own doctor's and logs it as ``probe ... reason='doctor probe'``
    (INFO) instead of a refusal (docs/design.md, "Doctor probes"); it waits for the listener to
    close it, so that the listener reads the whole handshake first. Without a readable live
    credential it falls back to a bare connection and an anonymous handshake, which the
    listener logs as refusals.
    """
    context = None
    if version is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # only which certificate it serves is compared
        try:
            context.load_cert_chain(str(version / "fullchain.pem"), str(version / "privkey.pem"))
        except (OSError, ssl.SSLError):
            context = None  # the credential checks say why
    if context is None:
        error = tcp_connect(address, timeout=timeout)
        return (error, None) if error else (None, served_certificate(address, None, timeout=timeout))
    try:
        raw = socket.create_connection(address, timeout=timeout)
    except OSError as exc:
        return exc.strerror or str(exc), None
    with raw:
        try:
            tls = context.wrap_socket(raw, server_hostname=None)
        except (OSError, ssl.SSLError):
            return None, None
        with tls:
            der = tls.getpeercert(binary_form=True)
            try:
                while tls.recv(1024):
                    pass  # the listener closes a probe at once
            except (OSError, ssl.SSLError):
                pass
    return None, x509.load_der_x509_certificate(der) if der else None


@check("listener")
def check_listener(facts: "AgentFacts"):
    """The gateway's listener answers on its address and serves the live certificate (it reloaded)."""
    listener = facts.config.listener
    if listener is None:
        return
    host, port = listener.listen
    address = (_local(host), port)
    where = f"{address[0]}:{port}"
    if facts.offline or port == 0:
        yield Finding("listener", OK, where, "not checked: --offline or port 0")
        return
    error, served = _probe_listener(address, facts.credential.version, timeout=facts.timeout)
    if error:
        yield Finding("listener", W, where, f"nothing listens ({error})", "pki-agent's mTLS listener",
                      "start the agent (systemctl start pki-agent), or read its log (journalctl -u pki-agent)")
        return
    live = facts.credential.certificate
    if served is None:
        yield Finding("listener", W, where, "answers, but not with TLS", "pki-agent's mTLS listener",
                      "another program holds the port: ss -ltnp")
    elif live is not None and served.serial_number != live.serial_number:
        yield Finding("listener", W, where, f"serves {describe(served)}, while live holds {describe(live)}: it has not reloaded",
                      "the live certificate", "systemctl reload pki-agent (SIGHUP); the agent also reloads within check_interval")


@check("upstream")
def check_upstream(facts: "AgentFacts"):
    """The real gateway behind the listener accepts TCP connections."""
    listener = facts.config.listener
    if listener is None:
        return
    host, port = listener.upstream
    if facts.offline:
        yield Finding("upstream", OK, f"{host}:{port}", "not checked: --offline")
        return
    error = tcp_connect((host, port), timeout=facts.timeout)
    if error:
        yield Finding("upstream", E, f"{host}:{port}", f"the real gateway does not accept connections ({error}): nodes pass the mTLS "
                      "check and are cut off", "the gateway listening there", "start the real gateway, or correct listener.upstream")


GATEWAY_CHECKS = (check_gateway, check_listener, check_upstream)
