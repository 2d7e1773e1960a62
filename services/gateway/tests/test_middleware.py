"""The request pipeline without NATS: time limits, CORS, and the pure parts of Idempotency-Key."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from flowmesh.contracts.errors import Conflict, InvalidInput, RateLimited
from flowmesh.gateway import keys, middleware
from flowmesh.gateway.cors import CorsPolicy, cors_middleware
from flowmesh.gateway.idempotency import (
    Completed,
    InFlight,
    canonical_body,
    decode,
    encode,
    fingerprint,
    judge,
    storage_key,
)
from flowmesh.gateway.settings import GatewaySettings

SPA = "http://localhost:5173"


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    settings = GatewaySettings(env="dev", jwt_secret="s" * 48, data_dir=tmp_path, request_timeout_s=0.3)
    app = web.Application(
        middlewares=[
            middleware.observe,
            cors_middleware(settings.cors_origin_list),
            middleware.problems,
            middleware.deadline,
        ]
    )
    app[keys.SETTINGS] = settings

    async def slow(_: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.json_response({})

    async def a_while(_: web.Request) -> web.Response:
        await asyncio.sleep(0.6)
        return web.json_response({"waited": True})

    async def limited(_: web.Request) -> web.Response:
        raise RateLimited("slow down", retry_after_s=3)

    async def ok(_: web.Request) -> web.Response:
        return web.json_response({"ok": True}, headers={"ETag": '"1"', "Vary": "Accept-Encoding"})

    async def timing_out(_: web.Request) -> web.Response:
        raise TimeoutError("an inner time-out that is not ours")

    app.router.add_get("/api/v1/slow", slow)
    app.router.add_get("/ws/runs/{run_id}", a_while)
    app.router.add_get("/api/v1/limited", limited)
    app.router.add_get("/api/v1/ok", ok)
    app.router.add_get("/api/v1/inner", timing_out)
    async with TestClient(TestServer(app)) as c:
        yield c


async def test_a_request_over_the_time_limit_is_a_504_problem(client: TestClient[web.Request, web.Application]) -> None:
    r = await client.get("/api/v1/slow")
    assert r.status == 504
    assert r.content_type == "application/problem+json"
    body = await r.json()
    assert body["type"] == "timeout" and "0.3 s" in body["detail"]
    assert r.headers["X-Request-Id"]


async def test_websocket_routes_have_no_time_limit(client: TestClient[web.Request, web.Application]) -> None:
    r = await client.get("/ws/runs/1")
    assert r.status == 200 and await r.json() == {"waited": True}


async def test_a_time_out_inside_a_handler_is_not_mistaken_for_ours(
    client: TestClient[web.Request, web.Application],
) -> None:
    r = await client.get("/api/v1/inner")
    assert r.status == 500


async def test_a_429_carries_retry_after(client: TestClient[web.Request, web.Application]) -> None:
    r = await client.get("/api/v1/limited")
    assert r.status == 429 and r.headers["Retry-After"] == "3"
    assert (await r.json())["type"] == "rate-limited"


async def test_every_request_is_logged_once_with_its_request_id(
    client: TestClient[web.Request, web.Application], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="flowmesh.gateway.access"):
        r = await client.get("/api/v1/ok", headers={"X-Request-Id": "req-42"})
    assert r.headers["X-Request-Id"] == "req-42"
    [line] = [rec for rec in caplog.records if rec.name == "flowmesh.gateway.access"]
    assert line.requestId == "req-42" and line.status == 200 and line.path == "/api/v1/ok"  # type: ignore[attr-defined]
    assert "request_id=req-42" in line.getMessage()


async def test_cors_preflight_from_an_allowed_origin(client: TestClient[web.Request, web.Application]) -> None:
    r = await client.options(
        "/api/v1/flows",
        headers={
            "Origin": SPA,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, idempotency-key",
        },
    )
    assert r.status == 204
    assert r.headers["Access-Control-Allow-Origin"] == SPA
    assert "POST" in r.headers["Access-Control-Allow-Methods"]
    allowed = {h.strip().lower() for h in r.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type", "idempotency-key", "if-match"} <= allowed
    assert int(r.headers["Access-Control-Max-Age"]) > 0


async def test_cors_preflight_from_another_origin_is_refused(client: TestClient[web.Request, web.Application]) -> None:
    r = await client.options(
        "/api/v1/flows", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    )
    assert r.status == 403 and (await r.json())["type"] == "forbidden"
    assert "Access-Control-Allow-Origin" not in r.headers


async def test_cors_headers_on_answers_and_errors_for_allowed_origins_only(
    client: TestClient[web.Request, web.Application],
) -> None:
    r = await client.get("/api/v1/ok", headers={"Origin": SPA})
    assert r.headers["Access-Control-Allow-Origin"] == SPA
    assert "ETag" in r.headers["Access-Control-Expose-Headers"]
    assert r.headers["Vary"] == "Accept-Encoding, Origin"
    r = await client.get("/api/v1/limited", headers={"Origin": SPA})
    assert (
        r.headers["Access-Control-Allow-Origin"] == SPA and "Retry-After" in r.headers["Access-Control-Expose-Headers"]
    )
    r = await client.get("/api/v1/ok", headers={"Origin": "https://evil.example"})
    assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers and "Origin" in r.headers["Vary"]


def test_cors_origins_compare_without_case_or_trailing_slash_and_star_allows_any() -> None:
    policy = CorsPolicy(["http://localhost:5173/", " https://App.example.com "])
    assert policy.allows("http://localhost:5173") and policy.allows("https://app.example.com")
    assert not policy.allows("http://localhost:5174") and not policy.allows(None) and not policy.allows("null")
    assert CorsPolicy(["*"]).allows("https://anything.example")


def test_the_same_json_in_another_order_or_spacing_is_the_same_request() -> None:
    a = fingerprint("POST", "/api/v1/flows", [], b'{"name": "x", "definition": {"nodes": [], "edges": []}}')
    b = fingerprint("POST", "/api/v1/flows", [], b'{"definition":{"edges":[],"nodes":[]},"name":"x"}')
    assert a == b
    assert a != fingerprint("POST", "/api/v1/flows", [], b'{"name": "y"}')
    assert a != fingerprint(
        "POST", "/api/v1/flows/other", [], b'{"name": "x", "definition": {"nodes": [], "edges": []}}'
    )
    assert fingerprint("POST", "/p", [], b"") == fingerprint("POST", "/p", [], b" {} ")
    assert fingerprint("POST", "/p", [("b", "1"), ("a", "2")], b"") == fingerprint(
        "POST", "/p", [("a", "2"), ("b", "1")], b""
    )
    assert canonical_body(b"not json") == b"not json"


def test_storage_keys_are_kv_safe_and_scoped_by_tenant_and_route() -> None:
    k = storage_key("acme", "/api/v1/flows", "any key: with spaces, dots. and * >")
    assert k.startswith("acme.") and all(c.isalnum() or c in "._-" for c in k)
    assert k != storage_key("globex", "/api/v1/flows", "any key: with spaces, dots. and * >")
    assert k != storage_key("acme", "/api/v1/flows/import", "any key: with spaces, dots. and * >")
    assert storage_key("a.b*>", "/r", "k").count(".") == 1  # an unsafe tenant id is hashed into one token


def test_records_round_trip_and_garbage_reads_as_abandoned() -> None:
    done = Completed("fp", 201, {"Location": "/api/v1/flows/1", "Content-Type": "application/json"}, b'{"id":"1"}')
    assert decode(encode(done)) == done
    pending = InFlight("fp", 123.5)
    assert decode(encode(pending)) == pending
    assert decode(b"not json") is None and decode(b'{"state": "completed"}') is None


def test_judging_an_existing_record() -> None:
    done = Completed("fp", 201, {}, b"{}")
    assert judge(done, "fp", now=0) is done
    with pytest.raises(InvalidInput):
        judge(done, "other", now=0)
    with pytest.raises(Conflict):
        judge(InFlight("fp", deadline=10), "fp", now=5)
    with pytest.raises(InvalidInput):
        judge(InFlight("other", deadline=10), "fp", now=5)
    assert judge(InFlight("fp", deadline=10), "fp", now=11) is None  # its replica died: take it over
    assert judge(None, "fp", now=0) is None
