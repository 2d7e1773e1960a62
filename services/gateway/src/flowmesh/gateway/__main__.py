"""``python -m flowmesh.gateway``."""

import asyncio
import contextlib
import logging
import resource
import signal
import sys

from aiohttp import web
from pydantic import ValidationError

from flowmesh.gateway import keys
from flowmesh.gateway.app import create_app
from flowmesh.gateway.server import GatewayRunner
from flowmesh.gateway.settings import GatewaySettings
from flowmesh.runtime.logs import configure_logging
from flowmesh.runtime.loop import run
from flowmesh.runtime.memory import freeze_startup_objects
from flowmesh.runtime.service import USAGE, StartupError, settings_problem
from flowmesh.runtime.tracing import configure_tracing, shutdown_tracing

log = logging.getLogger("flowmesh.gateway")


async def serve(settings: GatewaySettings) -> None:
    """Serve HTTP until SIGTERM or SIGINT (any number of them); in-flight requests get time to finish."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    app = create_app(settings)
    runner = GatewayRunner(app, access_log=None, shutdown_timeout=10)
    # a signal while still starting (NATS gone, start-up retrying) gives up starting
    setup = asyncio.ensure_future(runner.setup())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({setup, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if not setup.done():
        setup.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await setup
        log.info("gateway stopped while starting")
        return
    await setup
    try:
        await web.TCPSite(runner, settings.http_host, settings.http_port).start()
        if settings.health_listener:
            await _listen_for_health(runner, settings)
        freeze_startup_objects()
        log.info("gateway listening on http://%s:%s", settings.http_host, settings.http_port)
        await stop.wait()
        if settings.drain_s > 0:
            # still serving, but no longer ready: a load balancer takes this replica out of rotation,
            # and every answer closes its connection so that clients reconnect to another replica
            app[keys.DRAINING].set()
            log.info("gateway draining for %.1f s", settings.drain_s)
            await asyncio.sleep(settings.drain_s)
        log.info("gateway stopping")
    finally:
        await runner.cleanup()


async def _listen_for_health(runner: GatewayRunner, settings: GatewaySettings) -> None:
    """The health port: the probes, and ``/metrics`` or the docs when the settings place them there."""
    site = web.TCPSite(runner, settings.health_host, settings.health_port)
    await site.start()
    server = site._server
    port = server.sockets[0].getsockname()[1] if server is not None else settings.health_port  # type: ignore[attr-defined]
    runner.app[keys.LISTENERS].health_port = port
    log.info("gateway health port on http://%s:%s", settings.health_host, port)


def _raise_file_limit() -> None:
    """Every WebSocket is a file descriptor: take the hard limit, not a 1,024 default."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> None:
    """``python -m flowmesh.gateway [serve|migrate|check]``: configure logs and serve.

    The gateway keeps nothing in PostgreSQL, so ``migrate`` has nothing to do. A configuration that
    cannot work exits with a message naming the setting, without a traceback.
    """
    args = sys.argv[1:] if argv is None else argv
    command = args[0] if args else "serve"
    if command in ("-h", "--help", "help"):
        print(USAGE.format(name="gateway"), end="")  # noqa: T201 - the command's own help
        return
    if command not in ("serve", "migrate", "check") or len(args) > 1:
        sys.exit(f"flowmesh.gateway: unknown arguments {' '.join(args)!r}\n\n" + USAGE.format(name="gateway"))
    try:
        settings = GatewaySettings()
    except ValidationError as exc:
        sys.exit(f"flowmesh.gateway: invalid configuration: {settings_problem(exc)}")
    configure_logging("gateway", level=settings.log_level, fmt=settings.log_format)
    if command == "check":
        create_app(settings)
        print("gateway: configuration OK")  # noqa: T201 - the command's answer
        return
    if command == "migrate":
        log.info("gateway has no database schema: nothing to migrate")
        return
    _raise_file_limit()
    configure_tracing("gateway")
    try:
        run(serve(settings), kind=settings.event_loop)
    except StartupError as exc:
        log.error("gateway cannot start: %s", exc)
        sys.exit(1)
    finally:
        shutdown_tracing()


if __name__ == "__main__":
    main()
