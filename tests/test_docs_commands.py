"""Every pkictl and pki-agent command in the shell blocks of README.md and docs/*.md names a real
subcommand and real options, so that the guides cannot drift from the CLI."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from pki_agent.cli import cli as agent_cli
from pkictl.cli import cli as pkictl_cli

ROOT = Path(__file__).resolve().parents[1]
# The guides; docs/design.md holds design notes, not commands to type.
DOCS = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "design.md")]
PROGRAMS = {"pkictl": pkictl_cli, "pki-agent": agent_cli}
_BLOCK = re.compile(r"^```(?:sh|bash|shell)\n(.*?)^```", re.M | re.S)


def shell_commands(text: str) -> list[list[str]]:
    """The pkictl / pki-agent invocations in the shell blocks of ``text``, as argument lists."""
    found = []
    for block in _BLOCK.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if not line or line.startswith("#"):
                continue
            for segment in re.split(r"&&|\|\||[|;]", line):
                try:
                    words = shlex.split(segment)
                except ValueError:
                    continue
                while words and (words[0] == "sudo" or "=" in words[0] and not words[0].startswith("-")):
                    words = words[3:] if words[:2] == ["sudo", "-u"] else words[1:]
                if words and Path(words[0]).name in PROGRAMS:
                    found.append([Path(words[0]).name, *words[1:]])
    return found


def check_invocation(words: list[str]) -> None:
    """Walk ``words`` through the click command tree; raise AssertionError on an unknown
    subcommand or option."""
    command: click.Command = PROGRAMS[words[0]]
    path = [words[0]]
    args = iter(words[1:])
    for word in args:
        if word.startswith("-") and word != "-":
            name = word.split("=", 1)[0]
            option = next((p for p in command.get_params(click.Context(command)) if name in p.opts + p.secondary_opts), None)
            assert option is not None, f"{' '.join(words)}: '{' '.join(path)}' has no option {name}"
            if not (option.is_flag or option.count) and "=" not in word:
                next(args, None)
        elif isinstance(command, click.Group):
            assert word in command.commands, f"{' '.join(words)}: '{' '.join(path)}' has no subcommand {word!r}"
            command = command.commands[word]
            path.append(word)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_documented_commands_match_the_cli(doc):
    """Each pkictl / pki-agent command in the document's shell blocks uses existing subcommands and options."""
    commands = shell_commands(doc.read_text())
    assert commands, f"{doc.name}: no pkictl or pki-agent command found (the parser would check nothing)"
    for words in commands:
        check_invocation(words)


def test_the_checker_catches_a_misspelled_option_and_subcommand():
    """The checker itself refuses an unknown option and an unknown subcommand (so a pass means something)."""
    check_invocation(["pkictl", "--home", "/x", "enroll-node", "TW", "--tunnel", "127.0.0.1:1=gw:2", "--replace"])
    with pytest.raises(AssertionError, match="has no option --tunel"):
        check_invocation(["pkictl", "enroll-node", "TW", "--tunel", "x"])
    with pytest.raises(AssertionError, match="has no subcommand 'enrol'"):
        check_invocation(["pki-agent", "enrol", "--name", "TW"])
    assert shell_commands("```sh\nsudo -u pkictl pkictl --home /h \\\n   revoke TW  # why\n```\n") == [
        ["pkictl", "--home", "/h", "revoke", "TW"]]
