"""The small HTTP server of NATS-only services: ``/healthz``, ``/readyz``, ``/metrics``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from flowmesh.runtime.metrics import render

ReadyCheck = Callable[[], Awaitable[dict[str, bool]]]


def metrics_response() -> web.Response:
    """The Prometheus metrics of this process."""
    body, content_type = render()
    return web.Response(body=body, headers={"Content-Type": content_type})


def create_health_app(ready: ReadyCheck) -> web.Application:
    """Liveness always answers while the loop runs; readiness reports each dependency."""

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        checks = await ready()
        ok = all(checks.values())
        return web.json_response({"status": "ok" if ok else "unavailable", "checks": checks}, status=200 if ok else 503)

    async def metrics(_: web.Request) -> web.Response:
        return metrics_response()

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


class HealthServer:
    """Runs the health app on its own port beside the service's NATS work."""

    def __init__(self, ready: ReadyCheck, *, host: str, port: int) -> None:
        self._runner = web.AppRunner(create_health_app(ready), access_log=None)
        self.host = host
        self.port = port

    async def start(self) -> None:
        """Listen; with port 0 the chosen port is stored in :attr:`port`."""
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        if server is not None and self.port == 0:
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def stop(self) -> None:
        """Stop listening."""
        await self._runner.cleanup()
