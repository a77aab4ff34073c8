"""The credential checks both doctors share, each on a healthy bundle and on one broken for real."""

from __future__ import annotations

import datetime as dt
import os
import shutil

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pkictl.authority import CertificateAuthority

from pkictl.diagnosis.credential_checks import CREDENTIAL_CHECKS
from pkictl.diagnosis.credential_facts import CredentialFacts, fingerprint
from pkictl.diagnosis.findings import EXIT_ERROR, EXIT_OK, EXIT_WARNING, Finding, Severity, check, exit_status, render, run_checks
from pkictl.pem import private_key_to_pem
from pkictl.profile import generate_key
from pkictl.revocation import load_crls
from pkictl.settings import CASettings

from doctor_support import live_version, only, problems, replace_file

NOW = dt.datetime.now(dt.timezone.utc)
NOW_FROM_REAL_CLOCK = True  # conftest's real_now sets NOW again as each test starts


def facts(pki, *, bundle=None, now=None, **kwargs) -> CredentialFacts:
    options = {"kind": "node", "name": "TW", "trust_domain": "pkictl.internal"}
    options.update(kwargs)
    return CredentialFacts(directory=bundle or pki.node, now=now or NOW, **options)


def diagnose(pki, **kwargs) -> list[Finding]:
    return run_checks(CREDENTIAL_CHECKS, facts(pki, **kwargs))


def test_healthy_node_and_gateway_report_nothing(pki) -> None:
    """A freshly enrolled node and gateway pass every credential check, the gateway as serverAuth."""
    anchor = fingerprint(pki.ca.root)
    assert problems(diagnose(pki, pinned_sha256=anchor, crls=[("crl.pem", load_crls(pki.ca.crl_path))])) == []
    assert problems(diagnose(pki, bundle=pki.gateway, kind="gateway", name="gw", trust_domain=None)) == []


def test_live_link_missing_or_pointing_at_a_half_written_version(pki) -> None:
    """No live link, or live on an incomplete version, is one live-link error and silences the checks that need a credential."""
    version = live_version(pki.node)
    (pki.node / "live").unlink()
    assert only(diagnose(pki), "live-link").problem.startswith("no live link")
    (pki.node / "archive" / "7").mkdir(mode=0o700)
    shutil.copy(version / "cert.pem", pki.node / "archive" / "7" / "cert.pem")
    os.symlink("archive/7", pki.node / "live")
    found = only(diagnose(pki), "live-link")
    assert "lacks chain.pem, fullchain.pem, privkey.pem" in found.problem and "ln -s archive/N live.new" in found.fix


def test_half_written_version_and_copied_stable_names_are_warnings(pki) -> None:
    """A version dir missing files beside a good live one, and cert.pem copied over its link, are archive warnings."""
    half = pki.node / "archive" / "9"
    half.mkdir(mode=0o700)
    (half / "cert.pem").write_bytes((live_version(pki.node) / "cert.pem").read_bytes())
    found = only(diagnose(pki), "archive")
    assert found.severity == Severity.WARNING and "half-written" in found.problem and f"rm -r {half}" in found.fix
    shutil.rmtree(half)
    data = (pki.node / "cert.pem").read_bytes()
    (pki.node / "cert.pem").unlink()
    (pki.node / "cert.pem").write_bytes(data)
    assert "not a link" in only(diagnose(pki), "archive").problem


def test_key_readable_by_others_is_an_error_with_chmod(pki) -> None:
    """privkey.pem at 0644 is exactly one key-permissions error whose fix is chmod 600; a world-writable bundle dir is another."""
    key = live_version(pki.node) / "privkey.pem"
    key.chmod(0o644)
    found = only(diagnose(pki), "key-permissions")
    assert "0644" in found.problem and found.fix == f"chmod 600 {key}"
    key.chmod(0o600)
    pki.node.chmod(0o777)
    assert "others can write" in only(diagnose(pki), "key-permissions").problem


def test_swapped_key_does_not_match(pki) -> None:
    """Another key in privkey.pem (0600, so nothing else is wrong) is exactly one key-match error."""
    replace_file(live_version(pki.node) / "privkey.pem", private_key_to_pem(generate_key()), 0o600)
    found = only(diagnose(pki), "key-match")
    assert found.subject == str(live_version(pki.node))
    assert "privkey.pem is not the key of cert.pem" in found.problem and "mixed up" in found.problem
    assert "copy the whole bundle again" in found.fix and "point live back" in found.fix and "enroll" in found.fix
    assert "bug" not in found.line()


def test_leaf_without_chain(pki) -> None:
    """An empty chain.pem and a fullchain.pem holding only the leaf are one chain error saying the leaf goes without its chain."""
    version = live_version(pki.node)
    replace_file(version / "chain.pem", b"")
    replace_file(version / "fullchain.pem", (version / "cert.pem").read_bytes())
    found = only(diagnose(pki), "chain")
    assert "sends its leaf without the chain" in found.problem


def test_fullchain_that_is_only_the_leaf(pki) -> None:
    """A good chain.pem but a fullchain.pem of the leaf alone is a chain error about fullchain.pem."""
    version = live_version(pki.node)
    replace_file(version / "fullchain.pem", (version / "cert.pem").read_bytes())
    assert "fullchain.pem holds only the leaf" in only(diagnose(pki), "chain").problem


def test_certificate_from_a_foreign_ca(pki) -> None:
    """A trustme leaf and intermediate in place of ours (ca.pem still our root) is exactly one issuer error."""
    foreign = trustme.CA().create_child_ca()
    leaf = foreign.issue_cert("tw.example.net", common_name="TW")
    version = live_version(pki.node)
    pems = [blob.bytes() for blob in leaf.cert_chain_pems]
    replace_file(version / "cert.pem", pems[0])
    replace_file(version / "chain.pem", foreign.cert_pem.bytes())
    replace_file(version / "fullchain.pem", pems[0] + foreign.cert_pem.bytes())
    replace_file(version / "privkey.pem", leaf.private_key_pem.bytes(), 0o600)
    found = only(diagnose(pki, name=None, trust_domain=None), "issuer")
    assert "is not issued by our CA (issuer " in found.problem and "our issuing CAs: none in chain.pem" in found.problem
    assert "from our CA" in found.expected and "candidates exhausted" not in found.problem


def test_certificate_of_another_generation_of_our_ca_names_both_issuers(pki, tmp_path) -> None:
    """A node bundle of another CA beside our ca.pem is 'not issued by our CA' naming its issuer
    and ours (the issuing CA in chain.pem that our root signed), not a path validator's complaint."""
    other = CertificateAuthority.init(tmp_path / "other", CASettings())
    try:
        bundle = other.enroll("node", "TW", out=tmp_path / "other-TW").directory
        theirs = other.issuing.subject.rfc4514_string()
    finally:
        other.close()
    shutil.copyfile(pki.node / "ca.pem", bundle / "ca.pem")
    found = only(diagnose(pki, bundle=bundle), "issuer")
    assert found.problem.startswith("CN=TW serial ") and f"is not issued by our CA (issuer {theirs};" in found.problem
    assert "validation failed" not in found.problem
    # the twin: our issuing CA in chain.pem is named as ours when the leaf is of another CA
    version = live_version(bundle)
    replace_file(version / "chain.pem", (live_version(pki.node) / "chain.pem").read_bytes())
    replace_file(version / "fullchain.pem", (version / "cert.pem").read_bytes() + (version / "chain.pem").read_bytes())
    found = [f for f in diagnose(pki, bundle=bundle) if f.check == "issuer" and f.severity > Severity.OK][0]
    assert f"our issuing CAs: {pki.ca.issuing.subject.rfc4514_string()})" in found.problem


def test_certificate_of_our_ca_outside_its_profile_keeps_the_validators_reason(pki, tmp_path) -> None:
    """The negative twin: a leaf our issuing CA did sign but that fails path validation (a CA
    certificate as end entity) is 'does not chain to the trust anchor (reason)', not 'not issued by our CA'."""
    issuing_key = serialization.load_pem_private_key((pki.home / "issuing" / "key.pem").read_bytes(), None)
    key = generate_key()
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "TW")]))
            .issuer_name(pki.ca.issuing.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - dt.timedelta(minutes=5)).not_valid_after(NOW + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(issuing_key, hashes.SHA256()))
    version = live_version(pki.node)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    replace_file(version / "cert.pem", pem)
    replace_file(version / "fullchain.pem", pem + (version / "chain.pem").read_bytes())
    replace_file(version / "privkey.pem", private_key_to_pem(key), 0o600)
    found = [f for f in diagnose(pki, name=None, trust_domain=None) if f.check == "issuer" and f.severity > Severity.OK][0]
    assert "does not chain to the trust anchor (" in found.problem and "not issued by our CA" not in found.problem


@pytest.mark.parametrize(("offset", "severity", "words"), [
    (lambda c: c.not_valid_after_utc + dt.timedelta(seconds=1), "error", "expired at"),
    (lambda c: c.not_valid_after_utc - dt.timedelta(days=5), "warning", "long after its renewal was due"),
    (lambda c: c.not_valid_before_utc - dt.timedelta(minutes=10), "error", "clock is behind"),
], ids=["expired", "expiring", "not-yet-valid"])
def test_validity_by_injected_clock(pki, offset, severity, words) -> None:
    """Judged at a chosen time: after notAfter an error, in the last sixth of the lifetime a warning, before notBefore a clock error."""
    certificate = pki.ca.inventory.unexpired("TW", ["node"], NOW)[0]
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(certificate.pem.encode())
    found = only(diagnose(pki, now=offset(cert)), "validity")
    assert found.severity.label == severity and words in found.problem
    # the edges of the healthy range: notBefore itself, and one second before the last sixth begins
    expiring = cert.not_valid_after_utc - (cert.not_valid_after_utc - cert.not_valid_before_utc) / 6
    assert problems(diagnose(pki, now=cert.not_valid_before_utc)) == []
    assert problems(diagnose(pki, now=expiring - dt.timedelta(seconds=1))) == []
    assert problems(diagnose(pki, now=expiring + dt.timedelta(seconds=1))) == [("validity", "warning")]


def test_identity_of_another_node_or_purpose(pki) -> None:
    """The TW bundle checked as node 'other', in another trust domain, or as a gateway gives identity errors."""
    assert "the configuration says name: other" in only(diagnose(pki, name="other"), "identity").problem
    found = only(diagnose(pki, trust_domain="example.lan"), "identity")
    assert "carries spiffe://pkictl.internal/node/tw" in found.problem and found.expected == "spiffe://example.lan/node/tw"
    found = [f for f in diagnose(pki, kind="gateway", name="TW", trust_domain=None) if f.severity > Severity.OK]
    assert [(f.check, "serverAuth" in f.problem) for f in found] == [("identity", True)]


def test_trust_anchor_pin(pki) -> None:
    """A pin that ca.pem does not hold is a trust-anchor error; the right pin passes; no pin is an ok note; a missing ca.pem an error."""
    wrong = hashes.Hash(hashes.SHA256())
    wrong.update(b"another root")
    found = only(diagnose(pki, pinned_sha256=wrong.finalize().hex()), "trust-anchor")
    assert "not the pinned root" in found.problem and found.expected.startswith("sha256:")
    assert problems(diagnose(pki, pinned_sha256=fingerprint(pki.ca.root))) == []
    assert [f.problem for f in diagnose(pki) if f.check == "trust-anchor"][0].startswith("not pinned")
    (pki.node / "ca.pem").unlink()
    assert "is missing" in only(diagnose(pki), "trust-anchor").problem


def test_revoked_node_on_the_crl(pki) -> None:
    """The CRL before pkictl revoke TW passes; the one after is exactly one revocation error; no CRL at all is an ok note."""
    before = load_crls(pki.ca.crl_path)
    assert problems(diagnose(pki, crls=[("crl.pem", before)])) == []
    pki.ca.revoke("TW")
    found = only(diagnose(pki, crls=[("crl.pem", load_crls(pki.ca.crl_path))]), "revocation")
    assert "was revoked at" in found.problem and "(CRL from crl.pem)" in found.problem
    assert [f.problem for f in diagnose(pki, crls=[]) if f.check == "revocation"][0].startswith("not checked")


def test_report_lines_json_and_exit_status() -> None:
    """Findings render one line each with expected and fix, the summary counts them, JSON holds all, and the exit status is the worst."""
    findings = [Finding("a", Severity.OK, "", "passed"),
                Finding("b", Severity.WARNING, "x.pem", "old\nnews", "new", "renew"),
                Finding("c", Severity.ERROR, "y.pem", "broken", "whole", "fix it")]
    text = render(findings)
    assert text.splitlines() == ["warning b                    x.pem: old news; expected new; fix: renew",
                                 "error   c                    y.pem: broken; expected whole; fix: fix it",
                                 "3 checks: 1 errors, 1 warnings"]
    import json

    data = json.loads(render(findings, as_json=True))
    assert [f["severity"] for f in data["findings"]] == ["ok", "warning", "error"] and data["exit_status"] == EXIT_ERROR
    assert (exit_status(findings[:1]), exit_status(findings[:2]), exit_status(findings)) == (EXIT_OK, EXIT_WARNING, EXIT_ERROR)


def test_a_check_that_crashes_is_an_error_not_silence() -> None:
    """A check that raises becomes an error finding naming the exception; one that finds nothing an ok 'passed'."""

    @check("boom")
    def boom(_):
        raise RuntimeError("unforeseen")

    @check("quiet")
    def quiet(_):
        return []

    findings = run_checks([boom, quiet], None)
    assert [(f.check, f.severity) for f in findings] == [("boom", Severity.ERROR), ("quiet", Severity.OK)]
    assert "RuntimeError: unforeseen" in findings[0].problem


def test_a_serverauth_only_gateway_that_renews_over_est_is_an_error(pki) -> None:
    """A gateway certificate of the old profile (serverAuth only) can never authenticate its EST
    renewal: an identity error when the gateway renews over EST, nothing when it renews with the
    CA home (no TLS client involved); today's profile passes both."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from pkictl.pem import certificates_to_pem

    assert problems(diagnose(pki, bundle=pki.gateway, kind="gateway", name="gw", trust_domain=None, renews_over_est=True)) == []
    version = live_version(pki.gateway)
    current = x509.load_pem_x509_certificate((version / "cert.pem").read_bytes())
    issuing_key = serialization.load_pem_private_key((pki.home / "issuing" / "key.pem").read_bytes(), None)
    builder = (x509.CertificateBuilder().subject_name(current.subject).issuer_name(current.issuer).public_key(current.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(current.not_valid_before_utc)
               .not_valid_after(current.not_valid_after_utc))
    for extension in current.extensions:
        value = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]) if isinstance(extension.value, x509.ExtendedKeyUsage) else extension.value
        builder = builder.add_extension(value, critical=extension.critical)
    old = builder.sign(issuing_key, hashes.SHA256())
    replace_file(version / "cert.pem", certificates_to_pem([old]))
    replace_file(version / "fullchain.pem", certificates_to_pem([old, pki.ca.issuing]))

    found = only(diagnose(pki, bundle=pki.gateway, kind="gateway", name="gw", trust_domain=None, renews_over_est=True), "identity")
    assert found.severity == Severity.ERROR and "serverAuth only: it cannot authenticate its renewal" in found.problem
    assert found.expected == "a gateway certificate for serverAuth and clientAuth"
    assert problems(diagnose(pki, bundle=pki.gateway, kind="gateway", name="gw", trust_domain=None)) == []
