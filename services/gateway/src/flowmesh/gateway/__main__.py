"""``python -m flowmesh.gateway``."""

from aiohttp import web

from flowmesh.gateway.app import create_app
from flowmesh.gateway.settings import GatewaySettings
from flowmesh.runtime.logs import configure_logging


def main() -> None:
    """Serve HTTP until SIGTERM/SIGINT; in-flight requests get a few seconds to finish."""
    settings = GatewaySettings()
    configure_logging("gateway", level=settings.log_level, fmt=settings.log_format)
    web.run_app(
        create_app(settings),
        host=settings.http_host,
        port=settings.http_port,
        access_log=None,
        print=None,
        shutdown_timeout=10,
    )


if __name__ == "__main__":
    main()
