"""``pki-agent install-service``: the service definition for this platform, written from the config.

One backend per service manager, with the same function names (``render``, ``default_path``,
``installed_paths``, ``next_steps``), chosen in one place (:func:`backend_for`). Both follow the
shipped ``systemd/pki-agent.service`` and ``launchd/net.pkictl.agent.plist``; what they take
from the configuration is the program and config paths, the directories the agent writes, and
the one capability a port below 1024 needs. Nothing that looks like a secret is ever written
(:mod:`pkictl.diagnosis.secretscan`).
"""

from __future__ import annotations

import dataclasses
import plistlib
import re
import shutil
import sys
from pathlib import Path, PurePosixPath
from typing import Callable, Protocol

from pkictl.files import PUBLIC_FILE_MODE, atomic_write
from pkictl.diagnosis.secretscan import find_secrets, launchd_installed_paths, systemd_installed_paths

from .config import AgentConfig, load_config
from .errors import AgentError

__all__ = ["ServiceSpec", "SystemdBackend", "LaunchdBackend", "BACKENDS", "backend_for", "spec_from_config",
           "install_service"]

# systemd's own hardening hides these trees: ProtectHome= the first, PrivateTmp= the second.
_HOME_TREES = ("/home", "/root", "/run/user")
_TMP_TREES = ("/tmp", "/var/tmp")
# Characters a path may hold in a unit without quoting rules (systemd.syntax(7)): no whitespace,
# quotes, backslashes, specifiers (%) or variables ($).
_UNIT_SAFE_PATH = re.compile(r"[A-Za-z0-9/._+,@:=-]+")


@dataclasses.dataclass(frozen=True)
class ServiceSpec:
    """What a service definition needs, taken from one agent configuration.

    Attributes:
        program: the installed ``pki-agent`` (absolute).
        config: the configuration file (absolute).
        description: e.g. ``node TW``.
        user: the account to run as; None runs as the service manager's default (root).
        writable: directories the agent writes (credential_dir; the CA home on the CA host).
        readable: further files and directories it reads (CRL, passphrase file, config).
        low_port: the listener binds a port below 1024 (needs CAP_NET_BIND_SERVICE).
    """

    program: Path
    config: Path
    description: str
    user: str | None
    writable: tuple[Path, ...]
    readable: tuple[Path, ...]
    low_port: bool = False

    @property
    def paths(self) -> tuple[Path, ...]:
        return (self.program, self.config, *self.writable, *self.readable)


def _under(path: Path, trees: tuple[str, ...]) -> bool:
    return any(PurePosixPath(path).is_relative_to(tree) for tree in trees)


class SystemdBackend:
    """A systemd system unit (Linux), hardened like ``systemd/pki-agent.service``."""

    name = "systemd"

    def default_path(self, spec: ServiceSpec) -> Path:
        return Path("/etc/systemd/system/pki-agent.service")

    def installed_paths(self) -> list[Path]:
        """Where units of pki-agent and pkictl serve are installed, drop-ins (systemctl edit) included."""
        return systemd_installed_paths()

    def render(self, spec: ServiceSpec) -> str:
        """The unit text.

        Raises:
            AgentError: a path holds characters a unit cannot carry unquoted.
        """
        for path in spec.paths:
            if not _UNIT_SAFE_PATH.fullmatch(str(path)):
                raise AgentError(f"{path}: a path with spaces, quotes, '%' or '$' cannot go into a systemd unit as is; "
                                 "move it to a plain path (letters, digits, / . _ - +)")
        user = spec.user if spec.user not in (None, "root") else None
        home = any(_under(p, _HOME_TREES) for p in spec.paths)
        tmp = any(_under(p, _TMP_TREES) for p in spec.paths)
        capability = "CAP_NET_BIND_SERVICE" if spec.low_port else ""
        lines = [
            f"# pki-agent for {spec.description}, written by pki-agent install-service from {spec.config}.",
            "# Reload the credential from disk: systemctl reload pki-agent (SIGHUP). Logs: journalctl -u pki-agent",
            "",
            "[Unit]",
            f"Description=pkictl certificate rotation agent (pki-agent, {spec.description})",
            "Wants=network-online.target",
            "After=network-online.target",
            "",
            "[Service]",
            "Type=exec",
            f"ExecStart={spec.program} run --config {spec.config}",
            "ExecReload=/bin/kill -HUP $MAINPID",
            "Restart=on-failure",
            "RestartSec=5s",
        ]
        if user:
            lines += [f"User={user}", f"Group={user}"]
        lines += [
            "StateDirectory=pki-agent",
            "StateDirectoryMode=0700",
            "ConfigurationDirectory=pki-agent",
            "UMask=0077",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ReadWritePaths=" + " ".join(str(p) for p in spec.writable),
        ]
        if tmp:
            lines.append("# A path below /tmp: a private /tmp would hide it. Move the credential out of /tmp.")
        lines.append(f"PrivateTmp={'no' if tmp else 'yes'}")
        if home:
            lines.append("# A path below /home, /root or /run/user: readable, and writable where ReadWritePaths says.")
        lines.append(f"ProtectHome={'read-only' if home else 'yes'}")
        lines += [f"{key}=yes" for key in (
            "PrivateDevices", "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups")]
        lines.append("RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX")
        lines += [f"{key}=yes" for key in ("RestrictNamespaces", "LockPersonality", "MemoryDenyWriteExecute", "RestrictRealtime",
                                             "RestrictSUIDSGID")]
        lines.append("SystemCallArchitectures=native")
        if capability:
            lines += ["# listener.listen is a port below 1024: just that capability.", f"CapabilityBoundingSet={capability}",
                      f"AmbientCapabilities={capability}"]
        else:
            lines.append("CapabilityBoundingSet=")
        lines += ["", "[Install]", "WantedBy=multi-user.target", ""]
        return "\n".join(lines)

    def next_steps(self, path: Path, spec: ServiceSpec) -> list[str]:
        steps = []
        if spec.user not in (None, "root"):
            steps += [f"id {spec.user} || useradd --system --home-dir /var/lib/pki-agent --shell /usr/sbin/nologin {spec.user}",
                      f"chown -R {spec.user}: " + " ".join(str(p) for p in spec.writable)]
        return steps + ["systemctl daemon-reload", f"systemctl enable --now {path.stem}"]

    def start_command(self) -> str:
        """How an operator starts the installed agent (and keeps it started at boot)."""
        return "systemctl enable --now pki-agent"

    def log_command(self) -> str:
        """Where an operator reads the agent's log."""
        return "journalctl -u pki-agent"


class LaunchdBackend:
    """A launchd daemon (macOS), like ``launchd/net.pkictl.agent.plist``."""

    name = "launchd"
    label = "net.pkictl.agent"
    log_path = "/usr/local/var/log/pki-agent.log"

    def default_path(self, spec: ServiceSpec) -> Path:
        return Path(f"/Library/LaunchDaemons/{self.label}.plist")

    def installed_paths(self) -> list[Path]:
        return launchd_installed_paths()

    def render(self, spec: ServiceSpec) -> str:
        """The plist text (XML)."""
        plist = {
            "Label": self.label,
            "ProgramArguments": [str(spec.program), "run", "--config", str(spec.config)],
            "RunAtLoad": True,
            # Restart after an error exit (systemd's Restart=on-failure); a clean exit after SIGTERM stays stopped.
            "KeepAlive": {"SuccessfulExit": False},
            "StandardOutPath": self.log_path,
            "StandardErrorPath": self.log_path,
            "ProcessType": "Background",
            "Umask": 0o077,
        }
        if spec.user not in (None, "root"):
            plist["UserName"] = plist["GroupName"] = spec.user
        text = plistlib.dumps(plist, fmt=plistlib.FMT_XML, sort_keys=False).decode()
        comment = f"<!-- pki-agent for {spec.description}, written by pki-agent install-service from {spec.config}. -->\n"
        head, _, body = text.partition("<plist ")
        return head + comment + "<plist " + body

    def next_steps(self, path: Path, spec: ServiceSpec) -> list[str]:
        steps = [f"chown -R {spec.user}: " + " ".join(str(p) for p in spec.writable)] if spec.user not in (None, "root") else []
        return steps + [f"launchctl bootstrap system {path}", f"launchctl kill HUP system/{self.label}   # reload the credential"]

    def start_command(self) -> str:
        """How an operator starts the installed agent (RunAtLoad keeps it started at boot)."""
        return f"launchctl bootstrap system /Library/LaunchDaemons/{self.label}.plist"

    def log_command(self) -> str:
        """Where an operator reads the agent's log."""
        return f"tail {self.log_path}"


class Backend(Protocol):
    name: str

    def default_path(self, spec: ServiceSpec) -> Path: ...
    def installed_paths(self) -> list[Path]: ...
    def render(self, spec: ServiceSpec) -> str: ...
    def next_steps(self, path: Path, spec: ServiceSpec) -> list[str]: ...
    def start_command(self) -> str: ...
    def log_command(self) -> str: ...


BACKENDS: dict[str, Backend] = {"systemd": SystemdBackend(), "launchd": LaunchdBackend()}


def backend_for(platform: str | None = None, *, system: str = sys.platform) -> Backend:
    """The backend named ``platform`` (``systemd`` or ``launchd``), or this system's: launchd on
    macOS, systemd elsewhere.

    Raises:
        AgentError: an unknown platform name.
    """
    if platform is None:
        platform = "launchd" if system == "darwin" else "systemd"
    try:
        return BACKENDS[platform]
    except KeyError:
        raise AgentError(f"platform {platform!r}: want one of {', '.join(BACKENDS)}") from None


def _installed_program() -> Path:
    """This installation's ``pki-agent``: next to the running Python (a venv), else on PATH."""
    beside = Path(sys.executable).parent / "pki-agent"
    found = beside if beside.is_file() else Path(shutil.which("pki-agent") or "")
    if not found.name or not found.is_file():
        raise AgentError("cannot find the installed pki-agent next to this Python or on PATH; give --program PATH")
    return found.absolute()


def spec_from_config(config_path: Path, config: AgentConfig, *, user: str | None, program: Path | None = None) -> ServiceSpec:
    """The :class:`ServiceSpec` for ``config`` (loaded from ``config_path``)."""
    writable = [config.credential_dir]
    if config.renewal.ca_home is not None:
        writable.append(config.renewal.ca_home)  # renewals record in its inventory and re-sign its CRL
    crl = config.listener.crl if config.listener is not None else None
    if crl is not None and config.renewal.ca_url is not None and not crl.is_relative_to(config.credential_dir):
        writable.append(crl.parent)  # refreshed from the EST server by an atomic rename in its directory
    readable = [p for p in (config.renewal.ca_passphrase_file, config.listener.crl if config.listener else None) if p is not None]
    low_port = config.listener is not None and 0 < config.listener.listen[1] < 1024
    return ServiceSpec(
        program=Path(program).absolute() if program else _installed_program(),
        config=Path(config_path).absolute(),
        description=f"{config.kind} {config.name}",
        user=user,
        writable=tuple(dict.fromkeys(Path(p) for p in writable)),
        readable=tuple(dict.fromkeys(Path(p) for p in readable)),
        low_port=low_port,
    )


def install_service(config_path: Path, *, backend: Backend, user: str | None, output: Path | None = None,
                    program: Path | None = None, dry_run: bool = False, force: bool = False,
                    say: Callable[[str], None] = print) -> str:
    """Render the service definition for ``config_path`` and write it (or only print it).

    Args:
        backend: from :func:`backend_for`.
        user: the account the service runs as (None: the manager's default, root).
        output: where to write; default the backend's standard path.
        program: the pki-agent to run; default this installation's.
        dry_run: print the text and the path, write nothing.
        force: replace an existing file that differs.

    Returns:
        The rendered text.

    Raises:
        ConfigError: the configuration does not load.
        AgentError: the text looks like it holds a secret, a path cannot go into the file, or
            ``output`` exists with other content and not ``force``; nothing is written.
    """
    config = load_config(config_path)
    spec = spec_from_config(config_path, config, user=user, program=program)
    text = backend.render(spec)
    hits = find_secrets(text)
    if hits:
        lines = ", ".join(f"line {h.line} ({h.pattern})" for h in hits)
        raise AgentError(f"refusing to write a {backend.name} service definition that looks like it holds a secret: {lines}; "
                         "a service definition is readable by every user: rename the paths that trigger it")
    path = Path(output) if output else backend.default_path(spec)
    if dry_run:
        say(text.rstrip("\n"))
        say(f"# dry run: would write {path}")
        return text
    if path.exists() and path.read_text() != text and not force:
        raise AgentError(f"{path} exists with other content; pass --force to replace it (compare first: --dry-run)")
    atomic_write(path, text.encode(), PUBLIC_FILE_MODE)
    say(f"wrote {path}")
    for step in backend.next_steps(path, spec):
        say(f"then: {step}")
    return text
