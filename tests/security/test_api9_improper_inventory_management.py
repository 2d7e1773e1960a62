"""OWASP API9:2023 Improper Inventory Management.

The risk for Flowmesh: an API whose real surface is larger than its documented one — an old version
left running, a debug or internal route, an unversioned alias — is attacked where nobody looks, with
none of the current version's checks. Docs that drift from the served routes hide exactly that.

What these tests prove: the document the gateway serves is the committed ``docs/api/openapi.json``;
the application registers exactly the documented operations, plus the routes marked
``@Undocumented("why")`` (the docs page's assets) and nothing else, in both directions; and the paths
an attacker tries for older, unversioned, differently spelled or debugging APIs answer 404 to every
method, with a valid token, without redirecting anywhere. Deeper tests: ``tests/test_openapi*.py``
(the committed document is what ``make openapi`` builds) and ``tests/e2e/test_schemathesis.py``
(every documented operation answers as documented).
"""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path

import httpx
import pytest

from flowmesh.gateway.app import create_app
from flowmesh.gateway.openapi.operation import Operation, Undocumented, documentation_of
from flowmesh.gateway.settings import GatewaySettings
from stack import ProcessStack

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = json.loads((ROOT / "docs/api/openapi.json").read_text())
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")

SHADOW_PATHS = [
    "/api/v0/flows",
    "/api/v2/flows",
    "/api/v1.0/flows",
    "/api/flows",
    "/flows",
    "/v1/flows",
    "/API/V1/FLOWS",
    "/api/v1/Flows",
    "/api/v1/flows/",
    "/api/v1//flows",
    "/api/v1/flows.json",
    "/api/v1/admin/tenants",
    "/api/v1/admin/flows",
    "/api/v1/internal/runs",
    "/api/v1/rpc/fm.rpc.usage.keys.reveal",
    "/api/v1/debug",
    "/admin",
    "/debug/vars",
    "/debug/pprof",
    "/server-status",
    "/actuator/env",
    "/.env",
    "/graphql",
    "/swagger.json",
    "/api-docs",
    "/docs/static/%2e%2e/%2e%2e/pyproject.toml",
]


def shape(path: str) -> str:
    """A path with its parameters unnamed (the document spells them in camelCase, the routes in snake_case)."""
    return re.sub(r"\{[^}]+\}", "{}", path)


def test_the_served_document_is_the_committed_one(stack: ProcessStack) -> None:
    r = httpx.get(stack.base + "/openapi.json", timeout=10)
    assert r.status_code == 200
    assert r.json() == COMMITTED


def test_the_application_registers_exactly_what_is_documented() -> None:
    app = create_app(GatewaySettings(env="test", jwt_secret=secrets.token_urlsafe(48)))
    registered: set[tuple[str, str]] = set()
    undocumented: dict[tuple[str, str], str] = {}
    for route in app.router.routes():
        info = route.resource.canonical if route.resource is not None else ""
        if route.method == "HEAD":
            continue  # aiohttp's own companion of every GET
        doc = documentation_of(route.handler)
        assert doc is not None, f"{route.method} {info} says nothing about itself"
        if isinstance(doc, Undocumented):
            assert doc.reason.strip(), f"{route.method} {info} is left out without a reason"
            undocumented[route.method, info] = doc.reason
        else:
            assert isinstance(doc, Operation)
            registered.add((route.method, info))
    documented = {(m.upper(), shape(p)) for p, item in COMMITTED["paths"].items() for m in item if m.upper() in METHODS}
    assert {(m, shape(p)) for m, p in registered} == documented
    assert set(undocumented) == {("GET", "/docs/static/{name}")}, undocumented


@pytest.mark.parametrize("path", SHADOW_PATHS)
def test_no_older_unversioned_or_debugging_api_answers(stack: ProcessStack, victim: httpx.Client, path: str) -> None:
    auth = {"Authorization": str(victim.headers["Authorization"])}
    with httpx.Client(base_url=stack.base, headers=auth, timeout=10, follow_redirects=False) as c:
        for method in METHODS:
            r = c.request(method, path, json={"name": "x"} if method in ("POST", "PUT", "PATCH") else None)
            assert r.status_code == 404, (method, path, r.status_code, r.text[:200])
            assert r.headers["content-type"].startswith("application/problem+json")
            assert "location" not in r.headers
