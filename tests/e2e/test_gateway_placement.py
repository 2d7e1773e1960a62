"""Where the gateway serves ``/metrics`` and the docs: public, on the health port only, or nowhere."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import httpx
import pytest

from stack import ProcessStack, free_port, token


@pytest.fixture(scope="module")
def placed(stack: ProcessStack) -> Iterator[tuple[str, str]]:
    """A gateway replica with metrics on the health port and no docs: (public base, health base)."""
    health = free_port()
    base = stack.start_gateway(
        "placed",
        {
            "FLOWMESH_GATEWAY_METRICS": "health",
            "FLOWMESH_GATEWAY_DOCS": "off",
            "FLOWMESH_GATEWAY_HEALTH_HOST": "127.0.0.1",
            "FLOWMESH_GATEWAY_HEALTH_PORT": str(health),
        },
    )
    try:
        stack.wait_ready(base=base)
        yield base, f"http://127.0.0.1:{health}"
    finally:
        stack.kill("gateway#placed", signal.SIGTERM)


def test_metrics_moved_to_the_health_port_and_docs_off(placed: tuple[str, str]) -> None:
    base, health = placed
    for path in ("/metrics", "/docs", "/openapi.json", "/docs/static/swagger-ui.css"):
        r = httpx.get(base + path)
        assert r.status_code == 404, (path, r.status_code)
        assert r.headers["Content-Type"].startswith("application/problem+json")
    r = httpx.get(base + "/api/v1/flows", headers={"Authorization": "Bearer " + token("placement")})
    assert r.status_code == 200, r.text
    metrics = httpx.get(health + "/metrics")
    assert metrics.status_code == 200 and "flowmesh_http_requests_total" in metrics.text
    assert httpx.get(health + "/healthz").json() == {"status": "ok"}
    assert httpx.get(health + "/readyz?scope=self").status_code == 200
    # the health port is not a second door to the API, and docs that are off are off there too
    api = httpx.get(health + "/api/v1/flows", headers={"Authorization": "Bearer " + token("placement")})
    assert api.status_code == 404
    assert httpx.get(health + "/docs").status_code == 404


def test_by_default_in_development_both_are_public(stack: ProcessStack) -> None:
    assert httpx.get(stack.base + "/metrics").status_code == 200
    assert httpx.get(stack.base + "/docs").status_code == 200
    assert "/metrics" in httpx.get(stack.base + "/openapi.json").json()["paths"]
