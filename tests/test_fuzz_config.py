"""Fuzz tests of configuration loading: the agent's YAML (pki_agent.config.load_config) and the
CA's ca.yaml (pkictl.settings.CASettings.load and from_dict). Whatever the document holds (values
of the wrong type, huge numbers, odd durations, unknown keys, nested junk, bytes that are no
UTF-8), the only error is the project's own (ConfigError, SettingsError) naming the file."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from pki_agent.config import AgentConfig, load_config
from pki_agent.errors import ConfigError
from pkictl.errors import SettingsError
from pkictl.settings import CASettings

from fuzz_support import fuzz_settings

REPO = Path(__file__).resolve().parent.parent
NODE = yaml.safe_load((REPO / "config" / "node.yaml").read_text())
GATEWAY = yaml.safe_load((REPO / "config" / "gateway.yaml").read_text())
CA_KEYS = [f for f in CASettings.__dataclass_fields__]

# Values of every YAML type, the awkward ones often: huge and negative numbers, inf and nan,
# durations that overflow or are not durations, NUL bytes, nested junk.
_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=2**63 - 10, max_value=2**200),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([float("inf"), float("-inf"), float("nan"), 1e300]),
    st.text(max_size=30),
    st.sampled_from(["10s", "0s", "-1s", "1y", "99999999999999999999y", "9" * 30, "1.5h", "1w", " 5 m ", "0",
                     "127.0.0.1:8443", "[::1]:0", "host:99999", ":", "a\x00b", "*", "sha256:" + "0" * 64, "/", ".", ""]),
)
_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                           st.dictionaries(st.text(max_size=10), inner, max_size=3)),
                       max_leaves=8)


def _with(document: dict, path: str, value) -> dict:
    """``document`` with the value at the dotted ``path`` replaced."""
    document = copy.deepcopy(document)
    *parents, key = path.split(".")
    parent = document
    for step in parents:
        parent = parent[step]
    parent[key] = value
    return document


def _paths(document, prefix=()):
    """Every key path in a nested mapping."""
    for key, value in document.items():
        yield (*prefix, key)
        if isinstance(value, dict):
            yield from _paths(value, (*prefix, key))


@st.composite
def agent_documents(draw):
    """A shipped agent config (node or gateway) with 1 to 4 values replaced, keys removed or
    unknown keys added, at any depth."""
    document = copy.deepcopy(draw(st.sampled_from([NODE, GATEWAY])))
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(sorted(_paths(document), key=str)))
        *parents, key = path
        parent = document
        for step in parents:
            parent = parent[step]
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if action == "replace":
            parent[key] = draw(_VALUES)
        elif action == "delete":
            del parent[key]
        else:
            parent[draw(st.one_of(st.text(max_size=10), st.integers()))] = draw(_VALUES)
        if not isinstance(parent.get(key, None), dict) and not document:
            break
    return document


ca_documents = st.one_of(
    st.dictionaries(st.sampled_from(CA_KEYS), _VALUES, max_size=4),
    st.dictionaries(st.one_of(st.sampled_from(CA_KEYS), st.text(max_size=10), st.integers(), st.booleans()), _VALUES, max_size=3),
    _VALUES,
)
# What a file may hold besides a YAML mapping: any text, bytes that are no UTF-8, YAML oddities.
raw_files = st.one_of(
    st.binary(max_size=64),
    st.text(max_size=64).map(str.encode),
    st.sampled_from([b"", b"---\n---\n", b"[" * 200, b"!!python/object:os.system {}", b"a: &x [*x]", b"? [1]\n: 2",
                     b"\xff\xfe", b"name: \xc3\x28", b"{a: 1, a: 2}", b"%YAML 9.9\n---\n"]),
)


def _write(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(content)
    return path


def _dump(document) -> bytes:
    return yaml.safe_dump(document, allow_unicode=True).encode()


def _agent(path: Path) -> None:
    try:
        config = load_config(path)
    except ConfigError as exc:
        assert str(exc).startswith(f"{path}: "), f"the message does not name the file: {exc}"
        return
    assert isinstance(config, AgentConfig)


def _ca(path: Path) -> None:
    try:
        settings = CASettings.load(path)
    except SettingsError as exc:
        assert str(exc).startswith(f"{path}: "), f"the message does not name the file: {exc}"
        return
    assert isinstance(settings, CASettings)


@fuzz_settings(250)
@given(document=agent_documents())
@example(document=_with(NODE, "renewal.check_interval", 86_400_000_000_000))  # was OverflowError (timedelta)
@example(document=_with(NODE, "tunnel.gateway", [None, None]))  # was TypeError (int(None) in parse_address)
@example(document=_with(GATEWAY, "listener.listen", ["0.0.0.0", float("inf")]))  # was OverflowError
def test_load_config_refuses_any_agent_document_with_a_config_error(tmp_path: Path, document) -> None:
    """An agent config with random values, missing or unknown keys loads or is a ConfigError naming the file."""
    _agent(_write(tmp_path, _dump(document)))


@fuzz_settings(100)
@given(content=st.one_of(raw_files, _VALUES.map(_dump)))
@example(content=b"\x80")  # was UnicodeDecodeError
def test_load_config_refuses_any_file_with_a_config_error(tmp_path: Path, content: bytes) -> None:
    """A file that is no agent config at all (random bytes, YAML of any shape) is a ConfigError naming the file."""
    _agent(_write(tmp_path, content))


@fuzz_settings(250)
@given(document=ca_documents)
@example(document={0: None})  # was TypeError (joining the unknown keys)
@example(document={"": None, 0: None})  # was TypeError (sorting them)
@example(document={"pending_requests_total": float("inf")})  # was OverflowError
@example(document={"node_lifetime": "99999999999999999999y"})  # was OverflowError (timedelta)
def test_ca_settings_refuse_any_document_with_a_settings_error(tmp_path: Path, document) -> None:
    """A ca.yaml with random values or keys loads or is a SettingsError naming the file."""
    _ca(_write(tmp_path, _dump(document)))


@fuzz_settings(100)
@given(content=raw_files)
@example(content=b"\xff\xfe")  # was UnicodeDecodeError
def test_ca_settings_refuse_any_file_with_a_settings_error(tmp_path: Path, content: bytes) -> None:
    """A ca.yaml that is no YAML mapping (random bytes, no UTF-8) is a SettingsError naming the file."""
    _ca(_write(tmp_path, content))
