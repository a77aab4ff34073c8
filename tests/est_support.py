"""EST test support: ``pkictl serve`` in-process on its own loop thread or as a real process, and
curl / openssl as the EST clients (real subprocesses, none of our code on the client side)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
import secrets
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from cryptography import x509

from pkictl.authority import CertificateAuthority
from pkictl.clock import Clock
from pkictl.inventory import Inventory
from pkictl.est.serve import ESTService

from support import DEADLINE, LogWatcher, command

__all__ = [
    "CURL",
    "EST",
    "OPENSSL",
    "Reply",
    "RunningService",
    "ServeProcess",
    "certs_only",
    "curl",
    "est_body",
    "make_csr",
    "openssl",
    "pkictl",
    "public_key_der",
    "serials",
]

EST = "/.well-known/est"  # RFC 7030 3.2.2, spelled out here rather than imported from the product
CURL = shutil.which("curl")
OPENSSL = shutil.which("openssl")
assert CURL and OPENSSL, "curl and openssl are required for the EST interop tests"


class RunningService:
    """An :class:`ESTService` on 127.0.0.1 (port 0), running on its own event-loop thread.

    The CA is loaded with :meth:`CertificateAuthority.load` on that thread, because its sqlite3
    connection may be used only by the thread that opened it.

    Args:
        home: the CA home.
        clock: the CA's clock (default the system clock).
        **options: keyword arguments of :class:`ESTService` (retry_after, rate, burst, ...).
    """

    def __init__(self, home: Path, *, clock: Clock | None = None, **options) -> None:
        self.home, self.clock, self.options = Path(home), clock, options
        self.loop = asyncio.new_event_loop()
        self.service: ESTService | None = None
        self.port = 0
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        ca = None
        try:
            ca = CertificateAuthority.load(self.home, clock=self.clock)
            self.service = ESTService(ca, listen=("127.0.0.1", 0), **self.options)

            def ready(port: int) -> None:
                self.port = port
                self._ready.set()

            self.loop.run_until_complete(self.service.run(handle_signals=False, ready=ready))
        except BaseException as exc:  # noqa: BLE001 - surfaced by start(), in the test's thread
            self.error = exc
            self._ready.set()
        finally:
            if ca is not None:
                ca.close()

    def start(self) -> RunningService:
        self._thread.start()
        assert self._ready.wait(DEADLINE), "the EST service did not become ready"
        if self.error:
            raise self.error
        return self

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self._thread.is_alive() and self.service is not None:
            self.loop.call_soon_threadsafe(self.service.stop)
            self._thread.join(DEADLINE)
            assert not self._thread.is_alive(), "the EST service did not stop"
        self.loop.close()


class ServeProcess:
    """``pkictl --home H serve --listen 127.0.0.1:0 ...`` as a real subprocess, its log watched
    (``cwd`` and ``env``: its working directory and extra environment variables)."""

    def __init__(self, home: Path, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [command("pkictl"), "--home", str(home), "serve", "--listen", "127.0.0.1:0", *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=cwd,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self.log = LogWatcher(self.proc.stderr)
        self.port = int(self.log.wait_for(r"ready: EST on https://127\.0\.0\.1:(\d+)").group(1))

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(DEADLINE)
            raise AssertionError("pkictl serve did not stop within 10 s of SIGTERM") from None


@dataclasses.dataclass
class Reply:
    """What curl got: the exit status, the HTTP status (0 if none), the last response's headers
    (lower-case names) and body, curl's stderr, and the local port it connected from (0 if none)."""

    returncode: int
    status: int
    headers: dict[str, str]
    body: bytes
    stderr: str
    local_port: int = 0

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


def _last_headers(raw: str) -> dict[str, str]:
    """The header block of the final response (after any ``100 Continue``)."""
    blocks = [b for b in raw.replace("\r\n", "\n").split("\n\n") if b.strip()]
    headers: dict[str, str] = {}
    for line in (blocks[-1].splitlines()[1:] if blocks else []):
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return headers


def curl(url: str, *args: str, cacert: Path, data: bytes | None = None, content_type: str | None = None) -> Reply:
    """Run curl once against ``url`` (POST ``data`` when given), trusting only ``cacert``.

    Extra ``args`` go to curl as they are (``-u NAME:TOKEN``, ``--cert``, ``--key``).
    """
    with tempfile.TemporaryDirectory() as scratch:
        headers, body = Path(scratch) / "headers", Path(scratch) / "body"
        argv = [CURL, "-sS", "--max-time", str(int(DEADLINE)), "--cacert", str(cacert), "-D", str(headers), "-o", str(body),
                "-w", "%{http_code} %{local_port}", *args]
        if data is not None:
            argv += ["--data-binary", "@-"]
        if content_type is not None:
            argv += ["-H", f"Content-Type: {content_type}"]
        result = subprocess.run([*argv, url], check=False, input=data, capture_output=True, timeout=DEADLINE + 5)
        status, _, port = result.stdout.decode().strip().partition(" ")
        return Reply(
            returncode=result.returncode,
            status=int(status or 0),
            local_port=int(port or 0),
            headers=_last_headers(headers.read_text()) if headers.exists() else {},
            body=body.read_bytes() if body.exists() else b"",
            stderr=result.stderr.decode(errors="replace"),
        )


def openssl(*args: str, input: bytes | None = None) -> bytes:
    """Run ``openssl ARGS``; return its stdout, failing the test on a non-zero exit status."""
    result = subprocess.run([OPENSSL, *args], check=False, input=input, capture_output=True, timeout=DEADLINE)
    assert result.returncode == 0, f"openssl {' '.join(args)}: {result.stderr.decode(errors='replace')}"
    return result.stdout


def make_csr(directory: Path, *, subject: str = "/CN=TW", san: str | None = None, key: Path | None = None) -> tuple[Path, Path]:
    """An ``openssl req`` CSR (DER) for ``subject`` (and a subjectAltName such as ``URI:...``),
    with a new P-256 key unless ``key`` is given. Returns ``(csr_der, key_pem)``."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = secrets.token_hex(4)
    csr = directory / f"csr-{stem}.der"
    args = ["req", "-new", "-subj", subject, "-outform", "DER", "-out", str(csr)]
    if key is None:
        key = directory / f"key-{stem}.pem"
        args += ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key)]
    else:
        args += ["-key", str(key)]
    if san is not None:
        args += ["-addext", f"subjectAltName={san}"]
    openssl(*args)
    return csr, key


def est_body(csr_der: Path) -> bytes:
    """The CSR as RFC 7030 4.2.1 sends it: base64 of the DER (``openssl base64``)."""
    return openssl("base64", "-in", str(csr_der))


def certs_only(body: bytes) -> list[x509.Certificate]:
    """Certificates of a base64 PKCS#7 certs-only body, as ``openssl pkcs7 -print_certs`` reads them."""
    pem = openssl("pkcs7", "-inform", "DER", "-print_certs", input=base64.b64decode(body))
    return x509.load_pem_x509_certificates(pem)


def public_key_der(key_pem: Path) -> bytes:
    """The SubjectPublicKeyInfo (DER) of a private key file, by ``openssl pkey -pubout``."""
    return openssl("pkey", "-in", str(key_pem), "-pubout", "-outform", "DER")


def pkictl(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the installed ``pkictl --home HOME ARGS``; fail unless it exits 0 when ``check``."""
    result = subprocess.run([command("pkictl"), "--home", str(home), *args], check=False, capture_output=True, text=True, timeout=DEADLINE)
    if check:
        assert result.returncode == 0, f"pkictl {' '.join(args)} -> {result.returncode}: {result.stdout}{result.stderr}"
    return result


def serials(home: Path) -> set[int]:
    """Serial numbers of every certificate signed by the CA in ``home`` (issued or revoked)."""
    inventory = Inventory.open(Path(home))
    try:
        return {r.serial for r in inventory.records(latest_only=False)}
    finally:
        inventory.close()


def ca_with_nodes(tmp_path: Path, names) -> Path:
    """A new CA home in ``tmp_path/ca`` with node ``name`` enrolled into ``tmp_path/name`` for
    each of ``names``; returns the home."""
    from pkictl.settings import CASettings

    home = tmp_path / "ca"
    ca = CertificateAuthority.init(home, CASettings())
    for name in names:
        ca.enroll("node", name, out=tmp_path / name)
    ca.close()
    return home
