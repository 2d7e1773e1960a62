"""WebSocket messages of the live streams ``/ws/runs/{runId}`` and ``/ws/flows/{flowId}``."""

from __future__ import annotations

from typing import Any, Literal

from flowmesh.contracts.models.base import Timestamp, WireModel
from flowmesh.contracts.models.runs import Run, RunEvent

SUBPROTOCOL = "flowmesh.v1"
"""The subprotocol the server selects."""
BEARER_PREFIX = "bearer."
"""Prefix of the subprotocol that carries a token."""


class WsSnapshot(WireModel):
    """First message of ``/ws/runs/{id}`` without ``after``."""

    type: Literal["snapshot"] = "snapshot"
    run: Run
    steps: dict[str, dict[str, Any]]
    seq: int


class WsClose:
    """Close codes of the live streams."""

    TOO_SLOW = 1013
    """The client fell 1,000 events behind (each watcher's queue in the gateway is bounded): reconnect with
    ``?after=`` the last ``seq`` seen, which replays the rest from history."""
    GONE = 1001
    """The gateway is stopping: reconnect (to any replica) with ``?after=``."""


class WsEvent(WireModel):
    """One run event."""

    type: Literal["event"] = "event"
    seq: int
    event: RunEvent


class WsTicket(WireModel):
    """``POST /ws-tickets``: a single-use, short-lived WebSocket credential."""

    ticket: str
    expires_at: Timestamp
