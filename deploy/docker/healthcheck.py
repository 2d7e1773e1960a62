"""The image's HEALTHCHECK: GET /healthz on the port the service listens on (slim has no curl).

The gateway answers on its HTTP port (``FLOWMESH_HTTP_PORT``, default 8080); the other services on
their health port (``FLOWMESH_<SERVICE>_HEALTH_PORT``, default 9090). Kubernetes ignores HEALTHCHECK
and uses the Deployment's probes; this serves ``docker run`` and compose.
"""

import os
import sys
import urllib.request

service = os.environ.get("FLOWMESH_SERVICE", "")
if service == "gateway":
    port = os.environ.get("FLOWMESH_HTTP_PORT", "8080")
else:
    port = os.environ.get(f"FLOWMESH_{service.upper()}_HEALTH_PORT", "9090")
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=3) as response:
        sys.exit(0 if response.status == 200 else 1)
except OSError:
    sys.exit(1)
