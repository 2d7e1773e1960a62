"""Replies that fit: a value too large for its reply is replaced by a marker saying so and where to read it.

A reply travels as one NATS message, which cannot exceed the server's ``max_payload``. A run or a
step holds what its flow produced (a webhook body, an HTTP response), so one item can be larger than
any reply. Rather than fail the whole page (one run would make a tenant's run list unreadable),
the largest values of the reply are replaced, largest first, by a marker until the reply fits::

    {"$omitted": {"reason": "too-large", "bytes": 1234567, "fetch": "/api/v1/runs/<id>"}}

``bytes`` is the value's size as JSON; ``fetch`` (when present) is a read that returns the value
whole, because it asks for that item alone; without it the value is larger than any reply can be.
Items are never dropped or cut from a page, so ``page``/``pageSize`` arithmetic stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import orjson

OMITTED: Final = "$omitted"
"""The key of the marker that stands for a value left out of a reply."""


def omitted(size: int, fetch: str | None = None) -> dict[str, Any]:
    """The marker for a value of ``size`` bytes (as JSON) left out; ``fetch`` says where it can be read whole."""
    marker: dict[str, Any] = {"reason": "too-large", "bytes": size}
    if fetch:
        marker["fetch"] = fetch
    return {OMITTED: marker}


def is_omitted(value: Any) -> bool:
    """Whether ``value`` is the marker of a value left out of a reply."""
    return isinstance(value, dict) and set(value) == {OMITTED}


@dataclass(frozen=True, slots=True)
class Slot:
    """A value of a reply that may be left out: ``holder[key]``, readable whole at ``fetch``."""

    holder: dict[str, Any]
    key: str
    fetch: str | None = None


def encoded_size(value: Any) -> int:
    """The size of ``value`` as JSON, as replies are encoded."""
    return len(orjson.dumps(value))


def fit(reply: Any, slots: list[Slot], budget: int) -> int:
    """Replace the largest values of ``slots`` in ``reply`` by markers until it encodes within ``budget`` bytes.

    Changes ``reply`` in place and returns its encoded size (still over ``budget`` when the values
    that may be left out were not enough: the RPC server then answers ``reply-too-large``).
    """
    total = encoded_size(reply)
    if total <= budget:
        return total
    sized = [(encoded_size(s.holder[s.key]), i, s) for i, s in enumerate(slots) if s.holder.get(s.key) is not None]
    for size, _, slot in sorted(sized, key=lambda t: (-t[0], t[1])):
        if total <= budget:
            break
        marker = omitted(size, slot.fetch)
        slot.holder[slot.key] = marker
        total -= size - encoded_size(marker)
    return total
