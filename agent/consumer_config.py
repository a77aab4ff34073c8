"""The agent configuration's options for software that reads the credential itself: ``pkcs12`` and ``credential_group``."""

from __future__ import annotations

import grp
from pathlib import Path

from pydantic import BaseModel, ConfigDict

__all__ = ["Pkcs12Config", "group_id"]


class Pkcs12Config(BaseModel):
    """A PKCS#12 keystore for Java (``keystore.p12`` in every credential version, pkictl.formats).

    Attributes:
        password_file: the file holding the keystore password on one line (relative to the
            configuration file), read at every install; the Java program reads the same file.
            Missing, unreadable or empty, it fails the configuration at load time.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    password_file: Path


def group_id(name: str) -> int:
    """The id of group ``name`` (or of a numeric group id).

    Raises:
        ValueError: no such group on this host.
    """
    try:
        return grp.getgrgid(int(name)).gr_gid if name.isdigit() else grp.getgrnam(name).gr_gid
    except KeyError:
        raise ValueError(f"no group {name!r} on this host: create it (groupadd {name}) and add the consumer's user to it "
                         f"(usermod -aG {name} USER), or correct credential_group") from None
