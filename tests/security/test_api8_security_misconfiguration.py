"""OWASP API8:2023 Security Misconfiguration.

The risk for Flowmesh: the gateway is the only public door, so what it says by default matters:
a missing header lets a browser sniff or frame an answer, a loose CORS rule lets any web page call
the API with a user's token, a traceback or a library version tells an attacker which flaws to try,
operational pages on the public port expose internals, and a service started in production with a
placeholder secret is open to anyone who read the docs.

What these tests prove: every kind of answer (a handler's, a problem, the docs and their assets, a
route that does not exist, a wrong method, a body or header refused by the server itself, a request
line it cannot parse, a refused WebSocket handshake, a webhook) carries ``nosniff``, ``DENY``, a
``frame-ancestors 'none'`` policy and a ``Server`` that names no library, and none shows a
traceback; CORS echoes only the exact allowed origin, never ``*``, never with credentials, and
refuses other origins' preflights and WebSocket handshakes; production defaults put ``/metrics`` on
the health port; the gateway refuses to start in production with a short or missing JWT secret,
without echoing it. Deeper tests: ``tests/e2e/test_gateway_rules.py`` (the docs page's CSP, CORS
preflights), ``test_gateway_placement.py`` (``FLOWMESH_GATEWAY_METRICS``/``DOCS`` on each port),
``tests/security/test_nats_permissions.py`` (production refuses placeholder NATS passwords and
vault secrets).
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import subprocess
import sys
import uuid
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from flowmesh.contracts.testing import linear, node
from flowmesh.gateway.settings import GatewaySettings
from stack import ProcessStack, bearer, publish_flow, ws_url

SPA = "http://localhost:5173"
VERSION = re.compile(r"aiohttp|python|uvloop|gunicorn|nginx|\d+\.\d+\.\d+", re.IGNORECASE)


class Answer:
    """Status, headers and body of any answer, however it was obtained."""

    def __init__(self, what: str, status: int, headers: dict[str, str], body: str) -> None:
        self.what, self.status, self.body = what, status, body
        self.headers = {k.lower(): v for k, v in headers.items()}


def of(what: str, r: httpx.Response) -> Answer:
    return Answer(what, r.status_code, dict(r.headers), r.text)


def raw(stack: ProcessStack, request: bytes) -> Answer:
    """What the server answers to bytes no HTTP client would send."""
    host, port = urlsplit(stack.base).netloc.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return Answer("raw", int(lines[0].split(" ")[1]), headers, body.decode("latin-1"))


def ws_refusal(stack: ProcessStack, path: str, protocols: list[str], **kw: Any) -> Answer:
    with pytest.raises(InvalidStatus) as exc:
        connect(ws_url(stack, path), subprotocols=protocols, open_timeout=10, **kw)  # type: ignore[arg-type]
    response = exc.value.response
    return Answer(f"ws {path}", response.status_code, dict(response.headers.raw_items()), response.body.decode())


def every_kind_of_answer(stack: ProcessStack, c: httpx.Client) -> list[Answer]:
    flow_id = publish_flow(c, linear(node("a")))
    run_id = c.post(f"/flows/{flow_id}/runs", json={"input": {}}).json()["id"]
    base = stack.base
    good = ["flowmesh.v1", "bearer." + bearer(c)]
    return [
        of("handler", c.get(f"/flows/{flow_id}")),
        of("problem from a service", c.get(f"/flows/{uuid.uuid4()}")),
        of("problem without a token", httpx.get(base + "/api/v1/flows")),
        of("docs", httpx.get(base + "/docs")),
        of("docs asset", httpx.get(base + "/docs/static/swagger-ui.css")),
        of("openapi", httpx.get(base + "/openapi.json")),
        of("no such route", httpx.get(base + "/wp-admin/")),
        of("no such route under the API", c.get("/nothing/here")),
        of("wrong method", httpx.post(base + "/healthz")),
        of("HEAD", httpx.head(base + "/healthz")),
        of("body too large", c.post("/flows", content=b"x" * (2 * 1024 * 1024))),
        of("header too large", httpx.get(base + "/api/v1/flows", headers={"X-Pad": "p" * 9000})),
        of("webhook of no trigger", httpx.post(base + "/api/v1/hooks/whk_" + "0" * 40, json={})),
        of("preflight of another origin", httpx.options(base + "/api/v1/flows", headers=_preflight("https://e.vil"))),
        raw(stack, b"GARBAGE / HTTP/9.9\r\n\r\n"),
        raw(stack, b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n"),
        ws_refusal(stack, f"/ws/runs/{run_id}", ["flowmesh.v1"]),
        ws_refusal(stack, f"/ws/runs/{run_id}", good, origin="https://e.vil"),
        ws_refusal(stack, f"/ws/runs/{uuid.uuid4()}", good),
    ]


def _preflight(origin: str) -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization",
    }


def test_every_kind_of_answer_carries_the_security_headers_and_no_version(
    stack: ProcessStack, victim: httpx.Client
) -> None:
    answers = every_kind_of_answer(stack, victim)
    assert {a.status for a in answers} >= {200, 400, 401, 403, 404, 405, 413, 431}
    for a in answers:
        h = a.headers
        assert h.get("x-content-type-options") == "nosniff", (a.what, a.status, h)
        assert h.get("x-frame-options") == "DENY", (a.what, h)
        assert "frame-ancestors 'none'" in h.get("content-security-policy", ""), (a.what, h)
        assert h.get("server") == "flowmesh", (a.what, h)
        for name in ("x-powered-by", "via", "x-aspnet-version"):
            assert name not in h, (a.what, name)
        assert not VERSION.search(" ".join(f"{k}: {v}" for k, v in h.items() if k != "content-security-policy")), (
            a.what,
            h,
        )
        if a.what not in ("docs", "docs asset", "openapi"):  # Swagger UI's own files name their version
            assert not VERSION.search(a.body), (a.what, a.body[:300])
        assert "Traceback" not in a.body and 'File "' not in a.body, a.what


@pytest.mark.parametrize(
    "origin",
    ["https://e.vil", "null", "http://localhost:5173.e.vil", "http://localhost:5174", "https://localhost:5173", "*"],
)
def test_cors_echoes_only_the_exact_allowed_origin_and_never_credentials(
    stack: ProcessStack, victim: httpx.Client, origin: str
) -> None:
    for r in (
        victim.get("/flows", headers={"Origin": origin}),
        httpx.get(stack.base + "/api/v1/flows", headers={"Origin": origin}),  # a 401 too
        httpx.options(stack.base + "/api/v1/flows", headers=_preflight(origin)),
    ):
        assert "Access-Control-Allow-Origin" not in r.headers, (origin, r.status_code, r.headers)
        assert "Access-Control-Allow-Credentials" not in r.headers
    assert httpx.options(stack.base + "/api/v1/flows", headers=_preflight(origin)).status_code == 403
    allowed = victim.get("/flows", headers={"Origin": SPA})
    assert allowed.headers["Access-Control-Allow-Origin"] == SPA and "Origin" in allowed.headers["Vary"]
    assert "Access-Control-Allow-Credentials" not in allowed.headers
    preflight = httpx.options(stack.base + "/api/v1/flows", headers=_preflight(SPA))
    assert preflight.status_code == 204 and preflight.headers["Access-Control-Allow-Origin"] == SPA
    assert "*" not in preflight.headers.get("Access-Control-Allow-Methods", "")


def test_production_defaults_keep_metrics_off_the_public_port() -> None:
    strong = secrets.token_urlsafe(48)
    production = GatewaySettings(env="production", jwt_secret=strong, nats_user="gateway", nats_password=strong)
    assert production.metrics_placement == "health" and production.health_listener
    assert GatewaySettings(env="dev", jwt_secret=strong).metrics_placement == "public"


def _start(service: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWMESH_", "NATS_", "DATABASE_"))}
    return subprocess.run(
        [sys.executable, "-m", f"flowmesh.{service}"],
        env={**base, "FLOWMESH_ENV": "production", "NATS_URL": "nats://127.0.0.1:9", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


WEAK = "weak-" + uuid.uuid4().hex[:8]
NATS_OK = {"FLOWMESH_NATS_USER": "svc", "FLOWMESH_NATS_PASSWORD": secrets.token_urlsafe(32)}


@pytest.mark.parametrize(
    ("service", "env", "says"),
    [
        ("gateway", {**NATS_OK, "FLOWMESH_JWT_SECRET": WEAK}, "FLOWMESH_JWT_SECRET"),
        ("gateway", {**NATS_OK}, "FLOWMESH_JWT_SECRET"),
    ],
)
def test_production_refuses_to_start_with_a_weak_or_missing_secret(
    service: str, env: dict[str, str], says: str
) -> None:
    done = _start(service, env)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert says in out and "invalid configuration" in out, out
    assert WEAK not in out and "Traceback" not in out, out
