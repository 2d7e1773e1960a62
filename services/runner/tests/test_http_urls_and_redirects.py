"""The http step's URL rendering and redirects, against local aiohttp servers that record what came.

A template value in the path or query is data (percent-encoded), never URL syntax; a redirect to
another origin leaves credentials behind, one on the same origin keeps them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from flowmesh.contracts.models.definition import HttpData
from flowmesh.runner.io_steps import HttpStep

CREDENTIALS = {
    "Authorization": "Bearer sk-live-1",
    "Cookie": "session=abc",
    "Proxy-Authorization": "Basic cHJveHk6cHc=",
    "X-Api-Key": "key-1",
    "X-Auth-Token": "token-1",
    "Private-Token": "token-2",
}


@dataclass
class Recorder:
    """A local server: every request's raw path, query and headers, and where to redirect."""

    url: str = ""
    seen: list[dict[str, Any]] = field(default_factory=list)
    redirects: dict[str, str] = field(default_factory=dict)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(
            {
                "raw_path": request.raw_path.partition("?")[0],
                "path": request.path,
                "query": dict(request.query),
                "headers": request.headers,
            }
        )
        if request.path in self.redirects:
            raise web.HTTPFound(self.redirects[request.path])
        return web.json_response({"ok": True})


async def serve(recorder: Recorder) -> AsyncIterator[Recorder]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", recorder.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    recorder.url = f"http://127.0.0.1:{port}"
    try:
        yield recorder
    finally:
        await runner.cleanup()


@pytest.fixture
async def first() -> AsyncIterator[Recorder]:
    async for r in serve(Recorder()):
        yield r


@pytest.fixture
async def second() -> AsyncIterator[Recorder]:
    async for r in serve(Recorder()):
        yield r


@pytest.fixture
async def step() -> AsyncIterator[HttpStep]:
    s = HttpStep(allow_private=True, max_bytes=1024 * 1024, default_timeout_ms=5000)
    await s.start()
    try:
        yield s
    finally:
        await s.close()


HOSTILE = "../../admin?x=1#"


async def test_a_value_in_the_path_stays_one_segment(step: HttpStep, first: Recorder) -> None:
    context = {"input": {"id": HOSTILE}}
    outcome = await step.run(HttpData(url=first.url + "/api/items/{{ input.id }}/detail"), context, "r:s")
    assert outcome.ok, outcome.message
    (seen,) = first.seen
    assert seen["raw_path"] == "/api/items/..%2F..%2Fadmin%3Fx%3D1%23/detail"
    assert seen["path"] == "/api/items/../../admin?x=1#/detail" and seen["query"] == {}


async def test_a_dot_segment_value_is_not_resolved(step: HttpStep, first: Recorder) -> None:
    outcome = await step.run(HttpData(url=first.url + "/api/items/{{ input.id }}"), {"input": {"id": ".."}}, "r:s")
    assert outcome.ok and first.seen[0]["raw_path"] == "/api/items/%2E%2E"


async def test_a_value_in_the_query_stays_one_value(step: HttpStep, first: Recorder) -> None:
    data = HttpData(url=first.url + "/search?q={{ input.q }}&page={{ input.page }}", query={"lang": "en"})
    outcome = await step.run(data, {"input": {"q": "a&admin=1 #x", "page": 2}}, "r:s")
    assert outcome.ok
    (seen,) = first.seen
    assert seen["path"] == "/search" and seen["query"] == {"q": "a&admin=1 #x", "page": "2", "lang": "en"}


async def test_a_template_for_the_whole_url_or_its_host_is_placed_as_written(step: HttpStep, first: Recorder) -> None:
    host = first.url.removeprefix("http://")
    context = {"input": {"url": first.url + "/a/b?c=1", "base": first.url, "host": host, "id": "x y"}}
    assert (await step.run(HttpData(url="{{ input.url }}"), context, "r:s")).ok
    assert (await step.run(HttpData(url="{{ input.base }}/items/{{ input.id }}"), context, "r:s")).ok
    assert (await step.run(HttpData(url="http://{{ input.host }}/h"), context, "r:s")).ok
    assert [(s["raw_path"], s["query"]) for s in first.seen] == [
        ("/a/b", {"c": "1"}),
        ("/items/x%20y", {}),
        ("/h", {}),
    ]


async def test_the_recorded_url_is_the_encoded_one(step: HttpStep, first: Recorder) -> None:
    outcome = await step.run(HttpData(url=first.url + "/i/{{ input.id }}"), {"input": {"id": "a/b"}}, "r:s")
    assert outcome.input is not None and outcome.input["url"] == first.url + "/i/a%2Fb"


async def test_a_redirect_to_another_origin_drops_credentials(
    step: HttpStep, first: Recorder, second: Recorder
) -> None:
    first.redirects["/away"] = second.url + "/landing"
    headers = {**CREDENTIALS, "X-Trace": "t-1"}
    outcome = await step.run(HttpData(url=first.url + "/away", headers=headers), {}, "r:s")
    assert outcome.ok
    assert all(first.seen[0]["headers"].get(k) == v for k, v in CREDENTIALS.items())
    (landed,) = second.seen
    assert landed["path"] == "/landing"
    assert not [k for k in CREDENTIALS if k in landed["headers"]]
    assert landed["headers"]["X-Trace"] == "t-1" and landed["headers"]["Idempotency-Key"] == "r:s"


async def test_a_redirect_on_the_same_origin_keeps_credentials(step: HttpStep, first: Recorder) -> None:
    first.redirects["/old"] = "/new"
    outcome = await step.run(HttpData(url=first.url + "/old", headers=CREDENTIALS), {}, "r:s")
    assert outcome.ok and [s["path"] for s in first.seen] == ["/old", "/new"]
    assert all(first.seen[1]["headers"].get(k) == v for k, v in CREDENTIALS.items())


async def test_credentials_stay_dropped_after_leaving_the_origin(
    step: HttpStep, first: Recorder, second: Recorder
) -> None:
    first.redirects["/away"] = second.url + "/bounce"
    second.redirects["/bounce"] = first.url + "/back"
    outcome = await step.run(HttpData(url=first.url + "/away", headers=CREDENTIALS), {}, "r:s")
    assert outcome.ok and [s["path"] for s in first.seen] == ["/away", "/back"]
    assert not [k for k in CREDENTIALS if k in first.seen[1]["headers"]]


async def test_another_port_or_host_name_is_another_origin(step: HttpStep, first: Recorder) -> None:
    named = first.url.replace("127.0.0.1", "localhost")
    first.redirects["/to-name"] = named + "/named"
    outcome = await step.run(HttpData(url=first.url + "/to-name", headers=CREDENTIALS), {}, "r:s")
    assert outcome.ok and first.seen[1]["path"] == "/named"
    assert "Authorization" not in first.seen[1]["headers"]


async def test_a_redirect_loop_is_a_failure_after_five_redirects(step: HttpStep, first: Recorder) -> None:
    """Not an exception out of the step: that made the step message fail and come back for ever."""
    first.redirects.update({"/a": "/b", "/b": "/a"})
    outcome = await step.run(HttpData(url=first.url + "/a"), {}, "r:s")
    assert not outcome.ok and outcome.error_type == "too-many-redirects" and not outcome.retryable
    assert "more than 5 times" in str(outcome.message)
    assert len(first.seen) == 6  # the request and five redirects
