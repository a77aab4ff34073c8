"""The exception tree of the CA package: one root, one subclass per kind of refusal."""

__all__ = [
    "PKIError",
    "PathValidationError",
    "Overloaded",
    "CAExistsError",
    "CANotFoundError",
    "SettingsError",
    "InvalidNameError",
    "AlreadyEnrolledError",
    "NotEnrolledError",
    "KeyProtectionError",
    "PolicyError",
    "KeyReused",
    "StoreError",
    "DiskWriteError",
    "CRLRollbackError",
    "InventoryError",
    "PassphraseError",
    "AuditError",
    "LintError",
    "AuthenticationError",
    "AccessDenied",
    "RequestLimitError",
    "PendingApproval",
]


class PKIError(Exception):
    """Root of every error pkictl raises on purpose; the message is meant for the operator."""


class CAExistsError(PKIError):
    """``init-ca`` found a CA already in place and refused to overwrite it."""


class CANotFoundError(PKIError):
    """No CA at the given home directory."""


class SettingsError(PKIError):
    """A CA settings value is malformed or contradicts another."""


class InvalidNameError(PKIError):
    """A node or gateway name is not a valid DNS label."""


class AlreadyEnrolledError(PKIError):
    """A name already has a current certificate (or is being enrolled right now).

    The message says by which serial; what to do about it depends on the command, so callers add
    it with :meth:`with_fix` (the library does not know which option the operator typed).

    Attributes:
        serial: the serial number (hex) holding the name, or None.
    """

    def __init__(self, message: str, *, serial: str | None = None) -> None:
        super().__init__(message)
        self.serial = serial

    def with_fix(self, fix: str) -> "AlreadyEnrolledError":
        """The same refusal with ``fix`` appended (``"...; " + fix``)."""
        return AlreadyEnrolledError(f"{self}; {fix}", serial=self.serial)


class NotEnrolledError(PKIError):
    """A name has no certificate in the inventory."""


class KeyProtectionError(PKIError):
    """A private key file is a symlink or is readable by group or others."""


class PolicyError(PKIError):
    """A request (CSR, re-enrollment) breaks the issuance policy."""


class KeyReused(PolicyError):
    """A request's public key is a CA key of this CA, or belongs to another identity: certified
    for another (kind, name), or waiting for approval as another node's (docs/design.md, "CSR policy").

    ``str()`` never names the other identity, so it can go to an unauthenticated EST client;
    :attr:`operator_message` does, for the operator (the CLI, the audit log).

    Attributes:
        operator_message: the refusal naming the identity that holds the key.
    """

    def __init__(self, message: str, *, operator_message: str) -> None:
        super().__init__(message)
        self.operator_message = operator_message

    def __reduce__(self):  # pickled by pkictl serve's signing workers
        return (_key_reused, (str(self), self.operator_message))


def _key_reused(message: str, operator_message: str) -> "KeyReused":
    return KeyReused(message, operator_message=operator_message)


class StoreError(PKIError):
    """A credential directory is missing, incomplete or inconsistent."""


class DiskWriteError(PKIError, OSError):
    """A file could not be written for lack of room or a broken disk (ENOSPC, EDQUOT, EFBIG, EIO,
    EROFS): the message names the path and the fix (:func:`pkictl.file_errors.write_error`).

    An OSError too (with ``errno`` and ``filename`` of the failure), so a caller that keeps going
    on any OSError (the agent's state file) still does.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CRLRollbackError(StoreError):
    """A CRL file holds, for some issuer, an older CRL than the one in service (a lower CRL
    number, RFC 5280 5.2.3), or another CRL under the same number: a replay or a rollback."""


class InventoryError(PKIError):
    """The inventory database cannot be used (for example a newer schema)."""


class PassphraseError(PKIError):
    """A CA key passphrase is missing, wrong, or too weak to protect the key."""


class AuditError(PKIError):
    """The audit log cannot be appended to: missing directory, torn or unreadable last record, or
    a log and head that disagree (truncated or replaced)."""


class LintError(PolicyError):
    """pkilint found the certificate about to be issued breaks the RFC 5280 profile; nothing was
    signed with the real key (:func:`pkictl.lint.prelint`).

    Attributes:
        findings: the :class:`pkictl.lint.Finding` values, also listed in the message; empty
            when pkilint could not decode the certificate at all.
    """

    def __init__(self, message: str, findings=()) -> None:
        super().__init__(message)
        self.findings = tuple(findings)

    def __reduce__(self):  # pickled by pkictl serve's signing workers
        return type(self), (str(self), self.findings)


class PathValidationError(PKIError):
    """No certification path from a certificate to a trust anchor validates (RFC 5280 section 6)."""


class AuthenticationError(PolicyError):
    """An enrollment's credentials (token, certificate) are missing, wrong, expired or spent."""


class CertificateUnusable(PolicyError):
    """The certificate presented to renew itself can no longer do so (RFC 7030 4.2.2): it is
    revoked, expired or not yet valid, from another CA, or unknown to this CA's inventory.

    Attributes:
        reason: ``revoked``, ``expired``, ``not yet valid``, ``another CA``, ``unknown`` or
            ``superseded`` (renewed already: only an identity's current certificate renews); the
            EST service sends it in the ``Pkictl-Refusal`` header so that the agent can act on it
            (:data:`pkictl.est.wire.REFUSAL_HEADER`).
    """

    REASONS = ("revoked", "expired", "not yet valid", "another CA", "unknown", "superseded")

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        if reason not in self.REASONS:
            raise ValueError(f"reason {reason!r}: want one of {self.REASONS}")
        self.reason = reason

    def __reduce__(self):  # signing workers pickle it back to the service
        return (_certificate_unusable, (str(self), self.reason))


def _certificate_unusable(message: str, reason: str) -> "CertificateUnusable":
    return CertificateUnusable(message, reason=reason)


class AccessDenied(PolicyError):
    """The operator denied the request (``pkictl deny``)."""


class RequestLimitError(PolicyError):
    """An enrollment request is not recorded: too many wait for approval already, under its node
    name or in total (``pending_requests_per_name``, ``pending_requests_total``)."""


class Overloaded(Exception):
    """The EST service has as many enrollments in hand as it answers in time: come back after
    ``retry_after`` seconds (503 with Retry-After, RFC 7030 4.2.3; :mod:`pkictl.est.shedding`).

    Not a PKIError: no refusal of the client (nothing is audited) but an answer to come back later.

    Attributes:
        retry_after: whole seconds to wait, at least 1.
    """

    def __init__(self, retry_after: int, pending: int) -> None:
        super().__init__(f"the CA has {pending} enrollment requests in hand, as many as it answers in time; "
                         f"retry in {retry_after} s (Retry-After)")
        self.retry_after = retry_after


class PendingApproval(Exception):
    """An enrollment waits for the operator's ``pkictl approve`` (EST answers 202, RFC 7030 4.2.3).

    Not a PKIError: it is no refusal (nothing is audited per poll) but an answer to come back later.

    Attributes:
        code: the approval code of the node's key (:func:`pkictl.est.wire.approval_code`).
    """

    def __init__(self, name: str, code: str) -> None:
        super().__init__(f"the request of {name} (code {code}) waits for approval: on the CA host run 'pkictl approve {name} --code {code}'")
        self.name, self.code = name, code

    def __reduce__(self):  # pickled by pkictl serve's signing workers
        return type(self), (self.name, self.code)
