"""Reading README.md's sections and their shell blocks, for the tests that run what the README says."""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["README", "readme_section", "shell_blocks"]

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_section(title: str, *, level: int = 2) -> str:
    """The text of the README section whose heading (``##`` for ``level`` 2, ``###`` for 3)
    starts with ``title``, up to the next heading of that level or above."""
    text = README.read_text()
    marks = "#" * level
    match = re.search(rf"^{marks} {re.escape(title)}.*?$(.*?)(?=^#{{1,{level}}} |\Z)", text, re.M | re.S)
    assert match, f"README.md has no section '{marks} {title}...' any more"
    return match.group(1)


def shell_blocks(section: str) -> list[list[str]]:
    """The commands of each ```sh block (indented ones in lists too), continuation lines joined."""
    blocks = []
    for body in re.findall(r"^ *```sh\n(.*?)^ *```", section, re.M | re.S):
        lines = [line.split(" # ", 1)[0].strip() for line in body.replace("\\\n", " ").splitlines()]
        blocks.append([" ".join(line.split()) for line in lines if line and not line.startswith("#")])
    return blocks
