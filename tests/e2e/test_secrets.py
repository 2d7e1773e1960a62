"""Tenant secrets end to end: stored sealed, sent by ``http`` and ``llm`` steps, recorded nowhere.

A local server echoes back everything it receives (path, query, headers, body, and a credential
header in a response header), so a step's raw output would hold the secret: the test searches every
API answer, every WebSocket message and every service's log for it, and checks the server did get
the real value (so the search can fail). These tests run on a stack of their own: its usage
service is restarted with a rotated vault secret, and its runner may call loopback servers.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus, urlsplit

import httpx
import pytest
from websockets.sync.client import ClientConnection, connect

from stack import ProcessStack, isolated_stack, publish_flow, wait_run
from upstream import LlmUpstream

pytestmark = pytest.mark.timeout(180)

T = {"id": "start", "type": "trigger", "data": {}}
OLD_VAULT = "old-vault-secret-" + "o" * 40
NEW_VAULT = "new-vault-secret-" + "n" * 40


class Echo:
    """Answers every request with what it received; ``/redirect?to=URL`` answers 307 to ``URL``."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        echo = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode() if length else ""
                got = {"method": self.command, "path": self.path, "headers": dict(self.headers.items()), "body": body}
                echo.requests.append(got)
                if self.path.startswith("/redirect?to="):
                    self.send_response(307)
                    self.send_header("Location", self.path.split("=", 1)[1])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = json.dumps(got).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                # kept response headers echo a credential too
                self.send_header("ETag", self.headers.get("X-Custom") or "none")
                self.send_header("Location", self.headers.get("Authorization") or "none")
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = _answer

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def received(self, marker: str) -> list[dict[str, Any]]:
        """The requests whose path holds ``marker``."""
        return [r for r in self.requests if marker in r["path"]]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def echo() -> Iterator[Echo]:
    server = Echo()
    yield server
    server.close()


@pytest.fixture(scope="module")
def elsewhere() -> Iterator[Echo]:
    """Another origin (another port) that redirects lead to."""
    server = Echo()
    yield server
    server.close()


@pytest.fixture(scope="module")
def api() -> Iterator[LlmUpstream]:
    server = LlmUpstream()
    yield server
    server.close()


@pytest.fixture(scope="module")
def s(infra: Any, api: LlmUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessStack]:
    env = {
        "FLOWMESH_RUNNER_LLM_PROVIDERS": json.dumps({"openai": api.base}),
        "FLOWMESH_HTTP_STEP_ALLOW_PRIVATE": "true",  # the echo servers are on loopback
        "FLOWMESH_USAGE_KEYS_SECRET": OLD_VAULT,
    }
    with isolated_stack(infra.database_url, tmp_path_factory.mktemp("secrets"), env=env) as stack:
        yield stack


@pytest.fixture
def c(s: ProcessStack) -> Iterator[httpx.Client]:
    with s.client(f"sec-{uuid.uuid4().hex[:8]}") as client:
        yield client


@pytest.fixture
def other(s: ProcessStack) -> Iterator[httpx.Client]:
    with s.client(f"other-{uuid.uuid4().hex[:8]}") as client:
        yield client


def a_value() -> str:
    """Distinctive, and needing encoding in a URL (a slash, a space, a plus)."""
    return f"fmSECRET-{secrets.token_hex(8)}/a b+c"


def put_secret(c: httpx.Client, name: str, value: str) -> dict[str, Any]:
    r = c.post("/secrets", json={"name": name, "value": value})
    assert r.status_code == 201, r.text
    assert value not in r.text
    found: dict[str, Any] = r.json()
    return found


def forms(value: str) -> list[str]:
    return [value, quote(value, safe=""), quote_plus(value), quote(value), value.split("/")[0]]


def http_step(echo: Echo, marker: str, **extra: Any) -> dict[str, Any]:
    data = {
        "method": "POST",
        "url": echo.base + f"/{marker}/{{{{ secrets.TOKEN }}}}?inurl={{{{ secrets.TOKEN }}}}",
        "headers": {"Authorization": "Bearer {{ secrets.TOKEN }}", "X-Custom": "{{ secrets.TOKEN }}"},
        "query": {"t": "{{ secrets.TOKEN }}", "plain": "1"},
        "body": {"password": "{{ secrets.TOKEN }}", "note": "{{ input.note }}"},
        **extra,
    }
    return {"id": "call", "type": "http", "data": data}


def open_ws(s: ProcessStack, path: str, c: httpx.Client) -> ClientConnection:
    bearer = str(c.headers["Authorization"]).removeprefix("Bearer ")
    url = "ws://" + urlsplit(s.base).netloc + path
    return connect(url, subprotocols=["flowmesh.v1", "bearer." + bearer], open_timeout=10)  # type: ignore[list-item]


def ws_until_final(ws: ClientConnection, run_id: str | None = None) -> list[str]:
    """Raw messages until the run ends (bounded by each receive's timeout)."""
    got: list[str] = []
    while True:
        raw = ws.recv(timeout=30)
        got.append(str(raw))
        msg = json.loads(raw)
        if msg.get("type") == "snapshot" and msg["run"]["status"] in ("succeeded", "failed"):
            return got
        event = msg.get("event") or {}
        if event.get("type") in ("run.succeeded", "run.failed") and (run_id is None or event["runId"] == run_id):
            return got


def logs(s: ProcessStack) -> str:
    return "\n".join(p.read_text(errors="replace") for p in Path(s.workdir).glob("*.log"))


def steps_of(c: httpx.Client, run_id: str) -> dict[str, dict[str, Any]]:
    return {st["stepId"]: st for st in c.get(f"/runs/{run_id}/steps").json()["items"]}


def test_a_secret_reaches_the_server_and_nothing_recorded_shows_it(
    s: ProcessStack, c: httpx.Client, echo: Echo, api: LlmUpstream
) -> None:
    value = a_value()
    put_secret(c, "TOKEN", value)
    r = c.post("/api-keys", json={"provider": "openai", "apiKey": f"sk-{uuid.uuid4().hex}"})
    assert r.status_code == 201, r.text
    marker = uuid.uuid4().hex
    model = f"m-{marker[:8]}"
    ask = {
        "id": "ask",
        "type": "llm",
        "data": {
            "provider": "openai",
            "model": model,
            "messages": [{"role": "user", "content": "say {{ secrets.TOKEN }}"}],
        },
    }
    after = {
        "id": "after",
        "type": "transform",
        "data": {"output": {"echoed": "{{ steps.call.output }}", "said": "{{ steps.ask.output.text }}"}},
    }
    definition = {
        "nodes": [T, http_step(echo, marker), ask, after],
        "edges": [
            {"id": "e1", "source": "start", "target": "call"},
            {"id": "e2", "source": "call", "target": "ask"},
            {"id": "e3", "source": "ask", "target": "after"},
        ],
    }
    flow_id = publish_flow(c, definition)
    with open_ws(s, f"/ws/flows/{flow_id}", c) as ws:
        rid = c.post(f"/flows/{flow_id}/runs", json={"input": {"note": "hello"}}).json()["id"]
        live = ws_until_final(ws, rid)
    run = wait_run(c, rid)
    assert run["status"] == "succeeded", run
    with open_ws(s, f"/ws/runs/{rid}", c) as ws:
        snapshot = ws_until_final(ws)

    # the server got the real value everywhere it was sent: the search below can fail
    [got] = echo.received(marker)
    assert got["headers"]["Authorization"] == f"Bearer {value}" and got["headers"]["X-Custom"] == value
    assert json.loads(got["body"])["password"] == value
    assert quote(value, safe="") in got["path"]
    [sent] = api.of(model)
    assert value in json.dumps(sent)

    # the recorded input names the secret instead
    steps = steps_of(c, rid)
    recorded = steps["call"]["input"]
    assert recorded["headers"]["Authorization"] == "Bearer [secret:TOKEN]"
    assert recorded["headers"]["X-Custom"] == "[secret:TOKEN]"
    assert recorded["query"] == {"t": "[secret:TOKEN]", "plain": "1"}
    assert "[secret:TOKEN]" in recorded["url"] and "[secret:TOKEN]" in json.dumps(steps["call"]["output"])
    assert steps["ask"]["output"]["text"] == "echo: say [secret:TOKEN]"

    answers = [
        c.get(f"/runs/{rid}").text,
        c.get(f"/runs/{rid}/steps").text,
        c.get(f"/runs/{rid}/events", params={"pageSize": 1000}).text,
        c.get("/runs", params={"flowId": flow_id}).text,
        c.get(f"/flows/{flow_id}").text,
        c.get(f"/flows/{flow_id}/versions").text,
        c.get(f"/flows/{flow_id}/versions/1").text,
        c.get(f"/flows/{flow_id}/export").text,
        c.get("/secrets").text,
        c.get("/usage").text,
        c.get(f"/flows/{flow_id}/stats").text,
    ]
    everything = "\n".join([*answers, *live, *snapshot, logs(s)])
    assert len(live) > 5 and len(snapshot) >= 1
    for form in forms(value):
        assert form not in everything, f"{form!r} was recorded"


def test_literal_credentials_are_warned_about_and_redacted_in_the_recorded_input(c: httpx.Client, echo: Echo) -> None:
    marker = uuid.uuid4().hex
    literal = f"literal-{secrets.token_hex(6)}"
    call = {
        "id": "call",
        "type": "http",
        "data": {
            "url": echo.base + f"/{marker}?api_key={literal}&page=2",
            "headers": {"Authorization": f"Bearer {literal}", "Cookie": f"sid={literal}", "Accept": "text/plain"},
        },
    }
    definition = {"nodes": [T, call], "edges": [{"id": "e1", "source": "start", "target": "call"}]}
    r = c.post("/flows", json={"name": "literal", "definition": definition})
    assert r.status_code == 201, r.text
    warned = {w["path"] for w in r.json()["warnings"]}
    assert warned == {"/nodes/1/data/headers/Authorization", "/nodes/1/data/headers/Cookie", "/nodes/1/data/url"}
    flow_id = r.json()["id"]
    report = c.post(f"/flows/{flow_id}/validate").json()
    assert report["valid"] is True and {w["path"] for w in report["warnings"]} == warned
    assert "warnings" not in c.get(f"/flows/{flow_id}").json()  # only create, update and validate say it
    patched = c.patch(f"/flows/{flow_id}", json={"name": "still literal"}, headers={"If-Match": r.headers["ETag"]})
    assert patched.status_code == 200, patched.text
    assert {w["path"] for w in patched.json()["warnings"]} == warned
    assert c.post(f"/flows/{flow_id}/publish").status_code == 201  # a warning never stops publishing

    rid = c.post(f"/flows/{flow_id}/runs", json={"input": {}}).json()["id"]
    assert wait_run(c, rid)["status"] == "succeeded"
    [got] = echo.received(marker)
    assert got["headers"]["Authorization"] == f"Bearer {literal}"
    recorded = steps_of(c, rid)["call"]["input"]
    assert recorded["headers"] == {
        "Authorization": "[redacted]",
        "Cookie": "[redacted]",
        "Accept": "text/plain",
        "Idempotency-Key": f"{rid}:call",
    }
    assert recorded["url"].endswith("?api_key=[redacted]&page=2")
    # and what the server echoed of them is gone too
    assert literal not in c.get(f"/runs/{rid}/steps").text


def test_an_unknown_secret_fails_the_step_and_another_tenants_secret_is_unknown(
    c: httpx.Client, other: httpx.Client, echo: Echo
) -> None:
    value = a_value()
    put_secret(c, "TOKEN", value)
    marker = uuid.uuid4().hex
    definition = {"nodes": [T, http_step(echo, marker)], "edges": [{"id": "e1", "source": "start", "target": "call"}]}
    flow_id = publish_flow(other, definition)
    rid = other.post(f"/flows/{flow_id}/runs", json={"input": {}}).json()["id"]
    run = wait_run(other, rid)
    assert run["status"] == "failed"
    assert steps_of(other, rid)["call"]["error"]["type"] == "secret-missing"
    assert echo.received(marker) == []  # nothing was sent
    assert other.get("/secrets").json() == {"items": []}
    assert [i["name"] for i in c.get("/secrets").json()["items"]] == ["TOKEN"]
    assert other.delete("/secrets/TOKEN").status_code == 404

    # deleting it makes the owner's runs fail the same way
    assert c.delete("/secrets/TOKEN").status_code == 204
    flow_id = publish_flow(c, definition)
    rid = c.post(f"/flows/{flow_id}/runs", json={"input": {}}).json()["id"]
    assert wait_run(c, rid)["status"] == "failed"
    assert steps_of(c, rid)["call"]["error"]["type"] == "secret-missing"


def test_secrets_outside_http_and_llm_fields_are_refused_at_publish(c: httpx.Client) -> None:
    leak = {"id": "leak", "type": "transform", "data": {"output": {"v": "{{ secrets.TOKEN }}"}}}
    definition = {"nodes": [T, leak], "edges": [{"id": "e1", "source": "start", "target": "leak"}]}
    flow_id = c.post("/flows", json={"name": "leak", "definition": definition}).json()["id"]
    report = c.post(f"/flows/{flow_id}/validate").json()
    assert report["valid"] is False and report["errors"][0]["path"] == "/nodes/1/data/output/v"
    r = c.post(f"/flows/{flow_id}/publish")
    assert r.status_code == 422, r.text
    assert "only the fields of http and llm steps" in r.text


@pytest.mark.parametrize(
    "body",
    [
        {"name": "TOKEN", "value": ""},
        {"name": "TOKEN", "value": "a\u0000b"},
        {"name": "TOKEN", "value": "x" * 8193},
        {"name": "TOKEN"},
        {"name": "9LIVES", "value": "v"},
        {"name": "has-dash", "value": "v"},
        {"name": "N" * 65, "value": "v"},
        {"name": "TOKEN", "value": "v", "extra": 1},
    ],
)
def test_bad_names_and_values_are_422(c: httpx.Client, body: dict[str, Any]) -> None:
    r = c.post("/secrets", json=body)
    assert r.status_code == 422, r.text
    assert r.headers["Content-Type"].startswith("application/problem+json")
    assert c.get("/secrets").json() == {"items": []}


def test_replacing_keeps_created_at_and_unknown_names_are_404(c: httpx.Client) -> None:
    first = put_secret(c, "ROTA", a_value() + "-one")
    second = put_secret(c, "ROTA", a_value() + "-two")
    assert second["createdAt"] == first["createdAt"] and second["updatedAt"] >= first["updatedAt"]
    assert (first["hint"], second["hint"]) == ("…-one", "…-two")
    assert c.delete("/secrets/NOPE").status_code == 404
    assert c.delete("/secrets/bad-name").status_code == 404
    assert c.delete("/secrets/ROTA").status_code == 204
    assert c.delete("/secrets/ROTA").status_code == 404


def test_a_header_built_from_a_secret_is_dropped_on_a_redirect_to_another_origin(
    c: httpx.Client, echo: Echo, elsewhere: Echo
) -> None:
    value = a_value()
    put_secret(c, "TOKEN", value)
    marker = uuid.uuid4().hex
    call = {
        "id": "call",
        "type": "http",
        "data": {
            "url": echo.base + f"/redirect?to={elsewhere.base}/{marker}",
            "headers": {"X-Innocent-Name": "{{ secrets.TOKEN }}", "Accept": "application/json"},
        },
    }
    definition = {"nodes": [T, call], "edges": [{"id": "e1", "source": "start", "target": "call"}]}
    flow_id = publish_flow(c, definition)
    rid = c.post(f"/flows/{flow_id}/runs", json={"input": {}}).json()["id"]
    assert wait_run(c, rid)["status"] == "succeeded"
    [first] = [r for r in echo.requests if marker in r["path"]]
    assert first["headers"]["X-Innocent-Name"] == value
    [landed] = elsewhere.received(marker)
    assert "X-Innocent-Name" not in landed["headers"] and landed["headers"]["Accept"] == "application/json"


def test_rotation_reseals_secrets_at_start_up(s: ProcessStack, c: httpx.Client, echo: Echo) -> None:
    value = a_value()
    put_secret(c, "TOKEN", value)
    s.kill("usage")
    s.start("usage", {"FLOWMESH_USAGE_KEYS_SECRET": f"{NEW_VAULT},{OLD_VAULT}"})
    deadline = time.monotonic() + 60
    while "re-sealed" not in s.logs("usage") or "stored secrets" not in s.logs("usage"):
        assert time.monotonic() < deadline, s.logs("usage")
        time.sleep(0.2)
    # the old vault secret can go now: the new one alone opens every secret
    s.kill("usage")
    s.start("usage", {"FLOWMESH_USAGE_KEYS_SECRET": NEW_VAULT})
    s.wait_ready()
    marker = uuid.uuid4().hex
    definition = {"nodes": [T, http_step(echo, marker)], "edges": [{"id": "e1", "source": "start", "target": "call"}]}
    flow_id = publish_flow(c, definition)
    rid = c.post(f"/flows/{flow_id}/runs", json={"input": {"note": "after rotation"}}).json()["id"]
    run = wait_run(c, rid, timeout=60)
    assert run["status"] == "succeeded", steps_of(c, rid)["call"]["error"]
    [got] = echo.received(marker)
    assert got["headers"]["X-Custom"] == value
