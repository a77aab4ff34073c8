"""Shared fixtures: a real CA with a gateway and node TW, and an in-process gateway agent."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import itertools
import logging
import os
import threading
from pathlib import Path

import pytest

from pki_agent.config import AgentConfig, ListenerConfig, RenewalConfig
from pkictl import loops
from pki_agent.daemon import Agent
from pkictl.authority import CertificateAuthority
from pkictl.settings import CASettings

from pg import PostgresCluster, PostgresUnavailable, find_bindir
from support import DEADLINE, REQUIRE_ENV, EchoServer


@dataclasses.dataclass
class PKI:
    """A CA home with gateway ``gw`` (IP SAN 127.0.0.1) and node ``TW`` enrolled."""

    home: Path
    ca: CertificateAuthority
    gateway: Path
    node: Path


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    ca = CertificateAuthority.init(tmp_path / "ca", CASettings())
    gateway = ca.enroll("gateway", "gw", out=tmp_path / "gw", ip_addresses=["127.0.0.1"]).directory
    node = ca.enroll("node", "TW", out=tmp_path / "TW").directory
    yield PKI(tmp_path / "ca", ca, gateway, node)
    ca.close()


@pytest.fixture
def echo_server():
    with EchoServer() as server:
        yield server


class RunningAgent:
    """An Agent running on its own event loop thread; call into it with :meth:`call`."""

    def __init__(self, agent: Agent, loop_factory=asyncio.new_event_loop) -> None:
        self.agent = agent
        self.loop = loop_factory()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)
        self.error: BaseException | None = None

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.agent.run(handle_signals=False, ready=self._ready.set))
        except BaseException as exc:  # noqa: BLE001 - surfaced by start(), in the test's thread
            self.error = exc
            self._ready.set()

    def start(self) -> "RunningAgent":
        self._thread.start()
        assert self._ready.wait(DEADLINE), "agent did not become ready"
        if self.error:
            raise self.error
        return self

    @property
    def port(self) -> int:
        return self.agent.listener.addresses[0][1]

    def call(self, coro_or_fn):
        """Run a coroutine (or a plain callable) on the agent's loop and return its result."""
        if asyncio.iscoroutine(coro_or_fn):
            return asyncio.run_coroutine_threadsafe(coro_or_fn, self.loop).result(DEADLINE)

        async def wrapper():
            return coro_or_fn()

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(DEADLINE)

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.agent.stop)
            self._thread.join(DEADLINE)
        self.loop.close()


@pytest.fixture(params=["asyncio", "uvloop"])
def event_loop_factory(request):
    """Each in-process agent test runs on asyncio's loop and on uvloop (pki-agent's default when installed)."""
    factory, _ = loops.event_loop_factory(request.param)
    return factory


@pytest.fixture
def start_gateway_agent(pki: PKI, echo_server: EchoServer, caplog, event_loop_factory):
    """Start the gateway's agent with its listener on 127.0.0.1 (port 0), forwarding to the echo
    server and letting in every node, in the agent's own process (``workers: 1``: the tests read
    its listener's state; worker processes: tests/test_listener_workers.py); keyword arguments
    override listener settings (``watch=True`` turns on the file watcher, off by default so that
    tests reload explicitly)."""
    caplog.set_level(logging.INFO, logger="pki_agent")
    started = []

    def start(*, watch: bool = False, metrics: dict | None = None, clock=None, **listener) -> RunningAgent:
        settings = {"listen": "127.0.0.1:0", "upstream": f"127.0.0.1:{echo_server.port}", "handshake_timeout": 2,
                    "crl": pki.ca.crl_path, "allow": ["*"], "workers": 1, **listener}
        config = AgentConfig(
            name="gw", kind="gateway", credential_dir=pki.gateway,
            renewal=RenewalConfig(ca_home=pki.home, check_interval=3600, jitter=0),
            listener=ListenerConfig(**settings), watch=watch, metrics=metrics,
        )
        running = RunningAgent(Agent(config, clock=clock), event_loop_factory).start()
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


@pytest.fixture
def gateway_agent(start_gateway_agent):
    """The gateway's agent with the default test settings (see start_gateway_agent)."""
    return start_gateway_agent()


@pytest.fixture(scope="session")
def postgres_bindir() -> Path:
    """Where the PostgreSQL server binaries are (tests/pg.py find_bindir). Without them the tests
    that need them are skipped, or fail under PKICTL_REQUIRE_NETNS=1 (CI, which installs Debian's
    postgresql): a skip must not pass for a green run. Tests that start a cluster of their own ask
    for this fixture."""
    try:
        return find_bindir()
    except PostgresUnavailable as exc:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but {exc}", pytrace=False)
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def postgres_cluster(postgres_bindir: Path):
    """One throwaway PostgreSQL server for the whole run (tests/pg.py): initdb and start-up take
    about a second and a half, a database per test (pg_url) a tenth of one."""
    with PostgresCluster() as cluster:
        yield cluster


@pytest.fixture(autouse=True)
def real_now(request: pytest.FixtureRequest) -> None:
    """In a module with ``NOW_FROM_REAL_CLOCK = True``, ``NOW`` (the time its fixed clocks stand
    at) is the time each test starts, not the module's import: the certificates its fixtures make
    at the real time are backdated 5 minutes only, and a long run reaches some modules later than
    that after collecting them all. Whole seconds where the module's NOW has none."""
    module = request.module
    if getattr(module, "NOW_FROM_REAL_CLOCK", False):
        now = dt.datetime.now(dt.timezone.utc)
        module.NOW = now.replace(microsecond=0) if module.NOW.microsecond == 0 else now


_pg_databases = itertools.count(1)


@pytest.fixture
def pg_url(postgres_cluster: PostgresCluster) -> str:
    """A fresh database and role of its own for this test: its libpq URL, with the password in a
    passfile (PostgresCluster.create_database). Never dropped: the cluster goes at the session's end."""
    return postgres_cluster.create_database(f"test_{next(_pg_databases)}")
