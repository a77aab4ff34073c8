"""Doctor checks of one credential directory (``live`` -> ``archive/N``): the checks both doctors share.

Each check reads :class:`pkictl.diagnosis.credential_facts.CredentialFacts` and never writes anything.
"""

from __future__ import annotations

import datetime as dt
import stat

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .credential_facts import CredentialFacts, describe, fingerprint, purposes, subject_alternative_names, verify_chain
from .findings import Finding, Severity, check
from ..files import key_mode_problem
from ..formats import COMBINED_FILE, KEYSTORE_FILE
from ..pem import issued_by, public_key_bytes
from ..renewal import EXPIRING_FRACTION
from ..revocation import signed_by
from ..store import CREDENTIAL_FILES

__all__ = [
    "CREDENTIAL_CHECKS", "check_live_link", "check_archive", "check_key_permissions", "check_key_match", "check_chain",
    "check_issuer", "check_validity", "check_identity", "check_trust_anchor", "check_revocation", "CLOCK_AGREEMENT",
    "credential_checks_for",
]

E, W = Severity.ERROR, Severity.WARNING
# Clocks this close agree (NTP keeps them well within a second); certificates are backdated 5 minutes (pkictl.profile).
CLOCK_AGREEMENT = dt.timedelta(seconds=60)
_PURPOSE_NAMES = {ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth", ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth"}  # RFC 5280 4.2.1.12


@check("live-link")
def check_live_link(facts: CredentialFacts):
    """``live`` is a symlink to a complete ``archive/N`` (a crash never leaves it otherwise)."""
    if facts.live_problem:
        problem, expected = facts.live_problem
        yield Finding("live-link", E, str(facts.directory), problem, expected,
                      f"point live at the newest complete version (ln -s archive/N live.new && mv -T live.new live), or {facts.reenroll}")
        return
    if facts.certificate is None:
        yield Finding("live-link", E, facts.subject, "cert.pem holds no readable certificate", "one PEM certificate", facts.reenroll)


@check("archive")
def check_archive(facts: CredentialFacts):
    """Versions other than the live one are complete, and the stable top-level names are links."""
    if facts.version is None:
        return
    archive = facts.directory / "archive"
    for entry in sorted(archive.iterdir(), key=lambda p: (len(p.name), p.name)):
        if entry == facts.version or not entry.name.isdigit():
            continue
        missing = [n for n in CREDENTIAL_FILES if not (entry / n).is_file()]
        if missing:
            yield Finding("archive", W, str(entry), f"half-written version (no {', '.join(missing)}): the remains of an interrupted rotation",
                          "complete versions only", f"remove it: rm -r {entry} (live points to {facts.version.name}, which is complete)")
    for name in CREDENTIAL_FILES:
        link = facts.directory / name
        if link.exists() and not link.is_symlink():
            yield Finding("archive", W, str(link), "a regular file, not a link: software reading it keeps the old credential after a rotation",
                          f"{name} -> live/{name}", f"rm {link} && ln -s live/{name} {link}")


@check("key-permissions")
def check_key_permissions(facts: CredentialFacts):
    """Private keys (privkey.pem, combined.pem, keystore.p12) are 0600 regular files, or 0640 of the
    configured group, and no one else may write the directories that choose them."""
    for directory in (facts.directory, facts.directory / "archive"):
        try:
            mode = stat.S_IMODE(directory.lstat().st_mode)
        except OSError:
            continue
        if mode & 0o022:
            yield Finding("key-permissions", E, str(directory), f"mode {mode:04o}: others can write it and swap the live credential",
                          "0700", f"chmod 700 {directory}")
    if facts.version is None:
        return
    group = facts.key_group
    wanted = "0600" if group is None else f"0600, or 0640 of group {group} (credential_group)"
    for version in sorted((facts.directory / "archive").iterdir()):
        for key in (version / "privkey.pem", version / COMBINED_FILE, version / KEYSTORE_FILE):
            try:
                info = key.lstat()
            except OSError:
                continue
            if stat.S_ISLNK(info.st_mode):
                yield Finding("key-permissions", E, str(key), "a symlink; keys are loaded only from regular files", "a 0600 file",
                              f"replace the link with the key file itself (cp --remove-destination \"$(readlink -f {key})\" {key})")
            elif problem := key_mode_problem(info, group):
                fix = f"chmod 600 {key}" if group is None else f"chgrp {group} {key} && chmod 640 {key}"
                yield Finding("key-permissions", E, str(key), problem, wanted, fix)


@check("key-match")
def check_key_match(facts: CredentialFacts):
    """The private key is the certificate's key."""
    if facts.certificate is None or facts.key is None:
        return
    if isinstance(facts.key, str):
        yield Finding("key-match", E, facts.subject, facts.key, "the PEM private key of cert.pem", facts.reenroll)
    elif public_key_bytes(facts.key.public_key()) != public_key_bytes(facts.certificate.public_key()):
        # An operator's state, not a bug: files mixed up by hand, or a bundle copied in part.
        yield Finding("key-match", E, facts.subject, f"privkey.pem is not the key of cert.pem ({describe(facts.certificate)}) "
                      "in this version: files of two credentials mixed up, or a bundle copied in part",
                      "privkey.pem and cert.pem of the same credential",
                      "copy the whole bundle again from where it was made (tar or rsync -a: the live link and archive/ together), "
                      f"or point live back at a version whose key matches (ls {facts.directory / 'archive'}); else {facts.reenroll}")


@check("chain")
def check_chain(facts: CredentialFacts):
    """chain.pem holds the issuing CA and fullchain.pem is cert.pem followed by it: a client that
    sends only its leaf is refused by a gateway that trusts only the root (docs/design.md)."""
    leaf, chain, fullchain = facts.certificate, facts.chain, facts.fullchain
    if leaf is None:
        return
    for name, value in (("chain.pem", chain), ("fullchain.pem", fullchain)):
        if isinstance(value, str):
            yield Finding("chain", E, facts.subject, value, f"PEM certificates in {name}", facts.reenroll)
            return
    assert not isinstance(chain, str), "reported above"
    version = facts.version
    if not chain or all(c.subject != leaf.issuer for c in chain):
        yield Finding("chain", E, facts.subject, "this host sends its leaf without the chain, which a gateway cannot verify: "
                      f"chain.pem lacks the issuer of the leaf ({leaf.issuer.rfc4514_string()})",
                      "the issuing CA certificate in chain.pem",
                      f"put the issuing CA certificate (<CA home>/issuing/cert.pem, or the EST server's /cacerts) in {version}/chain.pem "
                      f"and rebuild fullchain.pem (cat cert.pem chain.pem), or {facts.reenroll}")
        return
    if not fullchain or fullchain[0] != leaf or list(fullchain[1:]) != list(chain):
        got = "only the leaf" if fullchain == [leaf] else f"{len(fullchain or [])} certificates that are not cert.pem + chain.pem"
        yield Finding("chain", E, facts.subject, f"fullchain.pem holds {got}: clients using it send a broken chain",
                      "cert.pem followed by chain.pem", f"cd {version} && cat cert.pem chain.pem > fullchain.pem")


def _at(certificate: x509.Certificate, now: dt.datetime) -> dt.datetime:
    """``now`` clamped into the certificate's validity: chain checks ignore expiry, which the
    validity check reports on its own."""
    latest = certificate.not_valid_after_utc - dt.timedelta(seconds=1)
    return max(certificate.not_valid_before_utc, min(now, latest))


def _issuing_cas(chain: list[x509.Certificate], anchors: list[x509.Certificate]) -> list[x509.Certificate]:
    """The CA certificates of ``chain`` that a trust anchor signed: our issuing CAs as a host
    without the CA home knows them."""
    return [ca for ca in chain if any(issued_by(ca, anchor) for anchor in anchors)]


@check("issuer")
def check_issuer(facts: CredentialFacts):
    """The certificate chains to our trust anchor (ca.pem) for its purpose."""
    leaf = facts.certificate
    if leaf is None or isinstance(facts.anchors, str) or not isinstance(facts.chain, list):
        return
    if facts.pin_mismatch:
        # A chain to an anchor we may not trust proves nothing either way: the trust-anchor finding is the cause.
        yield Finding("issuer", Severity.OK, facts.subject, "not checked: ca.pem is not the pinned root (the trust-anchor finding)")
        return
    if not facts.chain and all(a.subject != leaf.issuer for a in facts.anchors):
        return  # the chain check names the cause: without the issuing CA there is no path to check
    roots = ", ".join(a.subject.rfc4514_string() for a in facts.anchors)
    ours = facts.issuing_cas if facts.issuing_cas is not None else _issuing_cas(facts.chain, facts.anchors)
    if not any(issued_by(leaf, ca) for ca in [*ours, *facts.anchors]):
        # Said first: what a path validator says of another CA's chain is beside the point.
        names = "; ".join(ca.subject.rfc4514_string() for ca in ours) or f"none in chain.pem that the root in ca.pem ({roots}) certified"
        yield Finding("issuer", E, facts.subject, f"{describe(leaf)} is not issued by our CA (issuer {leaf.issuer.rfc4514_string()}; "
                      f"our issuing CAs: {names})", f"a certificate from our CA ({roots})", facts.reenroll)
        return
    reason = verify_chain(leaf, facts.chain, facts.anchors, _at(leaf, facts.now))
    if reason:
        yield Finding("issuer", E, facts.subject, f"{describe(leaf)} issued by {leaf.issuer.rfc4514_string()} does not chain to the "
                      f"trust anchor ({reason})", f"a certificate from our CA ({roots})", facts.reenroll)


@check("validity")
def check_validity(facts: CredentialFacts):
    """The certificate and its chain are valid now, and renewal has not fallen behind."""
    leaf, now = facts.certificate, facts.now
    if leaf is None:
        return
    not_before, not_after = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    if now < not_before:
        yield _not_yet_valid(facts, leaf)
    elif now >= not_after:
        yield Finding("validity", E, facts.subject, f"{describe(leaf)} expired at {not_after.isoformat()}",
                      "a current certificate (the agent renews at 2/3 of its lifetime)", facts.reenroll)
    elif not_after - now < (not_after - not_before) * EXPIRING_FRACTION:
        days = (not_after - now).total_seconds() / 86400
        yield Finding("validity", W, facts.subject, f"{describe(leaf)} expires in {days:.1f} days, long after its renewal was due",
                      "a renewal at 2/3 of the lifetime",
                      "check that pki-agent runs (systemctl status pki-agent) and read its log for the renewal error")
    for ca in facts.chain if isinstance(facts.chain, list) else []:
        if now >= ca.not_valid_after_utc:
            yield Finding("validity", E, facts.subject, f"the CA certificate {describe(ca)} in chain.pem expired at "
                          f"{ca.not_valid_after_utc.isoformat()}", "an unexpired issuing CA", facts.reenroll)


def _not_yet_valid(facts: CredentialFacts, leaf: x509.Certificate) -> Finding:
    """A leaf from the future: this host's clock is behind, or the CA's was ahead when it signed.
    Another host's clock (``reference_clock``) tells which; without one both are named."""
    not_before = leaf.not_valid_before_utc
    head = f"{describe(leaf)} is not valid before {not_before.isoformat()} ({(not_before - facts.now).total_seconds():.0f} s from now)"
    fix_here = "fix this host's clock (timedatectl set-ntp true; chronyc tracking)"
    fix_ca = (f"fix the CA host's clock (timedatectl set-ntp true there), then {facts.reenroll} "
              f"(or wait until {not_before.isoformat()})")
    if facts.reference_clock is None:
        return Finding("validity", E, facts.subject, f"{head}: either this host's clock is behind or the CA's clock was ahead "
                       "when it signed (no other clock was read to tell which)", "a clock within a few minutes of the CA's",
                       f"compare date -u here and on the CA host; {fix_here}, or {fix_ca}")
    whose, skew = facts.reference_clock
    seconds = skew.total_seconds()
    if skew > CLOCK_AGREEMENT:
        return Finding("validity", E, facts.subject, f"{head}: this host's clock is behind, {seconds:.0f} s behind {whose}'s",
                       f"a clock within {CLOCK_AGREEMENT.total_seconds():.0f} s of {whose}'s", fix_here)
    agrees = f"agrees with {whose}'s ({seconds:+.0f} s)" if skew >= -CLOCK_AGREEMENT else f"is even ahead of {whose}'s ({-seconds:.0f} s)"
    return Finding("validity", E, facts.subject, f"{head}: this host's clock {agrees}, so the CA's clock was ahead when it signed",
                   "a certificate signed at the right time", fix_ca)


@check("identity")
def check_identity(facts: CredentialFacts):
    """The certificate is for the expected name and purpose (a node's clientAuth and SPIFFE URI)."""
    leaf = facts.certificate
    if leaf is None:
        return
    want = ExtendedKeyUsageOID.CLIENT_AUTH if facts.kind == "node" else ExtendedKeyUsageOID.SERVER_AUTH
    if want not in purposes(leaf):
        yield Finding("identity", E, facts.subject, f"{describe(leaf)} is not for {_PURPOSE_NAMES[want]}",
                      f"a {facts.kind} certificate", f"point credential_dir in {facts.config} at the {facts.kind}'s bundle, or {facts.reenroll}")
    elif facts.kind == "gateway" and facts.renews_over_est and ExtendedKeyUsageOID.CLIENT_AUTH not in purposes(leaf):
        # OpenSSL checks a TLS client for clientAuth: such a gateway can never renew over EST.
        yield Finding("identity", E, facts.subject, f"{describe(leaf)} is for serverAuth only: it cannot authenticate its "
                      "renewal to the EST server, so it expires unrenewed (issued before gateway certificates carried clientAuth)",
                      "a gateway certificate for serverAuth and clientAuth", facts.reenroll)
    if facts.name is None:
        return
    cn = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not cn or str(cn[0].value).lower() != facts.name.lower():
        got = cn[0].value if cn else "no common name"
        yield Finding("identity", E, facts.subject, f"the certificate is for {got!s}, the configuration says name: {facts.name}",
                      f"CN={facts.name}", f"point credential_dir in {facts.config} at {facts.name}'s bundle, or correct name:")
    elif facts.kind == "node" and facts.trust_domain:
        sans = subject_alternative_names(leaf)
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier) if sans else []
        wanted = f"spiffe://{facts.trust_domain}/node/{facts.name}".lower()
        if [u.lower() for u in uris] != [wanted]:
            yield Finding("identity", E, facts.subject, f"the certificate carries {', '.join(uris) or 'no URI'}; the gateway "
                          "admits a node by exactly one identity", wanted,
                          f"correct trust_domain: in {facts.config} (the CA's, from pkictl init-ca), or {facts.reenroll}")


@check("trust-anchor")
def check_trust_anchor(facts: CredentialFacts):
    """ca.pem holds self-signed, unexpired CA certificates, one of them the pinned fingerprint."""
    path = facts.directory / "ca.pem"
    if isinstance(facts.anchors, str):
        yield Finding("trust-anchor", E, str(path), facts.anchors, "the CA's root certificate (PEM)", facts.reenroll)
        return
    for anchor in facts.anchors:
        if anchor.issuer != anchor.subject:
            yield Finding("trust-anchor", E, str(path), f"{describe(anchor)} is not self-signed: not a trust anchor",
                          "the root certificate only", facts.reenroll)
        elif facts.now >= anchor.not_valid_after_utc:
            yield Finding("trust-anchor", E, str(path), f"the root {describe(anchor)} expired at {anchor.not_valid_after_utc.isoformat()}",
                          "an unexpired root", "the CA needs a new root: every host enrolls again")
    if facts.pinned_sha256 is None:
        yield Finding("trust-anchor", Severity.OK, str(path), f"not pinned: no trust_anchor_sha256 in {facts.config}")
        return
    held = {fingerprint(a): a for a in facts.anchors}
    if facts.pinned_sha256 not in held:
        shown = ", ".join(f"sha256:{h} ({describe(a)})" for h, a in held.items())
        yield Finding("trust-anchor", E, str(path), f"holds {shown}, not the pinned root: this may be tampering (a CA that is "
                      "not ours put where this host looks for its trust anchor), and every check against ca.pem is unfounded "
                      "until it is restored", f"sha256:{facts.pinned_sha256}",
                      "restore ca.pem from the CA host (<CA home>/ca.pem, copied with tar or rsync -a) and verify its fingerprint "
                      "out of band with the CA operator (pkictl init-ca and enroll-node --token print it; here: openssl x509 -in "
                      f"{path} -noout -fingerprint -sha256); if it still differs, {facts.reenroll}; only if the root was replaced "
                      f"on purpose, set trust_anchor_sha256 in {facts.config}")


@check("revocation")
def check_revocation(facts: CredentialFacts):
    """The certificate is not on a CRL of its issuer (from disk or fetched from the CA)."""
    leaf = facts.certificate
    if leaf is None:
        return
    issuers = [c for c in facts.chain if c.subject == leaf.issuer] if isinstance(facts.chain, list) else []
    consulted = []
    for source, crls in facts.crls:
        for crl in crls:
            if crl.issuer != leaf.issuer or (issuers and not signed_by(crl, issuers[0])):
                continue
            consulted.append(source)
            entry = crl.get_revoked_certificate_by_serial_number(leaf.serial_number)
            if entry is not None:
                yield Finding("revocation", E, facts.subject, f"{describe(leaf)} was revoked at {entry.revocation_date_utc.isoformat()} "
                              f"(CRL from {source})", "a certificate that is not revoked", facts.reenroll)
                return
    if not consulted:
        yield Finding("revocation", Severity.OK, facts.subject, "not checked: no CRL of the certificate's issuer at hand")


CREDENTIAL_CHECKS = (
    check_live_link, check_archive, check_key_permissions, check_key_match, check_chain, check_issuer,
    check_validity, check_identity, check_trust_anchor, check_revocation,
)


def credential_checks_for(facts: CredentialFacts) -> tuple:
    """:data:`CREDENTIAL_CHECKS` in the order to report them for ``facts``: a ca.pem that is not
    the pinned root comes first, because it is the cause of what the other checks see."""
    if not facts.pin_mismatch:
        return CREDENTIAL_CHECKS
    return (check_trust_anchor, *(c for c in CREDENTIAL_CHECKS if c is not check_trust_anchor))
