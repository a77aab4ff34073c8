"""The agent configuration (YAML): a schema with types, ranges and no unknown keys.

Relative paths are resolved against the directory of the configuration file, so a bundle
directory copied anywhere keeps working.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path
from typing import Annotated, Literal, Optional

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from pkictl.bundle_config import check_gateway_port, check_loopback, parse_address
from pkictl.errors import PKIError
from pkictl.formats import Keystore, VersionLayout, read_keystore_password
from pkictl.names import validate_name
from pkictl.settings import parse_duration

from .listener.authz import allowed_names
from .consumer_config import Pkcs12Config, group_id
from .errors import ConfigError

__all__ = [
    "AgentConfig",
    "RenewalConfig",
    "ListenerConfig",
    "TunnelConfig",
    "MetricsConfig",
    "Pkcs12Config",
    "Hook",
    "load_config",
    "default_workers",
    "MAX_WORKERS",
]


def _duration(value) -> dt.timedelta:
    if isinstance(value, dt.timedelta):
        return value
    try:
        return parse_duration(value)
    except PKIError as exc:
        raise ValueError(str(exc).removeprefix("duration: ")) from None


Duration = Annotated[dt.timedelta, BeforeValidator(_duration)]
Address = Annotated[tuple[str, int], BeforeValidator(parse_address)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RenewalConfig(_Model):
    """How and when this host renews its credential.

    Attributes:
        ca_home: the CA home directory, for renewal on the CA host itself.
        ca_url: the EST server (``https://host:port`` of ``pkictl serve``), for renewal from any
            host; exclusive with ca_home.
        fallback_ca_urls: other replicas of the same CA (``pkictl serve --replica`` on one
            database), tried in order when the one in use cannot be reached; the one that
            answered is used from then on. Needs ca_url.
        refresh_interval: how often to fetch the trust bundle from the EST server.
        crl_refresh_interval: how often a gateway renewing over EST fetches the CRL for its
            listener (a conditional request: an unchanged CRL costs one round trip). A revocation
            reaches the listener within this interval of ``pkictl revoke``.
        reenroll: ``approval``: when this node's certificate can no longer renew (revoked,
            expired, from another CA), make a new key and file a pairing request with the EST
            server, so that the operator only runs ``pkictl approve``; ``off``: say what happened
            and keep retrying (the default).
        ca_passphrase_file: a 0600 file with the CA key passphrase, when the CA keys are
            encrypted (or set PKICTL_CA_PASSPHRASE in the agent's environment).
        fraction: renew at notBefore + fraction x lifetime (lifetime read from the certificate).
        jitter: renew up to this share of the lifetime earlier, drawn once per certificate.
        check_interval: period of the level-triggered "is it due?" check that survives sleep.
        retry_initial, retry_max: exponential backoff after a failed renewal; a retry never
            waits more than a quarter of the time left before notAfter (agent/rotation/schedule.py).
        min_interval: the floor between two renewals by this agent: an attempt sooner than this
            after its last successful renewal is postponed (so no bug can loop against the CA).
        keep_versions: how many credential versions ``archive/`` keeps (the live one included).
    """

    ca_home: Optional[Path] = None
    ca_url: Optional[str] = Field(None, pattern=r"^https://[^/\s]+/?$")
    fallback_ca_urls: tuple[Annotated[str, Field(pattern=r"^https://[^/\s]+/?$")], ...] = ()
    ca_passphrase_file: Optional[Path] = None
    refresh_interval: Duration = dt.timedelta(hours=1)
    crl_refresh_interval: Duration = dt.timedelta(seconds=60)
    reenroll: Literal["approval", "off"] = "off"
    fraction: float = Field(2 / 3, gt=0, lt=1)
    jitter: float = Field(0.05, ge=0, lt=0.5)
    check_interval: Duration = dt.timedelta(minutes=1)
    retry_initial: Duration = dt.timedelta(seconds=10)
    retry_max: Duration = dt.timedelta(hours=1)
    min_interval: Duration = dt.timedelta(minutes=5)
    keep_versions: int = Field(5, ge=2)

    @model_validator(mode="after")
    def _jitter_below_fraction(self) -> "RenewalConfig":
        if self.jitter >= self.fraction:
            raise ValueError(f"jitter ({self.jitter}) must be smaller than fraction ({self.fraction})")
        if self.ca_home is not None and self.ca_url is not None:
            raise ValueError("give ca_home (renew on the CA host) or ca_url (renew over EST), not both")
        if self.fallback_ca_urls and self.ca_url is None:
            raise ValueError("fallback_ca_urls are other replicas of the EST server of ca_url: give ca_url too")
        seen = [url.rstrip("/") for url in (self.ca_url or "", *self.fallback_ca_urls)]
        if len(set(seen)) != len(seen):
            raise ValueError(f"fallback_ca_urls repeats a URL (with ca_url: {', '.join(seen)}): give each replica once")
        if self.reenroll == "approval" and self.ca_url is None:
            raise ValueError("reenroll: approval files the pairing request with the EST server: it needs ca_url")
        return self


def _allow(value):
    if value is None:
        raise ValueError(
            "missing: list the node names let through, e.g. [tw, node-07], or write ['*'] to let in "
            "every node certificate of this CA (the listener does not guess)"
        )
    if isinstance(value, str):
        raise ValueError(f"got the string {value!r}; want a list of node names such as [{value}] or ['*']")
    return value


MAX_WORKERS = 256  # listener.workers at most: beyond the cores of any host this runs on


def default_workers() -> int:
    """The default of ``listener.workers``: the CPUs this process may run on, at most :data:`MAX_WORKERS`."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cpus, MAX_WORKERS))


class ListenerConfig(_Model):
    """The gateway's mTLS listener.

    Attributes:
        listen: where nodes connect (TLS), ``HOST:PORT``; port 0 picks a free port.
        upstream: the real gateway, plain TCP, normally on 127.0.0.1.
        allow: the node names let through after authentication (compared without case), or
            ``["*"]`` for every node certificate of this CA. Required: a listener without it
            refuses to start rather than let everyone in.
        handshake_timeout: a client that has not finished its handshake by then is dropped.
        max_connections: connections beyond this many are refused; a quarter of them is kept for
            nodes that passed the checks, and when the rest is full the oldest connection without
            a checked certificate (of the busiest address) makes room for a new one.
        max_connections_per_peer: connections from one address beyond this many are refused
            (a node behind NAT shares its address with its neighbours: keep it generous); unset,
            a quarter of max_connections (at least 1).
        idle_timeout: a connection with no bytes in either direction for this long is closed.
        max_connection_age: when set, a connection is closed this long after its handshake, so
            that a revocation or a new certificate reaches long-lived connections too.
        crl: PEM file of the CA's CRL(s); when set, a revoked client is refused (checked by
            OpenSSL and again by the listener), a change of the file reloads the listener, and
            established connections of a newly revoked serial are closed.
        report_interval: the connection table goes to the CA at every change and at least this
            often (the heartbeat); the CA takes the gateway for "not reporting" after three
            intervals without a report (docs/design.md, "Fleet view").
        workers: processes that accept and serve connections on ``listen``, each with its own
            event loop on its own core (docs/design.md, "Listener workers"); unset, one per CPU
            this process may run on. ``1`` serves in the agent's own process, as before workers.
            The limits above (max_connections, max_connections_per_peer) hold per worker.
    """

    listen: Address
    upstream: Address
    allow: Annotated[list[str], BeforeValidator(_allow)] = Field(None, validate_default=True)
    crl: Optional[Path] = None
    handshake_timeout: Duration = dt.timedelta(seconds=10)
    max_connections: int = Field(1024, ge=1)
    max_connections_per_peer: Optional[int] = Field(None, ge=1)
    idle_timeout: Duration = dt.timedelta(minutes=10)
    max_connection_age: Optional[Duration] = None
    report_interval: Duration = dt.timedelta(seconds=10)
    workers: Optional[int] = Field(None, ge=1, le=MAX_WORKERS)

    @field_validator("allow")
    @classmethod
    def _allow_names(cls, value: list[str]) -> list[str]:
        names = allowed_names(value)
        return ["*"] if names is None else sorted(names)

    @field_validator("handshake_timeout", "idle_timeout", "max_connection_age", "report_interval")
    @classmethod
    def _positive(cls, value: dt.timedelta | None) -> dt.timedelta | None:
        if value is not None and value <= dt.timedelta(0):
            raise ValueError("must be at least 1s")
        return value

    @model_validator(mode="after")
    def _per_peer_within_total(self) -> "ListenerConfig":
        if self.max_connections_per_peer is not None and self.max_connections_per_peer > self.max_connections:
            raise ValueError(f"max_connections_per_peer: got {self.max_connections_per_peer}, want at most "
                             f"max_connections ({self.max_connections})")
        return self

    @property
    def per_peer_limit(self) -> int:
        """max_connections_per_peer, or its default: a quarter of max_connections."""
        return self.max_connections_per_peer or max(1, self.max_connections // 4)

    @property
    def worker_count(self) -> int:
        """``workers``, or its default: the CPUs this process may run on (its affinity mask, which
        a container's or a unit's CPU set narrows; ``os.cpu_count()`` would count the host's)."""
        return self.workers or default_workers()

    @property
    def allowed_names(self) -> frozenset[str] | None:
        """The lower-case node names let through, or None for every node (``['*']``)."""
        return allowed_names(self.allow)


class TunnelConfig(_Model):
    """The node-side tunnel: plain TCP in on loopback, mTLS out to the gateway (agent/tunnel.py).

    Attributes:
        listen: loopback ``HOST:PORT`` where unmodified local clients connect, e.g.
            ``127.0.0.1:18789``; port 0 picks a free port.
        gateway: the gateway's listener, ``HOST:PORT``; its certificate must chain to ``ca.pem``
            and carry HOST (a DNS name or an IP address) in its subjectAltName (RFC 6125).
        server_name: the name or IP address to verify in the gateway's certificate instead of
            HOST, e.g. dial 192.168.1.10 and verify gw.example.lan; also sent as SNI.
        connect_timeout: TCP connect plus TLS handshake with the gateway.
        max_connections: local connections beyond this many are refused.
    """

    listen: Annotated[Address, AfterValidator(check_loopback)]
    gateway: Annotated[Address, AfterValidator(check_gateway_port)]
    server_name: Optional[str] = Field(None, min_length=1, max_length=253, pattern=r"^[^\s/:]+$|^[0-9A-Fa-f:.]+$")
    connect_timeout: Duration = dt.timedelta(seconds=10)
    max_connections: int = Field(256, ge=1)


def _argv(value):
    if isinstance(value, str):
        raise ValueError(
            f"got the string {value!r}; want a list of arguments such as [systemctl, reload, nginx] "
            "(hooks never run through a shell)"
        )
    if isinstance(value, (list, tuple)):
        # YAML reads "[kill, -HUP, 1234]" with a number in it; an argument is text all the same.
        return [str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for v in value]
    return value


class Hook(_Model):
    """One post-rotation hook: a program to run, or a process to send SIGHUP.

    Exactly one of ``run`` and ``sighup_pid_file``, e.g. ``{run: [systemctl, reload, nginx]}``
    or ``{sighup_pid_file: /run/nginx.pid}``.

    Attributes:
        run: the argument list, executed directly (never through a shell); a relative program
            path with a slash is relative to the configuration file, a bare name is looked up in
            ``PATH=/usr/bin:/bin`` (or the PATH given in ``env``).
        sighup_pid_file: send SIGHUP to the PID in this file (relative to the configuration file).
        timeout: a ``run`` hook's process group is killed after this long.
        env: extra environment variables of a ``run`` hook; it gets only these, PATH and the
            PKI_AGENT_* variables (agent/rotation/hooks.py).
        attempts: how often a failing hook is tried in all.
        retry_wait: the wait before the second attempt, doubled before each further one.
    """

    run: Optional[Annotated[list[str], BeforeValidator(_argv), Field(min_length=1)]] = None
    sighup_pid_file: Optional[Path] = None
    timeout: Duration = dt.timedelta(seconds=30)
    env: dict[str, str] = {}
    attempts: int = Field(3, ge=1, le=10)
    retry_wait: Duration = dt.timedelta(seconds=1)

    @field_validator("run")
    @classmethod
    def _program(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value[0]:
            raise ValueError("the program (first argument) is empty")
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for key, item in value.items():
            if not key or "=" in key or "\0" in key or "\0" in item:
                raise ValueError(f"variable {key!r}: want a name without '=' and no NUL characters")
            if key.startswith("PKI_AGENT_"):
                raise ValueError(f"variable {key}: PKI_AGENT_* variables are set by the agent")
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> "Hook":
        if (self.run is None) == (self.sighup_pid_file is None):
            raise ValueError("want {run: [program, arg, ...]} or {sighup_pid_file: PATH}, exactly one of them")
        if self.sighup_pid_file is not None and ("timeout" in self.model_fields_set or self.env):
            raise ValueError("timeout and env apply to run hooks, not to sighup_pid_file")
        return self

    def describe(self) -> str:
        """How logs name this hook: its argument list, or ``SIGHUP to the PID in FILE``."""
        if self.run is not None:
            return "[" + ", ".join(self.run) + "]"
        return f"SIGHUP to the PID in {self.sighup_pid_file}"


class MetricsConfig(_Model):
    """The agent's local HTTP endpoint: ``GET /healthz`` and Prometheus ``GET /metrics``.

    Attributes:
        listen: ``HOST:PORT`` to serve on; keep it on loopback (no authentication).
    """

    listen: Address


class AgentConfig(_Model):
    """One host's agent: whose credential, where it lives, how it renews, what it serves (a
    gateway's listener, a node's tunnel), and the hooks run (in order) after each rotation.

    ``trust_anchor_sha256`` is the SHA-256 fingerprint of the root this host was told to trust
    (written by ``pki-agent enroll`` and ``pkictl enroll-*``); ``pki-agent doctor`` checks that
    ``ca.pem`` still holds it.

    Attributes:
        log_format: ``text`` (one line per event, ``key=value``) or ``json`` (one JSON object per
            line, the same fields as keys).
        watch: reload as soon as the credential, trust anchors or CRL change on disk (watchfiles);
            the periodic check stays the fallback.
        metrics: the optional ``/healthz`` and ``/metrics`` endpoint.
        pkcs12: also write a PKCS#12 keystore for Java with every version.
        credential_group: a group that may read the key (a consumer that runs as its own user:
            nginx's workers, a Node.js gateway): the credential directory, ``archive/`` and each
            version become 0750 and the key files 0640, of this group, at every install. It must
            exist, and the agent must be root or a member of it.
    """

    name: str
    kind: Literal["node", "gateway"]
    trust_domain: str = "pkictl.internal"
    trust_anchor_sha256: Optional[str] = None
    credential_dir: Path = Path(".")
    renewal: RenewalConfig = RenewalConfig()
    listener: Optional[ListenerConfig] = None
    tunnel: Optional[TunnelConfig] = None
    hooks: list[Hook] = []
    log_format: Literal["text", "json"] = "text"
    watch: bool = True
    metrics: Optional[MetricsConfig] = None
    pkcs12: Optional[Pkcs12Config] = None
    credential_group: Optional[str] = Field(None, min_length=1)

    @field_validator("credential_group")
    @classmethod
    def _group(cls, value: str | None) -> str | None:
        if value is None:
            return None
        gid = group_id(value)
        if os.geteuid() != 0 and gid != os.getegid() and gid not in os.getgroups():
            raise ValueError(f"the agent runs as uid {os.geteuid()}, neither root nor a member of group {value}, so it cannot "
                             f"give the key files to that group: add its user to the group (usermod -aG {value} USER, or "
                             f"SupplementaryGroups={value} in its service) or run it as root")
        return value

    def version_layout(self) -> VersionLayout:
        """What each installed version holds beyond the PEM files, and who may read its keys.

        Raises:
            ValueError: ``credential_group`` no longer exists on this host.
        """
        group = group_id(self.credential_group) if self.credential_group is not None else None
        keystore = Keystore(self.pkcs12.password_file, self.name) if self.pkcs12 is not None else None
        return VersionLayout(group=group, keystore=keystore)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        try:
            return validate_name(value)
        except PKIError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("trust_anchor_sha256")
    @classmethod
    def _fingerprint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        digits = value.strip().lower().removeprefix("sha256:").replace(":", "")
        if not re.fullmatch(r"[0-9a-f]{64}", digits):
            raise ValueError(f"got {value!r}; want sha256:<64 hex digits>, the root fingerprint pkictl prints")
        return digits

    @model_validator(mode="after")
    def _listener_only_on_gateway(self) -> "AgentConfig":
        if self.listener is not None and self.kind != "gateway":
            raise ValueError("listener: only a gateway runs the mTLS listener (kind is node)")
        if self.tunnel is not None and self.kind != "node":
            raise ValueError("tunnel: only a node runs the tunnel to the gateway (kind is gateway)")
        if self.renewal.reenroll == "approval" and self.kind != "node":
            raise ValueError("renewal.reenroll: approval pairs nodes only; a gateway gets a new certificate from "
                             "'pkictl enroll-gateway NAME --replace' on the CA host")
        return self


def load_config(path: Path) -> AgentConfig:
    """Read and validate an agent configuration file.

    Raises:
        ConfigError: the file is missing, not YAML, or breaks the schema; the message names the
            file, each offending field and what was expected.
    """
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:  # YAML is UTF-8 here (read_text)
        raise ConfigError(f"{path}: cannot read it as YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: want a mapping of settings (name:, kind:, ...), got {type(data).__name__}")
    try:
        config = AgentConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{path}: {problems}") from None
    base = path.resolve().parent
    renewal = config.renewal
    for field in ("ca_home", "ca_passphrase_file"):
        if getattr(renewal, field) is not None:
            renewal = renewal.model_copy(update={field: base / getattr(renewal, field)})
    listener = config.listener
    if listener is not None and listener.crl is not None:
        listener = listener.model_copy(update={"crl": base / listener.crl})
    hooks = [_resolve_hook(hook, base) for hook in config.hooks]
    pkcs12 = config.pkcs12
    if pkcs12 is not None:
        pkcs12 = pkcs12.model_copy(update={"password_file": base / pkcs12.password_file})
        try:
            read_keystore_password(pkcs12.password_file)  # here, not at the first rotation weeks later
        except PKIError as exc:
            raise ConfigError(f"{path}: pkcs12.password_file: {exc}") from None
    return config.model_copy(update={"credential_dir": base / config.credential_dir, "renewal": renewal, "listener": listener,
                                     "hooks": hooks, "pkcs12": pkcs12})


def _resolve_hook(hook: Hook, base: Path) -> Hook:
    """Paths in a hook relative to the configuration file's directory ``base``."""
    if hook.sighup_pid_file is not None:
        return hook.model_copy(update={"sighup_pid_file": base / hook.sighup_pid_file})
    assert hook.run is not None, "a hook has run or sighup_pid_file (Hook's validator)"
    program = hook.run[0]
    if "/" in program and not program.startswith("/"):
        return hook.model_copy(update={"run": [str(base / program), *hook.run[1:]]})
    return hook
