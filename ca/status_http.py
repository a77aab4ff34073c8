"""A local plain-HTTP endpoint with ``GET /healthz`` and Prometheus ``GET /metrics``, shared by
``pkictl serve`` and ``pki-agent run``: what to report is theirs, how it is served is here."""

from __future__ import annotations

import functools
from typing import Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["HealthMetricsServer"]


class HealthMetricsServer:
    """``GET /healthz`` (200 ``{"status": "ok"}``, or 503 ``{"status": "failing", "problems": [...]}``)
    and ``GET /metrics`` (Prometheus text) on one address; keep it on loopback (no authentication).

    Args:
        listen: ``(host, port)``; port 0 picks a free port (see :attr:`addresses`).
        health: returns what is wrong now, as messages for the operator; empty when healthy.
        registry: the metrics to expose.
        json_routes: more ``GET`` paths, each answered with the JSON of what its function returns.
    """

    def __init__(self, listen: tuple[str, int], health: Callable[[], list[str]], registry: CollectorRegistry,
                 json_routes: dict[str, Callable[[], object]] | None = None) -> None:
        self.listen = listen
        self._json_routes = json_routes or {}
        self._health = health
        self.registry = registry
        self._runner: web.AppRunner | None = None

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The bound ``(host, port)`` pairs."""
        return [tuple(a[:2]) for a in self._runner.addresses] if self._runner else []

    async def start(self) -> None:
        """Bind and serve.

        Raises:
            OSError: the address cannot be bound.
        """
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        for path, make in self._json_routes.items():
            app.router.add_get(path, functools.partial(self._json, make))
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        host, port = self.listen
        await web.TCPSite(self._runner, host or None, port).start()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _healthz(self, request: web.Request) -> web.Response:
        problems = self._health()
        body: dict[str, object] = {"status": "ok"} if not problems else {"status": "failing", "problems": problems}
        return web.json_response(body, status=503 if problems else 200)

    async def _json(self, make: Callable[[], object], request: web.Request) -> web.Response:
        return web.json_response(make())

    async def _metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(self.registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response
