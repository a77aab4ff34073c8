"""pkictl: a small private certificate authority (root + issuing CA) and the ``pkictl`` CLI.

The CA is a library first (:class:`pkictl.authority.CertificateAuthority`); the CLI in
:mod:`pkictl.cli` is a thin shell over it.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
