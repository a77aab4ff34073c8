"""The exception tree of the CA package: one root, one subclass per kind of refusal."""

__all__ = [
    "PKIError",
    "CAExistsError",
    "CANotFoundError",
    "SettingsError",
    "InvalidNameError",
    "AlreadyEnrolledError",
    "NotEnrolledError",
    "KeyProtectionError",
    "PolicyError",
    "StoreError",
    "InventoryError",
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
    """A name already has a current certificate."""


class NotEnrolledError(PKIError):
    """A name has no certificate in the inventory."""


class KeyProtectionError(PKIError):
    """A private key file is a symlink or is readable by group or others."""


class PolicyError(PKIError):
    """A request (CSR, re-enrollment) breaks the issuance policy."""


class StoreError(PKIError):
    """A credential directory is missing, incomplete or inconsistent."""


class InventoryError(PKIError):
    """The inventory database cannot be used (for example a newer schema)."""
