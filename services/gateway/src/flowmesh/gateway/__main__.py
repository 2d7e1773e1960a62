"""``python -m flowmesh.gateway``."""

import asyncio
import logging
import resource
import signal

from aiohttp import web

from flowmesh.gateway.app import create_app
from flowmesh.gateway.settings import GatewaySettings
from flowmesh.runtime.logs import configure_logging
from flowmesh.runtime.memory import freeze_startup_objects

log = logging.getLogger("flowmesh.gateway")


async def serve(settings: GatewaySettings) -> None:
    """Serve HTTP until SIGTERM or SIGINT (any number of them); in-flight requests get time to finish."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(create_app(settings), access_log=None, shutdown_timeout=10)
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.http_host, settings.http_port).start()
        freeze_startup_objects()
        log.info("gateway listening on http://%s:%s", settings.http_host, settings.http_port)
        await stop.wait()
        log.info("gateway stopping")
    finally:
        await runner.cleanup()


def _raise_file_limit() -> None:
    """Every WebSocket is a file descriptor: take the hard limit, not a 1,024 default."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> None:
    """Configure logs and serve."""
    settings = GatewaySettings()
    _raise_file_limit()
    configure_logging("gateway", level=settings.log_level, fmt=settings.log_format)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
