"""``python -m flowmesh.gateway.openapi``: print the document of the gateway as ``create_app`` builds it.

Kept apart from the builder: this is the one module here that imports the application, and nothing
imports it, so the application can serve ``/openapi.json`` without an import cycle.
No NATS or PostgreSQL is needed (connections open only when the application starts).
"""

from __future__ import annotations

import sys

from flowmesh.gateway.app import create_app
from flowmesh.gateway.openapi.document import build_openapi, dumps
from flowmesh.gateway.settings import GatewaySettings


def main() -> None:
    """Write the document, in its committed form, to standard output."""
    app = create_app(GatewaySettings(env="dev", jwt_secret="openapi-" + "x" * 32))
    sys.stdout.write(dumps(build_openapi(app)))


if __name__ == "__main__":
    main()
