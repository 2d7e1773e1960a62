"""The gateway's HTTP rules end to end: Idempotency-Key, CORS, rate limits per plan, request time limits.

Two gateway replicas share the stack's NATS and services: the stack's own (plan ``enterprise`` for
every tenant) and ``replica`` (plan ``free``: 20 requests/s, and a 2 s request time limit).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import jwt
import nats
import pytest

from flowmesh.contracts.streams import IDEMPOTENCY_BUCKET
from flowmesh.gateway.idempotency import InFlight, encode, fingerprint, storage_key
from stack import SECRET, ProcessStack, chain, publish_flow, token

SPA = "http://localhost:5173"
REPLICA_TIMEOUT_S = 2


@pytest.fixture(scope="module")
def replica(stack: ProcessStack) -> Iterator[str]:
    base = stack.start_gateway(
        "rules", {"FLOWMESH_DEFAULT_PLAN": "free", "FLOWMESH_GATEWAY_REQUEST_TIMEOUT_S": str(REPLICA_TIMEOUT_S)}
    )
    try:
        stack.wait_ready(base=base)
        yield base
    finally:
        stack.kill("gateway#rules", signal.SIGTERM)


def client(base: str, tenant: str) -> httpx.Client:
    return httpx.Client(base_url=base + "/api/v1", timeout=30, headers={"Authorization": "Bearer " + token(tenant)})


@pytest.fixture
def tenant() -> str:
    return f"rules-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def main(stack: ProcessStack, tenant: str) -> Iterator[httpx.Client]:
    with client(stack.base, tenant) as c:
        yield c


@pytest.fixture
def other(replica: str, tenant: str) -> Iterator[httpx.Client]:
    """The same tenant on the other gateway replica."""
    with client(replica, tenant) as c:
        yield c


def key() -> dict[str, str]:
    return {"Idempotency-Key": uuid.uuid4().hex}


def flow_count(c: httpx.Client) -> int:
    total: int = c.get("/flows").json()["total"]
    return total


def race(n: int, send: Callable[[int], httpx.Response]) -> list[httpx.Response]:
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(send, range(n)))


# --- Idempotency-Key ------------------------------------------------------------------------------


def test_a_repeated_create_replays_the_first_response(main: httpx.Client) -> None:
    k = key()
    first = main.post("/flows", json={"name": "orders", "description": "d"}, headers=k)
    assert first.status_code == 201 and "Idempotent-Replayed" not in first.headers
    # the same JSON, keys in another order and spaced differently
    again = main.post("/flows", content=b'{ "description": "d",  "name": "orders" }', headers=k)
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    assert again.headers["Location"] == first.headers["Location"] and again.headers["ETag"] == first.headers["ETag"]
    assert again.headers["content-type"].startswith("application/json")
    assert again.headers["X-Request-Id"] != first.headers["X-Request-Id"]  # per request, never replayed
    assert flow_count(main) == 1


def test_the_same_key_with_another_body_or_path_is_422_and_keys_are_per_route(main: httpx.Client) -> None:
    k = key()
    assert main.post("/flows", json={"name": "a"}, headers=k).status_code == 201
    r = main.post("/flows", json={"name": "b"}, headers=k)
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json")
    assert "Idempotency-Key" in r.json()["detail"]
    # the same key on another route is another key
    flow_id = main.get("/flows").json()["items"][0]["id"]
    dup = main.post(f"/flows/{flow_id}/duplicate", headers=k)
    assert dup.status_code == 201
    # ...but on the same route template with another id it is another request
    other = main.post("/flows", json={"name": "c"}).json()["id"]
    assert main.post(f"/flows/{other}/duplicate", headers=k).status_code == 422
    assert main.post(f"/flows/{flow_id}/duplicate", headers=k).json()["id"] == dup.json()["id"]
    assert flow_count(main) == 3


def test_a_stored_4xx_is_replayed_too(main: httpx.Client) -> None:
    k = key()
    first = main.post("/flows", json={"name": ""}, headers=k)
    assert first.status_code == 422
    again = main.post("/flows", json={"name": ""}, headers=k)
    assert again.status_code == 422 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()


def test_a_key_used_on_one_replica_is_replayed_by_another(main: httpx.Client, other: httpx.Client) -> None:
    k = key()
    first = main.post("/flows", json={"name": "x"}, headers=k)
    assert first.status_code == 201
    again = other.post("/flows", json={"name": "x"}, headers=k)
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert other.post("/flows", json={"name": "y"}, headers=k).status_code == 422
    assert flow_count(main) == 1


def test_concurrent_duplicates_on_two_replicas_create_once(main: httpx.Client, other: httpx.Client) -> None:
    k = key()
    results = race(12, lambda i: (main if i % 2 else other).post("/flows", json={"name": "race"}, headers=k))
    created = [r for r in results if r.status_code == 201 and "Idempotent-Replayed" not in r.headers]
    assert len(created) == 1, [(r.status_code, r.headers.get("Idempotent-Replayed")) for r in results]
    for r in results:
        assert r.status_code in (201, 409), r.text
        if r.status_code == 201:
            assert r.json()["id"] == created[0].json()["id"]
        else:
            assert r.json()["type"] == "conflict"
    assert flow_count(main) == 1


def test_a_duplicate_while_the_first_is_in_flight_is_409_and_a_5xx_frees_the_key(
    stack: ProcessStack, other: httpx.Client
) -> None:
    k = key()
    flows = stack.procs["flows"]
    flows.send_signal(signal.SIGSTOP)  # the flows service hangs: requests stay in flight until the time limit
    try:
        started = time.monotonic()
        results = race(2, lambda _: other.post("/flows", json={"name": "slow"}, headers=k))
        waited = time.monotonic() - started
    finally:
        flows.send_signal(signal.SIGCONT)
    statuses = sorted(r.status_code for r in results)
    assert statuses == [409, 504], [r.text for r in results]
    timed_out = next(r for r in results if r.status_code == 504)
    assert timed_out.json()["type"] == "timeout" and f"{REPLICA_TIMEOUT_S} s" in timed_out.json()["detail"]
    assert REPLICA_TIMEOUT_S <= waited < REPLICA_TIMEOUT_S + 3
    # the 504 was not stored: the same key runs again
    retry = other.post("/flows", json={"name": "slow"}, headers=k)
    assert retry.status_code == 201 and "Idempotent-Replayed" not in retry.headers


def test_an_abandoned_claim_is_taken_over_after_its_deadline(infra: Any, main: httpx.Client, tenant: str) -> None:
    """A replica that died mid-request leaves its claim behind; it blocks only until its deadline."""
    body = b'{"name":"orphan"}'
    fp = fingerprint("POST", "/api/v1/flows", [], body)

    async def claim(k: str, deadline: float) -> None:
        nc = await nats.connect(infra.nats_url)
        try:
            kv = await nc.jetstream().key_value(IDEMPOTENCY_BUCKET)
            await kv.put(storage_key(tenant, "/api/v1/flows", k), encode(InFlight(fp, deadline)))
        finally:
            await nc.close()

    alive, dead = uuid.uuid4().hex, uuid.uuid4().hex
    asyncio.run(claim(alive, time.time() + 60))
    asyncio.run(claim(dead, time.time() - 1))
    r = main.post("/flows", content=body, headers={"Idempotency-Key": alive})
    assert r.status_code == 409
    r = main.post("/flows", content=body, headers={"Idempotency-Key": dead})
    assert r.status_code == 201 and "Idempotent-Replayed" not in r.headers
    assert flow_count(main) == 1


def test_run_starts_combine_the_gateway_key_with_the_runners(main: httpx.Client, other: httpx.Client) -> None:
    """Concurrent duplicates: one run; a later repeat is the runner's 200 with the run as it is now."""
    flow_id = publish_flow(main, chain(1))
    k = key()
    body = {"input": {"v": 1}}
    results = race(8, lambda i: (main if i % 2 else other).post(f"/flows/{flow_id}/runs", json=body, headers=k))
    created = [r for r in results if r.status_code == 201]
    assert len(created) == 1, [r.status_code for r in results]
    assert all(r.status_code in (200, 201, 409) for r in results), [r.text for r in results]
    run_id = created[0].json()["id"]
    assert all(r.json()["id"] == run_id for r in results if r.status_code == 200)
    again = other.post(f"/flows/{flow_id}/runs", json=body, headers=k)
    assert again.status_code == 200 and again.json()["id"] == run_id
    assert "Idempotent-Replayed" not in again.headers  # answered by the runner, not replayed
    assert main.post(f"/flows/{flow_id}/runs", json={"input": {"v": 2}}, headers=k).status_code == 422
    assert main.get("/runs", params={"flowId": flow_id}).json()["total"] == 1


def test_an_overlong_key_is_400(main: httpx.Client) -> None:
    r = main.post("/flows", json={"name": "x"}, headers={"Idempotency-Key": "k" * 256})
    assert r.status_code == 400 and r.json()["type"] == "bad-request"
    assert flow_count(main) == 0


# --- CORS -----------------------------------------------------------------------------------------


def test_cors_preflight_from_the_allowed_origin(stack: ProcessStack) -> None:
    r = httpx.options(
        stack.base + "/api/v1/flows",
        headers={
            "Origin": SPA,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, idempotency-key, if-match",
        },
    )
    assert r.status_code == 204, r.text
    assert r.headers["Access-Control-Allow-Origin"] == SPA
    methods = {m.strip() for m in r.headers["Access-Control-Allow-Methods"].split(",")}
    assert {"GET", "POST", "PUT", "PATCH", "DELETE"} <= methods
    allowed = {h.strip().lower() for h in r.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type", "idempotency-key", "if-match"} <= allowed
    assert int(r.headers["Access-Control-Max-Age"]) >= 60
    assert "Origin" in r.headers["Vary"]


def test_cors_preflight_from_another_origin_is_refused(stack: ProcessStack) -> None:
    r = httpx.options(
        stack.base + "/api/v1/flows",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "DELETE"},
    )
    assert r.status_code == 403 and r.json()["type"] == "forbidden"
    assert not any(h.lower().startswith("access-control-allow") for h in r.headers)


def test_cors_answers_echo_an_allowed_origin_only(stack: ProcessStack, main: httpx.Client) -> None:
    r = main.post("/flows", json={"name": "x"}, headers={"Origin": SPA})
    assert r.status_code == 201
    assert r.headers["Access-Control-Allow-Origin"] == SPA and "Origin" in r.headers["Vary"]
    exposed = {h.strip().lower() for h in r.headers["Access-Control-Expose-Headers"].split(",")}
    assert {"etag", "location", "x-request-id", "retry-after"} <= exposed
    # errors too, so a browser app can read them
    r = httpx.get(stack.base + "/api/v1/flows", headers={"Origin": SPA})
    assert r.status_code == 401 and r.headers["Access-Control-Allow-Origin"] == SPA
    r = main.get("/flows", headers={"Origin": "https://evil.example"})
    assert r.status_code == 200 and "Access-Control-Allow-Origin" not in r.headers and "Origin" in r.headers["Vary"]


# --- rate limits ----------------------------------------------------------------------------------


def test_a_free_tenant_is_limited_to_its_rate_and_the_bucket_refills(replica: str) -> None:
    with client(replica, f"free-{uuid.uuid4().hex[:8]}") as c, client(replica, f"free-{uuid.uuid4().hex[:8]}") as d:
        started = time.monotonic()
        ok = 0
        refused = None
        for _ in range(200):
            r = c.get("/flows")
            if r.status_code == 429:
                refused = r
                break
            assert r.status_code == 200, r.text
            ok += 1
        elapsed = time.monotonic() - started
        assert refused is not None, "never limited"
        # a burst of one second's worth, plus what refilled meanwhile (20/s)
        assert 20 <= ok <= 20 + 20 * elapsed + 1, (ok, elapsed)
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert refused.json()["type"] == "rate-limited" and "free" in refused.json()["detail"]
        assert int(refused.headers["Retry-After"]) >= 1
        assert d.get("/flows").status_code == 200  # another tenant has its own bucket
        deadline = time.monotonic() + 3
        while (r := c.get("/flows")).status_code == 429:
            assert time.monotonic() < deadline, "the bucket did not refill"
            time.sleep(0.02)
        assert r.status_code == 200


def test_an_enterprise_tenant_is_not_limited_at_the_free_rate(main: httpx.Client) -> None:
    assert all(main.get("/flows").status_code == 200 for _ in range(60))


# --- logs -----------------------------------------------------------------------------------------


def test_each_request_is_logged_with_its_request_id(stack: ProcessStack, main: httpx.Client) -> None:
    rid = f"rules-{uuid.uuid4().hex}"
    assert main.get("/flows", headers={"X-Request-Id": rid}).headers["X-Request-Id"] == rid
    log = stack.workdir / "gateway.log"
    deadline = time.monotonic() + 5
    line: dict[str, Any] | None = None
    while line is None:
        assert time.monotonic() < deadline, "no access log line"
        for raw in log.read_text(errors="replace").splitlines():
            if rid in raw:
                line = json.loads(raw)
        time.sleep(0.05)
    assert line["requestId"] == rid and line["status"] == 200 and line["path"] == "/api/v1/flows"


# --- security headers -----------------------------------------------------------------------------


def assert_secure(r: httpx.Response) -> None:
    assert r.headers["X-Content-Type-Options"] == "nosniff", r.url
    assert r.headers["X-Frame-Options"] == "DENY", r.url
    assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"], r.url
    assert r.headers["Server"] == "flowmesh", r.url  # no Python or aiohttp version


def test_every_answer_carries_the_security_headers(stack: ProcessStack, main: httpx.Client) -> None:
    answers = [
        main.get("/flows"),  # 200
        main.post("/flows", json={"name": "x"}),  # 201
        main.get("/flows/nope"),  # 404 from the service
        main.put("/flows", json={}),  # 405
        main.post("/flows", content=b"{", headers={"Content-Type": "application/json"}),  # 400
        httpx.get(stack.base + "/api/v1/flows"),  # 401
        httpx.get(stack.base + "/nowhere"),  # 404 of no route
        httpx.get(stack.base + "/healthz"),
        httpx.get(stack.base + "/openapi.json"),
        httpx.options(stack.base + "/api/v1/flows", headers={"Origin": SPA, "Access-Control-Request-Method": "GET"}),
    ]
    assert sorted({r.status_code for r in answers}) == [200, 201, 204, 400, 401, 404, 405]
    for r in answers:
        assert_secure(r)
        assert r.headers["Content-Security-Policy"].startswith("default-src 'none'; frame-ancestors 'none'")


def test_the_docs_page_may_load_swagger_ui_from_its_own_origin_only(stack: ProcessStack) -> None:
    r = httpx.get(stack.base + "/docs")
    assert r.status_code == 200
    assert_secure(r)
    csp = dict(d.strip().split(" ", 1) for d in r.headers["Content-Security-Policy"].split(";"))
    assert csp["default-src"] == "'none'" and csp["connect-src"] == "'self'"
    assert csp["script-src"].startswith("'self' 'sha256-")  # the page's one inline script, by hash
    assert "unsafe-eval" not in csp["script-src"] and "http" not in r.headers["Content-Security-Policy"]
    # the script the hash allows is the one the page has
    inline = r.text.split("<script>", 1)[1].split("</script>", 1)[0]
    digest = base64.b64encode(hashlib.sha256(inline.encode()).digest()).decode()
    assert f"'sha256-{digest}'" in csp["script-src"]
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert_secure(httpx.get(f"{stack.base}/docs/static/{asset}"))


# --- JWT claims -----------------------------------------------------------------------------------

BAD_CLAIMS = {
    "sub-nul": {"sub": "ali\x00ce"},
    "tenant-nul": {"tenant": "acme\x00"},
    "sub-lone-surrogate": {"sub": "ali\ud800ce"},
    "tenant-lone-surrogate": {"tenant": "\udfffacme"},
    "tenant-newline": {"tenant": "acme\r\nFm-Role: admin"},
    "sub-escape": {"sub": "alice\x1b[31m"},
    "tenant-line-separator": {"tenant": "acme\u2028"},
    "tenant-padded": {"tenant": " acme"},
    "sub-too-long": {"sub": "a" * 256},
    "tenant-too-long": {"tenant": "t" * 1000},
    "tenant-empty": {"tenant": ""},
    "tenant-not-a-string": {"tenant": 42},
    "role-upper": {"role": "ADMIN"},
    "role-title": {"role": "Admin"},
    "role-service": {"role": "service:runner"},
    "role-unknown": {"role": "owner"},
    "role-empty": {"role": ""},
    "role-list": {"role": ["admin"]},
}


def signed(claims: dict[str, Any]) -> str:
    """A valid token but for ``claims`` (written as given: ``token()`` would replace an empty tenant)."""
    now = int(time.time())
    base = {"sub": f"claims-{uuid.uuid4().hex[:8]}", "iss": "flowmesh", "aud": "flowmesh", "iat": now, "exp": now + 600}
    return jwt.encode({**base, **claims}, SECRET, algorithm="HS256")


@pytest.mark.parametrize("claims", list(BAD_CLAIMS.values()), ids=list(BAD_CLAIMS))
def test_a_token_with_a_bad_sub_tenant_or_role_is_refused_on_every_route(
    stack: ProcessStack, claims: dict[str, Any]
) -> None:
    bearer = {"Authorization": "Bearer " + signed(dict(claims))}
    with httpx.Client(base_url=stack.base + "/api/v1", headers=bearer, timeout=15) as c:
        answers = [
            c.get("/flows"),
            c.post("/flows", json={"name": "x"}),
            c.get("/runs"),
            c.get("/usage"),
            c.get("/api-keys"),
            c.post("/ws-tickets"),
            c.put("/admin/tenants/acme/plan", json={"plan": "free"}),
        ]
    for r in answers:
        assert r.status_code == 401, (r.request.url, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["type"] == "unauthorized"
    ws = httpx.get(
        stack.base + "/ws/flows/whatever",
        headers={
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Protocol": "flowmesh.v1, bearer." + bearer["Authorization"].removeprefix("Bearer "),
        },
    )
    assert ws.status_code == 401 and ws.json()["type"] == "unauthorized"


def test_the_known_roles_spelled_exactly_are_accepted(stack: ProcessStack) -> None:
    tenant = f"roles-{uuid.uuid4().hex[:8]}"
    for extra in ({}, {"role": "member"}, {"role": None}):
        r = httpx.get(stack.base + "/api/v1/flows", headers={"Authorization": "Bearer " + token(tenant, **extra)})
        assert r.status_code == 200, (extra, r.text)
    member = httpx.put(
        f"{stack.base}/api/v1/admin/tenants/{tenant}/plan",
        json={"plan": "free"},
        headers={"Authorization": "Bearer " + token(tenant)},
    )
    assert member.status_code == 403
    admin = httpx.put(
        f"{stack.base}/api/v1/admin/tenants/{tenant}/plan",
        json={"plan": "enterprise"},
        headers={"Authorization": "Bearer " + token("operator", role="admin")},
    )
    assert admin.status_code == 200, admin.text
    unicode_tenant = httpx.get(stack.base + "/api/v1/flows", headers={"Authorization": "Bearer " + token("ünïcode-✓")})
    assert unicode_tenant.status_code == 200, unicode_tenant.text


# --- nothing of a token in the logs ---------------------------------------------------------------


def gateway_log_since(stack: ProcessStack, offset: int) -> str:
    time.sleep(0.3)  # the gateway writes its log lines as it answers; give the file a moment
    with (stack.workdir / "gateway.log").open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def log_size(stack: ProcessStack) -> int:
    return (stack.workdir / "gateway.log").stat().st_size


def test_an_overlong_header_is_a_problem_and_logs_nothing_of_it(stack: ProcessStack) -> None:
    marker = uuid.uuid4().hex
    start = log_size(stack)
    for headers in (
        {"Authorization": f"Bearer {marker}" + "x" * 9000},
        {"X-Anything": marker * 300},
    ):
        r = httpx.get(stack.base + "/api/v1/flows", headers=headers)
        assert r.status_code == 431, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["type"] == "headers-too-large" and marker not in r.text
        assert_secure(r)
    r = httpx.get(f"{stack.base}/api/v1/flows?{marker}=" + "y" * 9000)
    assert r.status_code == 431 and marker not in r.text
    logged = gateway_log_since(stack, start)
    assert "LineTooLong" in logged  # it is logged, as a warning ...
    assert marker not in logged and "xxxxxxxx" not in logged  # ... quoting none of it
    assert "Traceback" not in logged
    levels = {json.loads(line).get("level", "").upper() for line in logged.splitlines() if line.startswith("{")}
    assert not levels & {"ERROR", "CRITICAL"}, levels


def test_a_websocket_offer_without_our_subprotocol_is_refused_and_logs_no_token(
    stack: ProcessStack, main: httpx.Client
) -> None:
    flow_id = main.post("/flows", json={"name": "ws"}).json()["id"]
    jwt_ = str(main.headers["Authorization"]).removeprefix("Bearer ")
    start = log_size(stack)
    r = httpx.get(
        f"{stack.base}/ws/flows/{flow_id}",
        headers={
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Protocol": "bearer." + jwt_,
        },
    )
    assert r.status_code == 400, r.text
    assert r.json()["type"] == "bad-request" and "flowmesh.v1" in r.json()["detail"]
    assert jwt_ not in r.text
    logged = gateway_log_since(stack, start)
    for part in jwt_.split("."):
        assert part not in logged
