"""The bad-input corpus, sent to every operation of the committed OpenAPI document (P9).

Each documented path parameter, query parameter, header parameter and JSON body gets values a
careless or hostile client sends: NUL and other control characters, bytes that are not UTF-8, lone
surrogates, over-long strings, numbers that are not finite or not 64-bit, deep nesting, the wrong
JSON type. Every answer must be below 500 and, when it refuses, a problem+json body; and the
tenant's flows and runs are the same afterwards. A new route is in the corpus the day it is
documented, with nothing to add here.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from stack import ProcessStack, chain, publish_flow, token, wait_run

DOCUMENT = json.loads((Path(__file__).resolve().parents[2] / "docs" / "api" / "openapi.json").read_text())
METHODS = ("get", "post", "put", "patch", "delete")

# already percent-encoded: they are put in the URL as they are
PATH_VALUES = (
    "%00",
    "a%00b",
    "%ED%A0%80",  # a lone surrogate, as UTF-8 bytes
    "%FF%FE",  # not UTF-8
    "%0A",
    "%2E%2E",
    "x" * 2000,
    "9" * 40,
    "-1",
    "%F0%9F%92%A9",
)
QUERY_VALUES = (*PATH_VALUES, "", "NaN", "Infinity", "1e309", "18446744073709551616", "[]", "{}")
HEADER_VALUES = ("x" * 2000, "*", 'W/"1"', '"-1"', '"99999999999999999999"', "%00", "a b", b"\xe9\xff")
BODIES = (  # not an empty body: routes whose fields are all optional read it as {}, rightly
    b"null",
    b"NaN",
    b"[]",
    b'"\\ud800"',
    b"\xff\xfe\x00",
    b'{"name": "\\u0000", "input": NaN}',
    b'{"input": 1e309, "value": Infinity, "config": -Infinity}',
    b'{"input": 18446744073709551616, "plan": 18446744073709551616}',
    b'{"name": "\\ud800", "provider": "\\udfff", "apiKey": "\\ud800"}',
    b"[" * 5000 + b"]" * 5000,
    b'{"a": ' * 500 + b"1" + b"}" * 500,
    b"{" + b",".join(b'"k%d": 1' % i for i in range(50_000)) + b"}",
    b'{"name": true, "definition": "yes", "type": 1, "config": [], "enabled": "yes", "plan": null}',
)


def _operations() -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method, path, op)
        for path, ops in DOCUMENT["paths"].items()
        for method, op in ops.items()
        if method in METHODS and path not in ("/metrics", "/docs", "/openapi.json")
    ]


def _parameters(op: dict[str, Any]) -> list[dict[str, Any]]:
    """The operation's parameters, references resolved."""
    resolved = []
    for p in op.get("parameters", []):
        if "$ref" in p:
            p = DOCUMENT["components"]["parameters"][p["$ref"].rsplit("/", 1)[1]]
        resolved.append(p)
    return resolved


@pytest.fixture(scope="module")
def tenant() -> str:
    return f"corpus-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def real(stack: ProcessStack, tenant: str) -> dict[str, str]:
    """Real resources for the parameters that are not under test (a bad value in one, good in the rest)."""
    with stack.client(tenant) as c:
        flow_id = publish_flow(c, chain(1))
        trigger = c.post(f"/flows/{flow_id}/triggers", json={"type": "webhook", "name": "hook"})
        assert trigger.status_code == 201, trigger.text
        run = c.post(f"/flows/{flow_id}/runs", json={"input": {"v": 1}})
        assert run.status_code == 201, run.text
        wait_run(c, run.json()["id"])
        return {
            "flowId": flow_id,
            "runId": run.json()["id"],
            "triggerId": trigger.json()["id"],
            "token": uuid.uuid4().hex,  # not the real one: any JSON body would start a run
            "version": "1",
            "provider": "openai",
            "tenantId": tenant,
        }


@pytest.fixture(scope="module")
def client(stack: ProcessStack, tenant: str) -> Iterator[httpx.Client]:
    # the tenant is an operator too, so the admin routes are reached past their role check
    headers = {"Authorization": "Bearer " + token(tenant, role="admin")}
    with httpx.Client(base_url=stack.base, timeout=30, headers=headers) as c:
        yield c


def _url(method: str, path: str, op: dict[str, Any], real: dict[str, str], bad: dict[str, str]) -> str:
    url = path
    for p in _parameters(op):
        if p["in"] == "path":
            # what could change something (a DELETE, a POST without a body) never reaches a real resource
            harmless = method == "get" or "requestBody" in op
            good = real.get(p["name"], "x") if harmless else str(uuid.uuid4())
            url = url.replace("{" + p["name"] + "}", bad.get(p["name"], good))
    return url


def _check(r: httpx.Response, what: str) -> None:
    assert r.status_code < 500, f"{what}: {r.status_code} {r.text[:300]}"
    if r.status_code >= 400:
        assert r.headers.get("content-type", "").startswith("application/problem+json"), f"{what}: {r.headers}"


def _cases(
    method: str, path: str, op: dict[str, Any]
) -> Iterator[tuple[str, dict[str, str], str, dict[str, str | bytes]]]:
    """(what, bad path values, query string, headers) for each bad value of each parameter."""
    for p in _parameters(op):
        name, where = p["name"], p["in"]
        if where == "path":
            for v in PATH_VALUES:
                yield f"{method} {path} path {name}={v[:20]}", {name: v}, "", {}
        elif where == "query":
            for v in QUERY_VALUES:
                yield f"{method} {path} query {name}={v[:20]}", {}, f"?{name}={v}", {}
        elif where == "header" and name != "Sec-WebSocket-Protocol":
            for v in HEADER_VALUES:
                yield f"{method} {path} header {name}={v[:20]!r}", {}, "", {name: v}


@pytest.mark.parametrize(("method", "path", "op"), _operations(), ids=lambda x: x if isinstance(x, str) else "")
def test_every_parameter_refuses_the_corpus_with_a_4xx(
    method: str, path: str, op: dict[str, Any], client: httpx.Client, real: dict[str, str]
) -> None:
    for what, bad, query, headers in _cases(method, path, op):
        url = _url(method, path, op, real, bad) + query
        body = b"[]" if "requestBody" in op else None  # every body is an object: refused if reached
        _check(client.request(method.upper(), url, content=body, headers={**JSON, **headers}), what)


JSON = {"Content-Type": "application/json"}
BODY_OPERATIONS = [(m, p, op) for m, p, op in _operations() if "requestBody" in op]


@pytest.mark.parametrize(("method", "path", "op"), BODY_OPERATIONS, ids=lambda x: x if isinstance(x, str) else "")
def test_every_body_refuses_the_corpus_with_a_4xx(
    method: str, path: str, op: dict[str, Any], client: httpx.Client, real: dict[str, str]
) -> None:
    url = _url(method, path, op, real, {})
    for body in BODIES:
        _check(client.request(method.upper(), url, content=body, headers=JSON), f"{method} {path} {body[:40]!r}")


def test_the_corpus_changed_nothing(client: httpx.Client, real: dict[str, str], tenant: str) -> None:
    """Runs last in this module: one flow, one trigger, one run, as the fixture made them."""
    flows = client.get("/api/v1/flows").json()
    assert [f["id"] for f in flows["items"]] == [real["flowId"]]
    runs = client.get("/api/v1/runs").json()
    assert [r["id"] for r in runs["items"]] == [real["runId"]]
    triggers = client.get(f"/api/v1/flows/{real['flowId']}/triggers").json()
    assert [t["id"] for t in triggers["items"]] == [real["triggerId"]]
    assert client.get("/api/v1/api-keys").json()["items"] == []
