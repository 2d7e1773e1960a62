"""The llm step: request building and response reading (pure), then one attempt against a local API."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from flowmesh.contracts.errors import NotFound, ServiceUnavailable
from flowmesh.contracts.expressions import ExpressionError
from flowmesh.contracts.models.definition import LlmData
from flowmesh.contracts.testing import linear, node
from flowmesh.runner.engine import Outcome, RunRecord, RunState
from flowmesh.runner.graph import Graph
from flowmesh.runner.io_steps import HttpStep, LlmStep
from flowmesh.runner.llm import build_request, read_completion, redact
from flowmesh.runner.settings import RunnerSettings
from flowmesh.runtime import tracing
from upstream import LlmUpstream

KEY = "sk-test-0123456789abcdef"
CONTEXT: dict[str, Any] = {"input": {"name": "Ada", "tags": ["x", "y"]}, "steps": {}, "run": {}}


def llm(**data: Any) -> LlmData:
    fields: dict[str, Any] = {
        "provider": "openai",
        "model": "gpt-test",
        "messages": [{"role": "user", "content": "hi"}],
        **data,
    }
    return LlmData.model_validate(fields)


def completion(text: Any = "hello", usage: Any = None, **extra: Any) -> bytes:
    body: dict[str, Any] = {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}], **extra}
    if usage is not None:
        body["usage"] = usage
    return json.dumps(body).encode()


# --- building the request (pure) ----------------------------------------------------------------


def test_messages_are_rendered_as_templates_and_the_request_names_the_model() -> None:
    data = llm(
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Greet {{ input.name }}"},
            {"role": "user", "content": "{{ input.tags }}"},
        ],
        temperature=0.2,
        maxTokens=50,
    )
    req = build_request(data, CONTEXT, "https://api.example.com/v1/")
    assert req.url == "https://api.example.com/v1/chat/completions"
    assert req.body == {
        "model": "gpt-test",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Greet Ada"},
            {"role": "user", "content": '["x","y"]'},  # a whole template giving a list is sent as its JSON
        ],
        "temperature": 0.2,
        "max_tokens": 50,
    }
    assert req.record == {
        "provider": "openai",
        "model": "gpt-test",
        "messages": req.body["messages"],
        "temperature": 0.2,
        "maxTokens": 50,
        "url": req.url,
    }


def test_optional_settings_are_left_out_when_not_set() -> None:
    req = build_request(llm(provider="OpenAI"), CONTEXT, "https://api.example.com/v1")
    assert set(req.body) == {"model", "messages"} and req.record["provider"] == "openai"


def test_a_template_that_does_not_evaluate_is_an_expression_error() -> None:
    with pytest.raises(ExpressionError):
        build_request(llm(messages=[{"role": "user", "content": "{{ input.missing }}"}]), CONTEXT, "http://x/v1")


# --- reading the answer (pure) ------------------------------------------------------------------


def test_a_completion_gives_text_and_token_counts() -> None:
    outcome = read_completion(200, completion("hi there", {"prompt_tokens": 12, "completion_tokens": 3}), provider="p")
    assert outcome.ok
    assert outcome.output == {"text": "hi there", "usage": {"inputTokens": 12, "outputTokens": 3}}
    assert outcome.usage == {"inputTokens": 12, "outputTokens": 3}


def test_missing_or_odd_usage_counts_are_zero() -> None:
    assert read_completion(200, completion(), provider="p").usage == {"inputTokens": 0, "outputTokens": 0}
    odd = completion(usage={"prompt_tokens": "7", "completion_tokens": -1})
    assert read_completion(200, odd, provider="p").usage == {"inputTokens": 0, "outputTokens": 0}


def test_content_parts_are_joined() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "image_url"}, {"type": "text", "text": "b"}]
    assert read_completion(200, completion(parts), provider="p").output["text"] == "ab"


@pytest.mark.parametrize(
    ("status", "retryable"),
    [(400, False), (401, False), (404, False), (408, True), (429, True), (500, True), (503, True)],
)
def test_provider_errors_fail_and_408_429_and_5xx_are_retryable(status: int, retryable: bool) -> None:
    body = json.dumps({"error": {"message": "You exceeded your quota", "type": "x"}}).encode()
    outcome = read_completion(status, body, provider="openai")
    assert not outcome.ok and outcome.error_type == "provider-error" and outcome.retryable is retryable
    assert outcome.message == f"openai answered {status}: You exceeded your quota"
    assert outcome.usage is None


def test_an_error_body_that_is_not_json_is_quoted_briefly() -> None:
    outcome = read_completion(502, b"<html>\n  bad   gateway " + b"x" * 2000 + b"</html>", provider="p")
    assert outcome.message.startswith("p answered 502: <html> bad gateway xxx") and len(outcome.message) < 600


def test_a_redirect_is_not_followed() -> None:
    outcome = read_completion(302, b"", provider="p")
    assert not outcome.ok and not outcome.retryable and "redirects are not followed" in outcome.message


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b"<html>hi</html>", "not a JSON object"),
        (b"[1, 2]", "not a JSON object"),
        (json.dumps({"choices": []}).encode(), "without any choice"),
        (json.dumps({"object": "chat.completion"}).encode(), "without any choice"),
        (completion(None), "holding no text"),
    ],
)
def test_a_2xx_that_is_no_completion_fails_without_retry(raw: bytes, says: str) -> None:
    outcome = read_completion(200, raw, provider="p")
    assert not outcome.ok and outcome.error_type == "bad-response" and not outcome.retryable and says in outcome.message


def test_redact_removes_the_key_from_message_output_and_input() -> None:
    leaky = Outcome(ok=False, output={"text": [f"k={KEY}"]}, message=f"bad key {KEY}", input={"m": KEY})
    clean = redact(leaky, KEY)
    assert KEY not in json.dumps([clean.output, clean.message, clean.input])
    assert clean.message == "bad key [redacted]"


# --- the engine puts the counts in step.succeeded ---------------------------------------------


def llm_run() -> RunState:
    ask = node("ask", "llm", provider="openai", model="m", messages=[{"role": "user", "content": "hi"}])
    graph = Graph(linear(ask))
    now = datetime(2026, 1, 1, tzinfo=UTC)
    run = RunRecord(
        id="r", tenant_id="t", flow_id="f", version=1, status="queued", trigger_type="manual", input={}, created_at=now
    )
    ex = RunState(run, graph, {}, now)
    ex.advance()
    assert ex.dispatch == ["ask"]
    return ex


def test_the_token_counts_go_into_the_step_succeeded_event() -> None:
    ex = llm_run()
    usage = {"inputTokens": 5, "outputTokens": 2}
    ex.complete("ask", 1, Outcome(ok=True, output={"text": "yo", "usage": usage}, usage=usage))
    succeeded = next(e for e in ex.events if e.type == "step.succeeded" and e.step_id == "ask")
    assert succeeded.data.dump() == {"status": "succeeded", "durationMs": 0, "stepType": "llm", "usage": usage}
    assert ex.run.status == "succeeded" and ex.run.output == {"text": "yo", "usage": usage}


def test_other_steps_events_carry_no_usage() -> None:
    ex = llm_run()
    ex.complete("ask", 1, Outcome.failure("nope", "provider-error"))
    assert all("usage" not in e.data.dump() for e in ex.events)


# --- settings -------------------------------------------------------------------------------------


def test_providers_are_merged_over_the_openai_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWMESH_ENV", "dev")  # production would also ask for the runner's NATS user
    monkeypatch.setenv("FLOWMESH_RUNNER_LLM_PROVIDERS", '{"Local": "http://127.0.0.1:9/v1/"}')
    assert RunnerSettings().llm_base_urls == {"openai": "https://api.openai.com/v1", "local": "http://127.0.0.1:9/v1"}
    monkeypatch.setenv("FLOWMESH_RUNNER_LLM_PROVIDERS", '{"openai": "http://127.0.0.1:9/v1"}')
    assert RunnerSettings().llm_base_urls == {"openai": "http://127.0.0.1:9/v1"}


@pytest.mark.parametrize("value", ['{"x": "ftp://h/v1"}', '{"x": "not a url"}', '{"a b": "http://h/v1"}'])
def test_bad_provider_settings_are_refused_at_start(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("FLOWMESH_ENV", "dev")
    monkeypatch.setenv("FLOWMESH_RUNNER_LLM_PROVIDERS", value)
    with pytest.raises(ValidationError, match="provider"):
        RunnerSettings()


# --- one attempt against a local OpenAI-compatible API ------------------------------------------


@pytest.fixture(scope="module")
def api() -> Iterator[LlmUpstream]:
    server = LlmUpstream()
    yield server
    server.close()


class Keys:
    """Stands in for the key vault's reveal (the e2e tests use the real usage service)."""

    def __init__(self, found: dict[tuple[str, str], str] | None = None, error: Exception | None = None) -> None:
        self.found = found or {}
        self.error = error
        self.asked: list[tuple[str, str]] = []

    async def __call__(self, tenant: str, provider: str) -> str:
        self.asked.append((tenant, provider))
        if self.error is not None:
            raise self.error
        if (tenant, provider) not in self.found:
            raise NotFound(f"no {provider} key is stored")
        return self.found[(tenant, provider)]


@asynccontextmanager
async def llm_step(
    base: str, keys: Keys, *, allow_private: bool = True, max_bytes: int = 1024 * 1024
) -> AsyncIterator[LlmStep]:
    http = HttpStep(allow_private=allow_private, max_bytes=max_bytes, default_timeout_ms=5000)
    await http.start()
    try:
        yield LlmStep(http, keys, providers={"openai": base}, default_timeout_ms=5000)
    finally:
        await http.close()


async def attempt(api: LlmUpstream, keys: Keys, data: LlmData, **kw: Any) -> Outcome:
    async with llm_step(api.base, keys, **kw) as step:
        return await step.run(data, CONTEXT, tenant="acme")


async def test_a_completion_sends_the_key_as_bearer_and_the_rendered_messages(api: LlmUpstream) -> None:
    keys = Keys({("acme", "openai"): KEY})
    data = llm(model="ok-1", messages=[{"role": "user", "content": "Hello {{ input.name }}"}])
    outcome = await attempt(api, keys, data)
    assert outcome.ok, outcome.message
    assert outcome.output == {"text": "echo: Hello Ada", "usage": {"inputTokens": 2, "outputTokens": 3}}
    assert outcome.usage == {"inputTokens": 2, "outputTokens": 3}
    [sent] = api.of("ok-1")
    assert sent["path"] == "/v1/chat/completions" and sent["authorization"] == f"Bearer {KEY}"
    assert sent["body"] == {"model": "ok-1", "messages": [{"role": "user", "content": "Hello Ada"}]}
    assert keys.asked == [("acme", "openai")]
    assert KEY not in json.dumps([outcome.output, outcome.input, outcome.message])


async def test_no_stored_key_fails_at_once_saying_how_to_add_one(api: LlmUpstream) -> None:
    outcome = await attempt(api, Keys(), llm(model="nokey-1"))
    assert not outcome.ok and outcome.error_type == "missing-key" and not outcome.retryable
    assert "POST /api/v1/api-keys" in outcome.message and "openai" in outcome.message
    assert api.of("nokey-1") == [] and outcome.input["model"] == "nokey-1"


async def test_a_vault_that_cannot_answer_is_retryable(api: LlmUpstream) -> None:
    outcome = await attempt(api, Keys(error=ServiceUnavailable("usage is down")), llm(model="down-1"))
    assert not outcome.ok and outcome.error_type == "key-unavailable" and outcome.retryable


async def test_an_unknown_provider_is_a_configuration_error(api: LlmUpstream) -> None:
    keys = Keys()
    outcome = await attempt(api, keys, llm(provider="mystery"))
    assert not outcome.ok and outcome.error_type == "configuration" and "openai" in outcome.message
    assert keys.asked == []  # no key is revealed for a call that cannot be made


async def test_an_expression_error_asks_for_no_key(api: LlmUpstream) -> None:
    keys = Keys({("acme", "openai"): KEY})
    outcome = await attempt(api, keys, llm(messages=[{"role": "user", "content": "{{ input.nope }}"}]))
    assert outcome.error_type == "expression" and not outcome.retryable and keys.asked == []


async def test_provider_statuses_are_reported_and_5xx_is_retryable(api: LlmUpstream) -> None:
    keys = Keys({("acme", "openai"): KEY})
    bad = await attempt(api, keys, llm(model="status-401"))
    assert bad.error_type == "provider-error" and not bad.retryable
    assert bad.message == "openai answered 401: upstream says 401"
    busy = await attempt(api, keys, llm(model="status-503"))
    assert busy.error_type == "provider-error" and busy.retryable


async def test_a_provider_echoing_the_key_has_it_redacted(api: LlmUpstream) -> None:
    outcome = await attempt(api, Keys({("acme", "openai"): KEY}), llm(model="echo-key"))
    assert outcome.ok and outcome.output["text"] == "you sent Bearer [redacted]"


async def test_private_targets_are_refused_unless_allowed(api: LlmUpstream) -> None:
    keys = Keys({("acme", "openai"): KEY})
    outcome = await attempt(api, keys, llm(model="private-1"), allow_private=False)
    assert not outcome.ok and outcome.error_type == "forbidden-address" and not outcome.retryable
    assert api.of("private-1") == []


async def test_bodies_over_the_cap_fail_the_step(api: LlmUpstream) -> None:
    outcome = await attempt(api, Keys({("acme", "openai"): KEY}), llm(model="big"), max_bytes=64 * 1024)
    assert not outcome.ok and outcome.error_type == "response-too-large" and not outcome.retryable


async def test_a_slow_provider_times_out_retryably(api: LlmUpstream) -> None:
    outcome = await attempt(api, Keys({("acme", "openai"): KEY}), llm(model="sleep-3000", timeoutMs=200))
    assert not outcome.ok and outcome.error_type == "timeout" and outcome.retryable


async def test_a_provider_that_is_not_listening_is_a_retryable_network_error(api: LlmUpstream) -> None:
    async with llm_step("http://127.0.0.1:9/v1", Keys({("acme", "openai"): KEY})) as step:
        outcome = await step.run(llm(), CONTEXT, tenant="acme")
    assert not outcome.ok and outcome.error_type == "network" and outcome.retryable


async def test_the_provider_request_continues_the_step_attempt_trace(api: LlmUpstream) -> None:
    keys = Keys({("acme", "openai"): KEY})
    tp = tracing.new_traceparent()
    with tracing.joined(tp):
        outcome = await attempt(api, keys, llm(model="traced-1"))
    assert outcome.ok, outcome.message
    [sent] = api.of("traced-1")
    assert sent["traceparent"] == tp  # tracing off: the attempt's own context, carried as it is
