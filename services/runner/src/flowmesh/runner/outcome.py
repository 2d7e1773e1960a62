"""What an attempt of a step reports, and what a parent step sees of its child runs. Plain data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one attempt of a step ended."""

    ok: bool
    output: Any = None
    handle: str | None = None
    message: str = ""
    error_type: str = "error"
    retryable: bool = False
    input: Any = None
    wait: bool = False
    """The attempt started something to wait for (child runs): the step waits, it has not ended."""
    usage: dict[str, int] | None = None
    """Tokens an ``llm`` attempt used (``{inputTokens, outputTokens}``): put in ``step.succeeded``'s
    data, where the usage service meters them."""

    @classmethod
    def failure(cls, message: str, error_type: str = "error", *, retryable: bool = False) -> Outcome:
        """A failed attempt."""
        return cls(ok=False, message=message, error_type=error_type, retryable=retryable)


@dataclass(frozen=True, slots=True)
class Child:
    """A child run of a subflow or foreach step, as its parent sees it."""

    id: str
    index: int
    status: str
    output: Any = None
    error: dict[str, Any] | None = None
