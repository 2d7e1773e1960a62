"""``llm`` steps: an OpenAI-compatible chat completion, built and read without I/O.

The request is ``POST {baseUrl}/chat/completions`` with ``model``, the rendered ``messages`` and the
optional ``temperature`` and ``max_tokens``; ``baseUrl`` comes from the runner's provider table
(``FLOWMESH_RUNNER_LLM_PROVIDERS``). The tenant's key is added by the caller
(:class:`flowmesh.runner.io_steps.LlmStep`) as ``Authorization: Bearer …`` and never reaches this
module's results: what is recorded as the step's input, output and error is built here from the
definition and the provider's answer, and :func:`redact` removes the key from anything a provider
echoed back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Final

from flowmesh.contracts.expressions import render
from flowmesh.contracts.models.definition import LlmData
from flowmesh.runner.outcome import Outcome

DEFAULT_PROVIDERS: Final[Mapping[str, str]] = {"openai": "https://api.openai.com/v1"}
"""Providers known without configuration; ``FLOWMESH_RUNNER_LLM_PROVIDERS`` adds or replaces entries."""
RETRYABLE_STATUS: Final = frozenset({408, 429})
"""Besides 5xx: the provider's statuses worth another attempt (the ``http`` step's rule)."""
MAX_ERROR_CHARS: Final = 500
"""How much of a provider's error message a step's error keeps."""
REDACTED: Final = "[redacted]"


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A chat completion to send: where, what, and what the step records as its input."""

    url: str
    body: dict[str, Any]
    record: dict[str, Any]
    """The step's recorded input: the request as sent, without the key."""


def base_url(providers: Mapping[str, str], provider: str) -> str | None:
    """The base URL of a provider (names are case-insensitive, as the key vault's are), or None."""
    return providers.get(provider.lower())


def chat_url(base: str) -> str:
    """``{base}/chat/completions``, whether or not the base ends with a slash."""
    return base.rstrip("/") + "/chat/completions"


def build_request(data: LlmData, context: Mapping[str, Any], base: str) -> ChatRequest:
    """The request of one attempt: each message's ``content`` rendered as a template.

    A content that is one whole ``{{ expr }}`` giving a non-string value is sent as its JSON text.

    Raises:
        ExpressionError: a template does not evaluate.
    """
    messages = [{"role": m.role, "content": _as_text(render(m.content, context))} for m in data.messages]
    body: dict[str, Any] = {"model": data.model, "messages": messages}
    record: dict[str, Any] = {"provider": data.provider.lower(), "model": data.model, "messages": messages}
    if data.temperature is not None:
        body["temperature"] = record["temperature"] = data.temperature
    if data.max_tokens is not None:
        body["max_tokens"] = record["maxTokens"] = data.max_tokens
    url = chat_url(base)
    record["url"] = url
    return ChatRequest(url=url, body=body, record=record)


def read_completion(status: int, raw: bytes, *, provider: str) -> Outcome:
    """How an attempt ended, from the provider's status and body.

    2xx with a first choice holding text: ``{text, usage: {inputTokens, outputTokens}}`` (the counts
    also in :attr:`Outcome.usage`, for the ``step.succeeded`` event). Any other status fails
    (``provider-error``; retryable for 408, 429 and 5xx); a 2xx that is not a completion fails with
    ``bad-response``.
    """
    payload = _json(raw)
    if not 200 <= status < 300:
        detail = _error_detail(payload, raw)
        message = f"{provider} answered {status}" + (f": {detail}" if detail else "")
        if 300 <= status < 400:
            message += " (redirects are not followed: the API key would go along)"
        retryable = status in RETRYABLE_STATUS or status >= 500
        return Outcome.failure(message, "provider-error", retryable=retryable)
    if not isinstance(payload, dict):
        return Outcome.failure(f"{provider} answered {status} with a body that is not a JSON object", "bad-response")
    choices = payload.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return Outcome.failure(f"{provider} answered {status} without any choice", "bad-response")
    reply = choices[0].get("message")
    text = _content_text(reply.get("content") if isinstance(reply, dict) else None)
    if text is None:
        return Outcome.failure(f"{provider} answered {status} with a choice holding no text", "bad-response")
    usage = token_usage(payload.get("usage"))
    return Outcome(ok=True, output={"text": text, "usage": usage}, usage=usage)


def token_usage(value: Any) -> dict[str, int]:
    """``{inputTokens, outputTokens}`` from an OpenAI ``usage`` object (absent counts are 0)."""
    found = value if isinstance(value, dict) else {}
    return {"inputTokens": _count(found.get("prompt_tokens")), "outputTokens": _count(found.get("completion_tokens"))}


def redact(outcome: Outcome, secret: str) -> Outcome:
    """The outcome with every occurrence of ``secret`` in its strings replaced (a provider may echo a key)."""
    if not secret:
        return outcome
    return replace(
        outcome,
        output=_scrub(outcome.output, secret),
        message=outcome.message.replace(secret, REDACTED),
        input=_scrub(outcome.input, secret),
    )


def _scrub(value: Any, secret: str) -> Any:
    if isinstance(value, str):
        return value.replace(secret, REDACTED)
    if isinstance(value, dict):
        return {k: _scrub(v, secret) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v, secret) for v in value]
    return value


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _content_text(content: Any) -> str | None:
    """A message's text: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        texts = [p for p in parts if isinstance(p, str)]
        return "".join(texts) if texts else None
    return None


def _error_detail(payload: Any, raw: bytes) -> str:
    """The provider's own explanation: OpenAI's ``error.message``, else a short piece of the body."""
    detail: Any = None
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict):
            detail = error.get("message")
        elif isinstance(error, str):
            detail = error
        if detail is None:
            detail = payload.get("message") or payload.get("detail")
    text = detail if isinstance(detail, str) else raw.decode("utf-8", errors="replace")
    text = " ".join(text.split())
    return text[:MAX_ERROR_CHARS] + ("…" if len(text) > MAX_ERROR_CHARS else "")


def _count(value: Any) -> int:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
