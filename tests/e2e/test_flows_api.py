"""Flows CRUD through the gateway, end to end: real processes, real NATS and PostgreSQL, real HTTP."""

from __future__ import annotations

import time
import uuid

import httpx
import jwt
import pytest

from stack import SECRET, ProcessStack, token

PROBLEM = "application/problem+json"


def assert_problem(r: httpx.Response, status: int) -> dict:  # type: ignore[type-arg]
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith(PROBLEM), r.headers
    body = r.json()
    assert body["status"] == status and body["title"] and body["detail"] and body["type"]
    return body  # type: ignore[no-any-return]


def new_flow(c: httpx.Client, **body: object) -> dict:  # type: ignore[type-arg]
    r = c.post("/flows", json={"name": f"f-{uuid.uuid4().hex[:6]}", **body})
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def test_crud_round_trip_with_etags(alice: httpx.Client) -> None:
    definition = {
        "nodes": [{"id": "start", "type": "trigger", "data": {}, "width": 10, "selected": True}],
        "edges": [],
        "viewport": {"zoom": 2},
    }
    r = alice.post("/flows", json={"name": "orders", "description": "d", "definition": definition})
    assert r.status_code == 201 and r.headers["ETag"] == '"1"'
    flow = r.json()
    assert r.headers["Location"] == f"/api/v1/flows/{flow['id']}"
    assert flow["status"] == "draft" and flow["active"] is True and flow["definition"] == definition

    got = alice.get(f"/flows/{flow['id']}")
    assert got.status_code == 200 and got.json() == flow and got.headers["ETag"] == '"1"'

    r = alice.patch(f"/flows/{flow['id']}", json={"description": "changed"}, headers={"If-Match": '"1"'})
    assert r.status_code == 200 and r.json()["description"] == "changed" and r.headers["ETag"] == '"2"'
    assert r.json()["name"] == "orders"

    r = alice.put(f"/flows/{flow['id']}", json={"name": "replaced"}, headers={"If-Match": '"2"'})
    assert r.status_code == 200 and r.json()["description"] is None and r.json()["name"] == "replaced"

    assert alice.delete(f"/flows/{flow['id']}").status_code == 204
    assert_problem(alice.get(f"/flows/{flow['id']}"), 404)
    assert_problem(alice.delete(f"/flows/{flow['id']}"), 404)


def test_list_is_paginated(alice: httpx.Client) -> None:
    ids = [new_flow(alice)["id"] for _ in range(5)]
    seen: list[str] = []
    page = 1
    while True:
        body = alice.get("/flows", params={"page": page, "pageSize": 2}).json()
        assert body["total"] == 5 and body["page"] == page and body["pageSize"] == 2
        seen += [f["id"] for f in body["items"]]
        if not body["hasMore"]:
            break
        page += 1
    assert seen == ids[::-1]
    assert alice.get("/flows").json()["pageSize"] == 20
    for bad in ({"pageSize": 101}, {"pageSize": 0}, {"page": 0}, {"page": "x"}):
        assert_problem(alice.get("/flows", params=bad), 422)


def test_every_verb_on_another_tenants_flow_is_404(alice: httpx.Client, mallory: httpx.Client) -> None:
    flow = new_flow(alice)
    url = f"/flows/{flow['id']}"
    assert_problem(mallory.get(url), 404)
    assert_problem(mallory.patch(url, json={"name": "x"}), 404)
    assert_problem(mallory.put(url, json={"name": "x"}), 404)
    assert_problem(mallory.delete(url), 404)
    assert_problem(mallory.delete(url + "?force=true"), 404)
    assert flow["id"] not in [f["id"] for f in mallory.get("/flows", params={"pageSize": 100}).json()["items"]]
    assert alice.get(url).json()["name"] == flow["name"]


def test_stale_etag_is_412_and_changes_nothing(alice: httpx.Client) -> None:
    flow = new_flow(alice)
    url = f"/flows/{flow['id']}"
    etag = alice.get(url).headers["ETag"]
    assert alice.patch(url, json={"name": "first"}, headers={"If-Match": etag}).status_code == 200
    assert_problem(alice.patch(url, json={"name": "second"}, headers={"If-Match": etag}), 412)
    assert_problem(alice.put(url, json={"name": "second"}, headers={"If-Match": etag}), 412)
    assert_problem(alice.delete(url, headers={"If-Match": etag}), 412)
    assert alice.get(url).json()["name"] == "first"


def _bad_tokens() -> list[tuple[str, str | None]]:
    now = int(time.time())
    return [
        ("missing", None),
        ("garbage", "garbage"),
        ("expired", token(exp_in=-120)),
        ("wrong audience", token(aud="other")),
        ("wrong issuer", token(iss="other")),
        ("wrong key", token(secret="another-secret-another-secret-another-secret-another-secret-1234")),
        (
            "alg none",
            jwt.encode(
                {"sub": "a", "iss": "flowmesh", "aud": "flowmesh", "exp": now + 600}, key=None, algorithm="none"
            ),
        ),
        ("no exp", jwt.encode({"sub": "a", "iss": "flowmesh", "aud": "flowmesh"}, SECRET, algorithm="HS256")),
        ("no sub", jwt.encode({"iss": "flowmesh", "aud": "flowmesh", "exp": now + 600}, SECRET, algorithm="HS256")),
        ("HS512", token(alg="HS512")),
    ]


@pytest.mark.parametrize(("case", "tok"), _bad_tokens(), ids=[c for c, _ in _bad_tokens()])
def test_bad_tokens_are_401_problems(stack: ProcessStack, case: str, tok: str | None) -> None:
    headers = {} if tok is None else {"Authorization": f"Bearer {tok}"}
    for method, path in (("GET", "/api/v1/flows"), ("POST", "/api/v1/flows"), ("GET", f"/api/v1/flows/{uuid.uuid4()}")):
        r = httpx.request(method, stack.base + path, headers=headers, json={"name": "x"}, timeout=10)
        assert_problem(r, 401)


def test_other_authorization_schemes_are_401(stack: ProcessStack) -> None:
    r = httpx.get(stack.base + "/api/v1/flows", headers={"Authorization": "Basic YTpi"}, timeout=10)
    assert_problem(r, 401)


def test_token_tenant_claim_scopes_the_data(stack: ProcessStack) -> None:
    org = f"org-{uuid.uuid4().hex[:8]}"
    with stack.client("bob", tenant=org) as bob, stack.client("carol", tenant=org) as carol:
        flow = new_flow(bob)
        assert carol.get(f"/flows/{flow['id']}").json()["tenantId"] == org


@pytest.mark.parametrize(
    ("kwargs", "status"),
    [
        ({"content": b"{not json", "headers": {"Content-Type": "application/json"}}, 400),
        ({"content": b"name=x", "headers": {"Content-Type": "application/x-www-form-urlencoded"}}, 415),
        ({"json": {"name": ""}}, 422),
        ({"json": {"name": "x", "unknownField": 1}}, 422),
        ({"json": {"name": "x" * 101}}, 422),
        ({"json": {"name": 5}}, 422),
        ({"json": {"name": "x", "description": ["no"]}}, 422),
        ({"json": [1, 2, 3]}, 422),
        ({"json": "a string"}, 422),
        ({"json": {"name": "x", "definition": "not an object"}}, 422),
        ({"json": {"name": "x", "definition": {"nodes": [{"type": "trigger"}]}}}, 422),
        ({"json": {}}, 422),
    ],
)
def test_bad_bodies_are_4xx_problems_and_change_nothing(alice: httpx.Client, kwargs: dict, status: int) -> None:  # type: ignore[type-arg]
    before = alice.get("/flows").json()["total"]
    body = assert_problem(alice.post("/flows", **kwargs), status)
    if status == 422:
        assert body["errors"], body
    assert alice.get("/flows").json()["total"] == before


def test_bad_patch_and_put_bodies_are_422(alice: httpx.Client) -> None:
    url = f"/flows/{new_flow(alice)['id']}"
    assert_problem(alice.patch(url, json={"name": None}), 422)
    assert_problem(alice.patch(url, json={"bogus": 1}), 422)
    assert_problem(alice.put(url, json={"description": "no name"}), 422)
    assert alice.get(url).headers["ETag"] == '"1"'


def test_body_over_one_mib_is_413(alice: httpx.Client) -> None:
    big = b'{"name": "x", "description": "' + b"a" * (1024 * 1024) + b'"}'
    try:
        r = alice.post("/flows", content=big, headers={"Content-Type": "application/json"})
    except httpx.TransportError:
        return  # refused before the whole body was sent
    assert_problem(r, 413)


def test_unknown_routes_and_methods_are_problems(alice: httpx.Client) -> None:
    assert_problem(alice.get("/nothing-here"), 404)
    r = alice.post(f"/flows/{uuid.uuid4()}", json={})
    assert_problem(r, 405)
    assert "GET" in r.headers["Allow"]


def test_request_id_is_echoed_or_made(alice: httpx.Client) -> None:
    assert alice.get("/flows", headers={"X-Request-Id": "abc-123"}).headers["X-Request-Id"] == "abc-123"
    assert len(alice.get("/flows").headers["X-Request-Id"]) == 32


def test_health_readiness_and_metrics(stack: ProcessStack) -> None:
    assert httpx.get(stack.base + "/healthz").status_code == 200
    ready = httpx.get(stack.base + "/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"nats": True, "flows": True, "runner": True, "usage": True, "scheduler": True}
    m = httpx.get(stack.base + "/metrics")
    assert m.status_code == 200 and "flowmesh_http_requests_total" in m.text


def test_flows_down_is_a_quick_503_and_the_gateway_recovers_by_itself(stack: ProcessStack) -> None:
    with stack.client("dora") as c:
        assert c.get("/flows").status_code == 200
        stack.kill("flows")
        try:
            started = time.monotonic()
            body = assert_problem(c.post("/flows", json={"name": "while down"}), 503)
            assert time.monotonic() - started < 1.0
            assert "flows" in body["detail"]
            assert_problem(c.get("/flows"), 503)
            assert httpx.get(stack.base + "/readyz").status_code == 503
        finally:
            stack.start("flows")
        deadline = time.monotonic() + 60
        while c.get("/flows").status_code != 200:
            assert time.monotonic() < deadline, stack.logs("flows")
            time.sleep(0.1)
        assert c.post("/flows", json={"name": "after"}).status_code == 201
