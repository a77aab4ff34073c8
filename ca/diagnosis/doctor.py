"""``pkictl doctor``: check a CA host end to end and name each problem with its fix.

The CA is not loaded with :meth:`CertificateAuthority.load` (that finishes an interrupted
rotation, and the inventory class migrates its schema): every file is read as it is, the
inventory through a read-only connection, so the doctor never changes anything.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
import stat
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from ..audit import open_audit_log
from ..clock import Clock
from .credential_checks import CREDENTIAL_CHECKS
from .credential_facts import CredentialFacts, describe
from .crl_checks import crl_findings
from .findings import Finding, Severity, check, check_name, run_checks
from ..activation import read_pending
from ..errors import PKIError, StoreError
from ..files import ca_key_protection_problem
from ..keys import is_encrypted, load_private_key
from ..pem import public_key_bytes
from ..crl import crl_number, load_crls
from ..root_crl import root_crl_fix
from ..settings import CASettings
from ..status import status_source
from ..storage.database import Row
from ..storage.location import DATABASE_FILE, SQLITE_FILE, open_database

__all__ = ["CAFacts", "CA_CHECKS", "diagnose_ca", "service_file_findings"]

E, W, OK = Severity.ERROR, Severity.WARNING, Severity.OK
_CRL_FIX = "pkictl sign-crl (and keep pkictl serve, or a pki-agent with renewal.ca_home, running: they re-sign it at half its validity)"


@dataclasses.dataclass
class CAFacts:
    """The CA home and what the checks need from outside it.

    Args:
        home: the CA home directory.
        now: aware UTC, from the caller's clock.
        passphrase: the CA key passphrase if the operator gave one (to check encrypted keys).
        service_files: installed unit and plist files to scan for secrets.
    """

    home: Path
    now: dt.datetime
    passphrase: bytes | None = None
    service_files: Sequence[Path] = ()

    def certificate(self, relative: str) -> x509.Certificate | None:
        try:
            return x509.load_pem_x509_certificate((self.home / relative).read_bytes())
        except (OSError, ValueError):
            return None

    @functools.cached_property
    def root(self) -> x509.Certificate | None:
        return self.certificate("root/cert.pem")

    @functools.cached_property
    def issuing(self) -> x509.Certificate | None:
        return self.certificate("issuing/cert.pem")

    @functools.cached_property
    def retired(self) -> list[x509.Certificate]:
        directory = self.home / "retired"
        found = [self.certificate(f"retired/{d.name}/cert.pem") for d in sorted(directory.iterdir())] if directory.is_dir() else []
        return [c for c in found if c is not None]

    @functools.cached_property
    def pending(self) -> x509.Certificate | None:
        """The next issuing CA while it waits for its activation (pkictl rotate-issuing)."""
        return self.certificate("pending-issuing/cert.pem")

    @property
    def issuers(self) -> list[x509.Certificate]:
        """Every issuing CA that signs a CRL: current, pending, retired."""
        return [c for c in [self.issuing, self.pending, *self.retired] if c is not None]

    @functools.cached_property
    def settings(self) -> CASettings | None:
        try:
            return CASettings.load(self.home / "ca.yaml")
        except (PKIError, OSError):
            return None

    def query(self, sql: str, params: tuple = ()) -> list[Row]:
        """Rows from the inventory, opened read-only (SQLite ``mode=ro``): the doctor never writes."""
        db = open_database(self.home, readonly=True)
        try:
            return db.execute(sql, params).fetchall()
        finally:
            db.close()


@check("ca-home")
def check_home(facts: CAFacts):
    """The CA files are all there, ca.yaml loads, and no one else can write the home."""
    home = facts.home
    records = DATABASE_FILE if (home / DATABASE_FILE).exists() else SQLITE_FILE
    missing = [n for n in ("ca.yaml", "ca.pem", "root/cert.pem", "issuing/cert.pem", "issuing/key.pem", records)
               if not (home / n).exists()]
    if ((home / ".issuing-new").is_dir() or (home / "pending-issuing").is_dir()) and not (home / "issuing").exists():
        yield Finding("ca-home", W, str(home), "a rotate-issuing was interrupted between its two renames",
                      "issuing/ in place", "run any pkictl command that loads the CA (e.g. pkictl sign-crl): it finishes the rotation")
        missing = [n for n in missing if not n.startswith("issuing/")]
    if missing:
        yield Finding("ca-home", E, str(home), f"missing {', '.join(missing)}", "the files pkictl init-ca writes",
                      "pass the right --home (or PKICTL_HOME), or restore the CA home from its backup")
    if (home / "ca.yaml").exists() and facts.settings is None:
        yield Finding("ca-home", E, str(home / "ca.yaml"), "does not load as CA settings", "the YAML pkictl init-ca wrote",
                      "restore ca.yaml from the backup (pkictl refuses to run without it)")
    mode = stat.S_IMODE(home.stat().st_mode)
    if mode & 0o022:
        yield Finding("ca-home", E, str(home), f"mode {mode:04o}: others can write the CA home", "0700", f"chmod 700 {home}")
    elif mode & 0o077:
        yield Finding("ca-home", W, str(home), f"mode {mode:04o}: others can read the inventory and the audit log", "0700",
                      f"chmod 700 {home}")


def _key_findings(facts: CAFacts, relative: str, certificate: x509.Certificate | None, *, optional: bool) -> list[Finding]:
    path = facts.home / relative
    try:
        info = path.lstat()
    except FileNotFoundError:
        if optional:
            return [Finding("ca-keys", OK, str(path), "absent (offline): only pkictl rotate-issuing needs it")]
        return []  # reported by ca-home
    if stat.S_ISLNK(info.st_mode):
        return [Finding("ca-keys", E, str(path), "a symlink: pkictl refuses to load it", "a 0600 regular file",
                        "replace the link with the key file itself")]
    found = []
    if info.st_mode & 0o077:
        found.append(Finding("ca-keys", E, str(path), f"mode {stat.S_IMODE(info.st_mode):04o}: readable by group or others "
                             "(pkictl refuses to load it)", "0600", f"chmod 600 {path}"))
    problem = ca_key_protection_problem(path)
    if problem is not None:
        found.append(Finding("ca-keys", E, str(path), f"{problem[0]} (pkictl refuses to load it)",
                             "the key and its 0700 directory owned by the account that runs pkictl", problem[1]))
    data = path.read_bytes()
    if is_encrypted(data) and facts.passphrase is None:
        found.append(Finding("ca-keys", OK, str(path), "encrypted: its match with the certificate is checked only with "
                             "--passphrase-file or PKICTL_CA_PASSPHRASE"))
        return found
    try:
        key = load_private_key(data, facts.passphrase, source=str(path))
    except PKIError as exc:
        return found + [Finding("ca-keys", E, str(path), str(exc), "a key pkictl can open", "check the passphrase, or restore the key")]
    if certificate is not None and public_key_bytes(key.public_key()) != public_key_bytes(certificate.public_key()):
        found.append(Finding("ca-keys", E, str(path), f"does not match {path.parent / 'cert.pem'} ({describe(certificate)})",
                             "the key of that certificate", f"restore {path.parent.name}/key.pem and cert.pem together from the backup"))
    return found


@check("ca-keys")
def check_keys(facts: CAFacts):
    """CA keys are 0600 regular files that match their certificates (the root key may be offline)."""
    yield from _key_findings(facts, "root/key.pem", facts.root, optional=True)
    yield from _key_findings(facts, "issuing/key.pem", facts.issuing, optional=False)
    if facts.pending is not None:
        yield from _key_findings(facts, "pending-issuing/key.pem", facts.pending, optional=False)
    for cert in facts.retired:
        yield from _key_findings(facts, f"retired/{cert.serial_number:x}/key.pem", cert, optional=False)


@check("ca-certificates")
def check_certificates(facts: CAFacts):
    """The root is ca.pem and valid; the issuing CA is the root's, valid, and outlives new certificates."""
    root, issuing, now = facts.root, facts.issuing, facts.now
    if root is None or issuing is None:
        return
    anchors = facts.certificate("ca.pem")
    if anchors is not None and anchors != root:
        yield Finding("ca-certificates", E, str(facts.home / "ca.pem"), f"holds {describe(anchors)}, not the root {describe(root)}",
                      "the root certificate (root/cert.pem)", f"cp {facts.home / 'root/cert.pem'} {facts.home / 'ca.pem'}")
    try:
        issuing.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature) as exc:
        yield Finding("ca-certificates", E, str(facts.home / "issuing/cert.pem"), f"{describe(issuing)} is not signed by the root "
                      f"({type(exc).__name__})", "an issuing CA certified by root/cert.pem", "restore issuing/ from the backup")
    if facts.pending is not None:
        yield from _pending_findings(facts, root, facts.pending)
    for label, cert in (("root", root), ("issuing CA", issuing)):
        if now >= cert.not_valid_after_utc:
            yield Finding("ca-certificates", E, label, f"{describe(cert)} expired at {cert.not_valid_after_utc.isoformat()}",
                          "an unexpired CA", "pkictl rotate-issuing" if cert is issuing else "a new CA: pkictl init-ca, and enroll every host again")
    lifetime = max(facts.settings.node_lifetime, facts.settings.gateway_lifetime) if facts.settings else dt.timedelta(days=90)
    refused_from = issuing.not_valid_after_utc - lifetime
    if now < issuing.not_valid_after_utc and now >= refused_from - dt.timedelta(days=30):
        when = "now" if now >= refused_from else f"from {refused_from.isoformat()}"
        yield Finding("ca-certificates", E if now >= refused_from else W, "issuing CA",
                      f"{describe(issuing)} expires at {issuing.not_valid_after_utc.isoformat()}: issuance and renewal are refused {when}",
                      f"an issuing CA that outlives a new certificate ({lifetime.days} days)", "pkictl rotate-issuing")


def _pending_findings(facts: CAFacts, root: x509.Certificate, pending: x509.Certificate) -> list[Finding]:
    """The next issuing CA (``pending``), published and waiting for its activation: fine unless it is broken."""
    path = facts.home / "pending-issuing"
    try:
        pending.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature) as exc:
        return [Finding("ca-certificates", E, str(path / "cert.pem"), f"{describe(pending)} is not signed by the root "
                        f"({type(exc).__name__})", "a pending issuing CA certified by root/cert.pem",
                        f"move {path} aside and run pkictl rotate-issuing again")]
    try:
        found = read_pending(facts.home)
    except (StoreError, OSError) as exc:
        found, problem = None, str(exc)
    else:
        problem = "missing: the pending issuing CA has no activation time"
    if found is None:
        return [Finding("ca-certificates", E, str(path / "activate-at"), f"{problem}; it is never activated",
                        "the ISO 8601 time pkictl rotate-issuing writes", f"move {path} aside and run pkictl rotate-issuing again")]
    return [Finding("ca-certificates", OK, str(path), f"{describe(pending)} is published and issues from "
                    f"{found.activate_at.isoformat()} (the current issuing CA issues until then; whoever uses the CA next activates it)")]


@check("crl")
def check_crl(facts: CAFacts):
    """crl.pem holds a fresh CRL signed by each active issuing CA, and one signed by the root."""
    if facts.issuing is None:
        return
    roots = [facts.root] if facts.root is not None else []
    yield from crl_findings(facts.home / "crl.pem", facts.issuers, facts.now, fix=_CRL_FIX, roots=roots,
                            root_fix=root_crl_fix(facts.home), want_root=True)


@check("crl-inventory")
def check_crl_inventory(facts: CAFacts):
    """crl.pem agrees with the inventory: every revoked, unexpired certificate is on it, nothing
    else is, and it is the last CRL signed (not an older file restored)."""
    path = facts.home / "crl.pem"
    try:
        crls = {crl.issuer.rfc4514_string(): crl for crl in load_crls(path)}
        rows = facts.query("SELECT issuer, issuer_name, number, next_update FROM crls WHERE next_update IS NOT NULL")
    except PKIError:
        return  # the crl and inventory checks report an unreadable file
    issuers = {f"{c.serial_number:x}": c for c in facts.issuers}
    root = facts.root
    if root is not None:
        issuers[f"{root.serial_number:x}"] = root
    for row in rows:
        ca = issuers.get(row["issuer"])
        crl = crls.get(ca.subject.rfc4514_string()) if ca is not None else None
        fix = root_crl_fix(facts.home) if ca is not None and ca is root else _CRL_FIX
        if crl is None:
            yield Finding("crl-inventory", E, str(path), f"no CRL of {row['issuer_name']}, which the inventory says is active",
                          "a CRL of each issuing CA with unexpired certificates, and the root's", fix)
            continue
        number = crl_number(crl)
        if number != row["number"]:
            yield Finding("crl-inventory", W, str(path), f"holds CRL number {number} of {row['issuer_name']}, the inventory's last is "
                          f"{row['number']}: an older crl.pem was restored?", "the last CRL signed", fix)
        revoked = {f"{r['serial']}" for r in facts.query(
            "SELECT serial FROM certificates WHERE status = 'revoked' AND issuer = ? AND not_after > ?",
            (row["issuer"], int(facts.now.timestamp())))}
        listed = {f"{entry.serial_number:x}" for entry in crl}
        for serial in sorted(revoked - listed):
            yield Finding("crl-inventory", E, f"serial {serial}", "revoked in the inventory but not on crl.pem: gateways still admit it",
                          "every revoked, unexpired certificate on the CRL", fix)
        for serial in sorted(listed - revoked):
            state = facts.query("SELECT status, not_after FROM certificates WHERE serial = ?", (serial,))
            if state and state[0]["status"] != "revoked":
                yield Finding("crl-inventory", W, f"serial {serial}", f"on crl.pem but {state[0]['status']} in the inventory "
                              "(inventory restored from an older backup?)", "the CRL and the inventory agree",
                              "find out which is right; pkictl sign-crl rewrites the CRL from the inventory")


@check("inventory")
def check_inventory(facts: CAFacts):
    """The inventory opens, and no current certificate needs attention (the `pkictl status` rules)."""
    from ..status import read_status

    shared = (facts.home / DATABASE_FILE).exists()
    db = facts.home / (DATABASE_FILE if shared else SQLITE_FILE)
    if not db.exists():
        return
    try:
        text, _ = read_status(status_source(facts.home), facts.now, as_json=True)
    except PKIError as exc:
        yield Finding("inventory", E, str(db), f"cannot be read: {exc}", "the inventory pkictl writes",
                      "restore it from the backup; every command that issues needs it")
        return
    for row in json.loads(text):
        if row["attention"] == 0 or row["kind"] in ("crl", "root", "issuing"):
            continue  # CRLs and CA certificates have their own checks
        who = f"{row['kind']} {row['name']} serial {row['serial'][:16]}"
        renewer = "pkictl serve renews it: is it running?" if row["kind"] == "service" else \
            f"its agent should have renewed it: run pki-agent doctor on {row['name']}'s host"
        if row["state"] == "expired":
            renewer = f"if {row['name']} is still in use, enroll it again: pkictl enroll-{row['kind']} {row['name']} --replace"
        yield Finding("inventory", E if row["attention"] == 4 else W, who, f"{row['state']}, {row['days_left']} days left",
                      "renewed at 2/3 of its lifetime", renewer)


@check("audit-log")
def check_audit(facts: CAFacts):
    """The audit log's hash chain and head verify (as `pkictl audit verify` checks them)."""
    from ..clock import SystemClock

    try:
        log = open_audit_log(facts.home, clock=SystemClock())
    except PKIError as exc:
        yield Finding("audit-log", E, str(facts.home / DATABASE_FILE), f"cannot be read: {exc}", "the CA database reachable",
                      "check the database server and database.yaml")
        return
    result = log.verify()
    if not result.ok:
        yield Finding("audit-log", E, str(log.path), f"does not verify: {result.problem}",
                      "an unbroken hash chain matching its head",
                      "compare with your backup and with a head noted earlier: pkictl audit verify --anchor SEQ:HASH")
    elif result.note:
        yield Finding("audit-log", OK, str(log.path), f"{result.records} records; {result.note}")


def _service_checks(facts: CAFacts) -> list[Finding]:
    """The EST service's own credential (<home>/service), if pkictl serve ever ran."""
    directory = facts.home / "service"
    if not directory.exists():
        return [Finding("service-credential", OK, str(directory), "absent: pkictl serve never ran here")]
    fix = f"move {directory} aside and restart pkictl serve: it issues itself a new certificate"
    credential = CredentialFacts(directory=directory, now=facts.now, kind="service", reenroll=fix, config="pkictl serve",
                                 issuing_cas=list(facts.issuers))
    findings = run_checks([c for c in CREDENTIAL_CHECKS if check_name(c) not in ("identity", "revocation")], credential)
    renewing = "pkictl serve renews it at 2/3 of its lifetime: is it running? (systemctl status pkictl-serve)"
    return [dataclasses.replace(f, check=f"service-{f.check}", fix=renewing if (f.check, f.severity) == ("validity", W) else f.fix)
            for f in findings]


def service_file_findings(paths: Sequence[Path]) -> list[Finding]:
    """Findings for service definitions (units, drop-ins, plists) that look like they hold a
    secret, and for the files their ``EnvironmentFile=`` lines load (a token there is in the
    service's environment all the same)."""
    from .secretscan import environment_files, redact, scan_file

    findings = []
    queue: list[tuple[Path, Path | None]] = [(Path(p), None) for p in paths]
    seen: set[Path] = set()
    while queue:
        path, unit = queue.pop(0)
        if path in seen:
            continue
        seen.add(path)
        try:
            hits = scan_file(path)
        except OSError as exc:
            if unit is None:
                findings.append(Finding("service-files", W, str(path), f"cannot be read: {exc.strerror}", "a readable file",
                                        "check the path given with --unit"))
            continue  # an optional EnvironmentFile= that is absent holds nothing
        by_line: dict[int, list] = {}
        for hit in hits:
            by_line.setdefault(hit.line, []).append(hit)
        where = "a service definition: every user can read it" if unit is None else f"the environment of {unit} (EnvironmentFile=)"
        for number, line_hits in by_line.items():
            patterns = ", ".join(h.pattern for h in line_hits)
            findings.append(Finding("service-files", E, f"{path} line {number}", f"looks like it holds a secret ({patterns}): "
                                    f"{redact(line_hits[0].text)}", f"no secret in {where}",
                                    "remove it; pkictl needs none (mTLS), a CA passphrase goes in a 0600 file (--passphrase-file)"))
        if unit is None:
            queue.extend((found, path) for found in environment_files(path))
    if not paths:
        findings.append(Finding("service-files", OK, "", "no installed unit or plist found (name one with --unit)"))
    return findings


CA_CHECKS = (check_home, check_keys, check_certificates, check_crl, check_crl_inventory, check_inventory, check_audit)


def diagnose_ca(home: Path, *, clock: Clock, passphrase: bytes | None = None, service_files: Sequence[Path] = ()) -> list[Finding]:
    """Every CA-host finding for the CA in ``home`` at ``clock.now()``; nothing is modified.

    Args:
        passphrase: the CA key passphrase, to check encrypted keys against their certificates.
        service_files: unit, drop-in and plist files to scan for secrets.

    Returns:
        The findings, ok ones included, in check order.
    """
    home = Path(home)
    if not (home / "ca.yaml").exists() and not (home / "root").exists():
        return [Finding("ca-home", E, str(home), "no CA here", "a CA home (pkictl init-ca)",
                        "pass --home (or set PKICTL_HOME) to the CA home, or run pkictl init-ca")]
    facts = CAFacts(home=home, now=clock.now(), passphrase=passphrase, service_files=service_files)
    findings = run_checks(CA_CHECKS, facts)
    findings += _service_checks(facts)
    findings += service_file_findings(list(service_files))
    return findings
