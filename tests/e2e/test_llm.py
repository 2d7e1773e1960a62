"""``llm`` steps end to end: the tenant's key from the usage service's vault, a local OpenAI-compatible API.

The key is stored with ``POST /api/v1/api-keys`` (the usage service seals it) and revealed to the
runner over ``fm.rpc.usage.keys.reveal`` for each attempt; nothing of it may show in a run, a step,
an event or a log. These tests run on a stack of their own (own NATS and database): its runner's
provider table points ``openai`` at the local server.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from stack import ProcessStack, isolated_stack, publish_flow, wait_run
from upstream import LlmUpstream

T = {"id": "start", "type": "trigger", "data": {}}

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def api() -> Iterator[LlmUpstream]:
    server = LlmUpstream()
    yield server
    server.close()


@pytest.fixture(scope="module")
def llm_stack(infra: Any, api: LlmUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessStack]:
    env = {
        "FLOWMESH_RUNNER_LLM_PROVIDERS": json.dumps({"openai": api.base}),
        "FLOWMESH_HTTP_STEP_ALLOW_PRIVATE": "true",  # the local API is on loopback
    }
    with isolated_stack(infra.database_url, tmp_path_factory.mktemp("llm"), env=env) as s:
        yield s


@pytest.fixture
def c(llm_stack: ProcessStack) -> Iterator[httpx.Client]:
    with llm_stack.client(f"llm-{uuid.uuid4().hex[:8]}") as client:
        yield client


def new_key() -> str:
    return f"sk-e2e-{uuid.uuid4().hex}"


def store_key(c: httpx.Client, key: str, provider: str = "openai") -> None:
    r = c.post("/api-keys", json={"provider": provider, "apiKey": key})
    assert r.status_code == 201, r.text
    assert key not in r.text


def llm_flow(model: str, *, then: bool = True, **data: Any) -> dict[str, Any]:
    """trigger -> ask (llm) -> shout (a transform reading the answer), or without ``shout``."""
    ask = {
        "provider": "openai",
        "model": model,
        "messages": [
            {"role": "system", "content": "You answer in one line."},
            {"role": "user", "content": "Summarise {{ input.topic }} for {{ input.who }}"},
        ],
        **data,
    }
    nodes: list[dict[str, Any]] = [T, {"id": "ask", "type": "llm", "data": ask}]
    edges = [{"id": "e1", "source": "start", "target": "ask"}]
    if then:
        nodes.append({"id": "shout", "type": "transform", "data": {"output": {"said": "{{ steps.ask.output.text }}"}}})
        edges.append({"id": "e2", "source": "ask", "target": "shout"})
    return {"nodes": nodes, "edges": edges}


def run_flow(c: httpx.Client, definition: dict[str, Any], inp: Any) -> dict[str, Any]:
    flow_id = publish_flow(c, definition)
    r = c.post(f"/flows/{flow_id}/runs", json={"input": inp})
    assert r.status_code == 201, r.text
    return wait_run(c, r.json()["id"])


def step_of(c: httpx.Client, run_id: str, step_id: str) -> dict[str, Any]:
    steps = {s["stepId"]: s for s in c.get(f"/runs/{run_id}/steps").json()["items"]}
    return steps[step_id]


def events_of(c: httpx.Client, run_id: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = c.get(f"/runs/{run_id}/events", params={"pageSize": 1000}).json()["items"]
    return items


def everything_about(c: httpx.Client, run_id: str) -> str:
    """The run, its steps and its events as the API shows them."""
    parts = [c.get(f"/runs/{run_id}").text, c.get(f"/runs/{run_id}/steps").text, json.dumps(events_of(c, run_id))]
    return "\n".join(parts)


def logs_of(s: ProcessStack, name: str) -> str:
    return (s.workdir / f"{name}.log").read_text(errors="replace")


INPUT = {"topic": "CEL", "who": "Ada"}


def test_an_llm_step_answers_with_text_and_token_counts_using_the_tenants_key(
    c: httpx.Client, api: LlmUpstream, llm_stack: ProcessStack
) -> None:
    key = new_key()
    store_key(c, key, provider="OpenAI")  # provider names are case-insensitive
    model = f"ok-{uuid.uuid4().hex[:8]}"
    run = run_flow(c, llm_flow(model, temperature=0.5, maxTokens=64), INPUT)
    assert run["status"] == "succeeded", run
    text = "echo: Summarise CEL for Ada"
    assert run["output"] == {"said": text}

    [sent] = api.of(model)
    assert sent["path"] == "/v1/chat/completions"
    assert sent["authorization"] == f"Bearer {key}"
    messages = [
        {"role": "system", "content": "You answer in one line."},
        {"role": "user", "content": "Summarise CEL for Ada"},
    ]
    assert sent["body"] == {"model": model, "messages": messages, "temperature": 0.5, "max_tokens": 64}

    usage = {"inputTokens": 9, "outputTokens": 5}  # the local API counts words
    ask = step_of(c, run["id"], "ask")
    assert ask["status"] == "succeeded" and ask["attempt"] == 1
    assert ask["output"] == {"text": text, "usage": usage}
    assert ask["input"]["messages"] == messages and ask["input"]["model"] == model
    succeeded = [e for e in events_of(c, run["id"]) if e["type"] == "step.succeeded" and e["stepId"] == "ask"]
    assert len(succeeded) == 1 and succeeded[0]["data"]["usage"] == usage
    assert succeeded[0]["data"]["stepType"] == "llm"

    assert key not in everything_about(c, run["id"])
    for name in ("runner", "gateway"):
        assert key not in logs_of(llm_stack, name), name


def test_without_a_stored_key_the_step_fails_saying_how_to_add_one(c: httpx.Client, api: LlmUpstream) -> None:
    model = f"nokey-{uuid.uuid4().hex[:8]}"
    run = run_flow(c, llm_flow(model, retry={"maxAttempts": 3, "initialDelayMs": 10}), INPUT)
    assert run["status"] == "failed"
    assert run["error"]["stepId"] == "ask" and run["error"]["type"] == "missing-key"
    assert "POST /api/v1/api-keys" in run["error"]["message"] and "openai" in run["error"]["message"]
    ask = step_of(c, run["id"], "ask")
    assert ask["status"] == "failed" and ask["attempt"] == 1  # not retried: only a person can add a key
    assert api.of(model) == []


def test_a_deleted_key_stops_the_next_run(c: httpx.Client, api: LlmUpstream) -> None:
    store_key(c, new_key())
    model = f"del-{uuid.uuid4().hex[:8]}"
    assert run_flow(c, llm_flow(model), INPUT)["status"] == "succeeded"
    assert c.delete("/api-keys/openai").status_code == 204
    run = run_flow(c, llm_flow(model), INPUT)
    assert run["status"] == "failed" and run["error"]["type"] == "missing-key"
    assert len(api.of(model)) == 1


def test_a_provider_4xx_fails_the_step_without_retrying(c: httpx.Client, api: LlmUpstream) -> None:
    store_key(c, new_key())
    run = run_flow(c, llm_flow("status-400", retry={"maxAttempts": 3, "initialDelayMs": 10}), INPUT)
    assert run["status"] == "failed"
    assert run["error"]["type"] == "provider-error"
    assert run["error"]["message"] == "openai answered 400: upstream says 400"
    assert step_of(c, run["id"], "ask")["attempt"] == 1


def test_a_provider_5xx_is_retried_and_may_then_succeed(c: httpx.Client, api: LlmUpstream) -> None:
    store_key(c, new_key())
    model = f"flaky-{uuid.uuid4().hex[:8]}"
    api.fail(model, 503, 429)
    run = run_flow(c, llm_flow(model, retry={"maxAttempts": 3, "initialDelayMs": 50, "backoff": "fixed"}), INPUT)
    assert run["status"] == "succeeded", run
    assert step_of(c, run["id"], "ask")["attempt"] == 3 and len(api.of(model)) == 3
    events = events_of(c, run["id"])
    retrying = [e for e in events if e["type"] == "step.retrying"]
    assert [e["data"]["error"]["type"] for e in retrying] == ["provider-error", "provider-error"]
    assert all("usage" not in e["data"] for e in retrying)
    [succeeded] = [e for e in events if e["type"] == "step.succeeded" and e["stepId"] == "ask"]
    assert succeeded["attempt"] == 3 and succeeded["data"]["usage"]["outputTokens"] == 5


def test_a_provider_5xx_that_persists_fails_after_the_last_attempt(c: httpx.Client, api: LlmUpstream) -> None:
    store_key(c, new_key())
    run = run_flow(c, llm_flow("status-502", retry={"maxAttempts": 2, "initialDelayMs": 50}), INPUT)
    assert run["status"] == "failed" and run["error"]["type"] == "provider-error"
    assert "502" in run["error"]["message"]
    assert step_of(c, run["id"], "ask")["attempt"] == 2


def test_the_key_never_shows_even_when_the_provider_echoes_it(
    c: httpx.Client, api: LlmUpstream, llm_stack: ProcessStack
) -> None:
    key = new_key()
    store_key(c, key)
    run = run_flow(c, llm_flow("echo-key"), INPUT)
    assert run["status"] == "succeeded", run
    assert run["output"] == {"said": "you sent Bearer [redacted]"}
    assert [r["authorization"] for r in api.requests if key in str(r["authorization"])] == [f"Bearer {key}"]
    failed = run_flow(c, llm_flow("status-401", then=False, onError="continue"), INPUT)
    assert failed["status"] == "succeeded"
    assert step_of(c, failed["id"], "ask")["output"]["error"]["type"] == "provider-error"
    listed = c.get("/api-keys")
    assert listed.status_code == 200 and key not in listed.text
    for run_id in (run["id"], failed["id"]):
        assert key not in everything_about(c, run_id)
    for name in ("runner", "gateway"):
        assert key not in logs_of(llm_stack, name), name
