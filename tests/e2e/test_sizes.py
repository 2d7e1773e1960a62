"""A run that holds a lot never makes a tenant's runs unreadable (P9 finding 3).

Each case makes one huge run (a 600 KB webhook body copied by ``{{ input }}``, a 900 KB ``http``
response, 1,000 templated fields), then reads everything the API serves about runs: the list
(``pageSize=1`` and the default), the run, its steps and the WebSocket snapshot answer promptly,
each value too large for its reply replaced by an ``$omitted`` marker, and the other runs of the
tenant stay whole. Before the fix each of these reads answered 504 after 5 s.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from stack import ProcessStack, publish_flow, wait_run

T = {"id": "start", "type": "trigger", "data": {}}
KB = 1024


def copy_flow(output: Any) -> dict[str, Any]:
    step = {"id": "copy", "type": "transform", "data": {"output": output}}
    return {"nodes": [T, step], "edges": [{"id": "e", "source": "start", "target": "copy"}]}


def omitted(value: Any) -> dict[str, Any]:
    assert isinstance(value, dict) and set(value) == {"$omitted"}, str(value)[:200]
    marker: dict[str, Any] = value["$omitted"]
    assert marker["reason"] == "too-large" and marker["bytes"] > 0
    return marker


def ok(c: httpx.Client, path: str, **params: Any) -> dict[str, Any]:
    r = c.get(path, params=params or None)  # httpx replaces a path's query with any params given
    assert r.status_code == 200, (path, r.status_code, r.text[:300])
    assert r.elapsed.total_seconds() < 4, "an answer, not a timeout"
    body: dict[str, Any] = r.json()
    return body


@pytest.fixture(scope="module")
def big_upstream() -> Iterator[str]:
    """A loopback server answering ``/kb/<n>`` with a JSON body of about n KB."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            data = json.dumps({"blob": "x" * (int(self.path.rsplit("/", 1)[1]) * KB)}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def small_run(c: httpx.Client) -> dict[str, Any]:
    flow_id = publish_flow(c, copy_flow("{{ input }}"))
    r = c.post(f"/flows/{flow_id}/runs", json={"input": {"small": True}})
    assert r.status_code == 201, r.text
    run: dict[str, Any] = wait_run(c, r.json()["id"])
    return run


def webhook_run(c: httpx.Client) -> str:
    flow_id = publish_flow(c, copy_flow("{{ input }}"))
    r = c.post(f"/flows/{flow_id}/triggers", json={"type": "webhook", "name": "in", "config": {"signed": False}})
    assert r.status_code == 201, r.text
    with httpx.Client(timeout=15) as public:
        r = public.post(r.json()["url"], json={"blob": "w" * (600 * KB)})
    assert r.status_code == 202, r.text
    run_id: str = r.json()["runId"]
    return run_id


def http_run(c: httpx.Client, base: str) -> str:
    step = {"id": "copy", "type": "http", "data": {"url": base + "/kb/900"}}
    flow_id = publish_flow(c, {"nodes": [T, step], "edges": [{"id": "e", "source": "start", "target": "copy"}]})
    r = c.post(f"/flows/{flow_id}/runs", json={"input": {}})
    assert r.status_code == 201, r.text
    run_id: str = r.json()["id"]
    return run_id


def fields_run(c: httpx.Client) -> str:
    flow_id = publish_flow(c, copy_flow({f"f{i}": "{{ input.text }}" for i in range(1000)}))
    r = c.post(f"/flows/{flow_id}/runs", json={"input": {"text": "t" * 900}})  # ~0.9 MB: under the output limits
    assert r.status_code == 201, r.text
    run_id: str = r.json()["id"]
    return run_id


def snapshot(stack: ProcessStack, c: httpx.Client, run_id: str) -> dict[str, Any]:
    url = stack.base.replace("http://", "ws://") + f"/ws/runs/{run_id}"
    token = str(c.headers["Authorization"]).removeprefix("Bearer ")
    with connect(url, subprotocols=["flowmesh.v1", "bearer." + token], open_timeout=10) as ws:  # type: ignore[list-item]
        msg: dict[str, Any] = json.loads(ws.recv(timeout=10))
    assert msg["type"] == "snapshot", msg
    return msg


@pytest.mark.parametrize("case", ["webhook-600KB", "http-900KB", "1000-fields"])
def test_one_huge_run_leaves_every_read_of_runs_readable(
    case: str, stack: ProcessStack, alice: httpx.Client, big_upstream: str
) -> None:
    before = small_run(alice)
    if case == "webhook-600KB":
        run_id = webhook_run(alice)
    elif case == "http-900KB":
        run_id = http_run(alice, big_upstream)
    else:
        run_id = fields_run(alice)
    run = wait_run(alice, run_id)
    assert run["status"] == "succeeded", run
    assert len(json.dumps(ok(alice, "/runs", pageSize=1)["items"][0])) < 1024 * KB

    newest = ok(alice, "/runs", pageSize=1)
    assert newest["items"][0]["id"] == run_id and newest["hasMore"] is True
    listed = ok(alice, "/runs")
    assert [r["id"] for r in listed["items"]] == [run_id, before["id"]]
    assert listed["items"][1] == before, "the other runs stay whole"
    huge = listed["items"][0]
    markers = [omitted(v) for v in (huge["input"], huge["output"]) if isinstance(v, dict) and "$omitted" in v]
    assert markers and all(m["bytes"] > 500 * KB for m in markers)

    steps = {s["stepId"]: s for s in ok(alice, f"/runs/{run_id}/steps")["items"]}
    assert set(steps) == {"start", "copy"}
    out = steps["copy"]["output"]
    if isinstance(out, dict) and "$omitted" in out and "fetch" in out["$omitted"]:
        alone = ok(alice, out["$omitted"]["fetch"].removeprefix("/api/v1"))
        assert alone["items"][0]["stepId"] == "copy" and "$omitted" not in alone["items"][0]["output"]

    snap = snapshot(stack, alice, run_id)
    assert snap["run"]["id"] == run_id and snap["run"]["status"] == "succeeded"
    assert set(snap["steps"]) == {"start", "copy"}

    page2 = ok(alice, "/runs", pageSize=1, page=2)
    assert page2["items"] == [before]


def test_a_marker_points_to_a_read_that_returns_the_value_whole(alice: httpx.Client) -> None:
    flow_id = publish_flow(alice, copy_flow("{{ input }}"))
    ids = []
    for _ in range(3):  # three runs of ~400 KB each: a page of three is over the budget, one alone is not
        r = alice.post(f"/flows/{flow_id}/runs", json={"input": {"blob": "b" * (200 * KB), "k": uuid.uuid4().hex}})
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    for run_id in ids:
        wait_run(alice, run_id)
    page = ok(alice, "/runs")
    assert len(page["items"]) == 3 and page["total"] == 3
    markers = [v for item in page["items"] for v in (item["input"], item["output"]) if "$omitted" in v]
    assert markers, "the page is over the budget, so its largest values are left out"
    for value in markers:
        fetch = omitted(value)["fetch"]
        whole = ok(alice, fetch.removeprefix("/api/v1"))
        assert whole["input"]["blob"] == "b" * (200 * KB) and whole["output"] == whole["input"]
