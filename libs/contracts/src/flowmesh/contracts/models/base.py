"""Base models: camelCase on every wire (HTTP, WebSocket, NATS), snake_case accepted on input.

Python code keeps its snake_case names; JSON clients (the canvases first) get the camelCase they expect.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Final

from pydantic import BaseModel, ConfigDict, PlainSerializer
from pydantic.alias_generators import to_camel

from flowmesh.contracts.ids import format_time

MAX_INT4: Final = 2_147_483_647
"""The largest PostgreSQL ``integer``: versions and seqs a client names are bounded by it (422, not an overflow)."""

Timestamp = Annotated[datetime, PlainSerializer(format_time, return_type=str, when_used="json")]
"""A time, written as RFC 3339 UTC with milliseconds."""

_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def rfc3339_only(value: Any) -> Any:
    """Refuse a number where a time is expected (a ``mode="before"`` validator of query times).

    pydantic reads a bare number as Unix time; the API speaks RFC 3339 only.
    """
    if isinstance(value, int | float) or (isinstance(value, str) and _NUMBER.fullmatch(value.strip())):
        raise ValueError("expected an RFC 3339 time, e.g. 2026-01-31T12:00:00Z")
    return value


class WireModel(BaseModel):
    """Every contract model: camelCase aliases, read tolerantly (unknown fields ignored).

    HTTP bodies are checked strictly at the gateway with :func:`flowmesh.contracts.strict.parse_strict`,
    which refuses unknown top-level fields; NATS messages are read with plain validation, so a newer
    sender never breaks an older reader.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        extra="ignore",
    )

    def wire(self, **kwargs: Any) -> dict[str, Any]:
        """This model as a JSON-ready dict with camelCase keys."""
        return self.model_dump(mode="json", by_alias=True, **kwargs)


class OpenModel(WireModel):
    """A model that keeps whatever extra keys it was given (canvas node/edge objects)."""

    model_config = ConfigDict(extra="allow")
