"""Prometheus metrics shared by every service.

Each service defines its own metrics beside the code that records them (``flowmesh.runner.metrics``,
``flowmesh.gateway.metrics``, the scheduler's dispatcher, the usage meter); the ones here are
recorded by the runtime for every service. Names start with ``flowmesh_`` and carry their unit
(``_seconds``, ``_total``, ``_messages``); docs/operations.md lists them all.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

RPC_SERVED: Final = Counter(
    "flowmesh_rpc_served_total", "Request/reply operations served", ["service", "op", "outcome"]
)
RPC_SECONDS: Final = Histogram(
    "flowmesh_rpc_seconds",
    "Time to serve a request/reply operation",
    ["service", "op"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
RPC_CALLS: Final = Counter("flowmesh_rpc_calls_total", "Request/reply operations called", ["subject", "outcome"])
CONSUMER_PENDING: Final = Gauge(
    "flowmesh_consumer_pending_messages",
    "Messages of a durable JetStream consumer not delivered yet (its lag), as NATS last reported",
    ["consumer"],
)
CONSUMER_ACK_PENDING: Final = Gauge(
    "flowmesh_consumer_ack_pending_messages",
    "Messages delivered to a durable JetStream consumer and not acknowledged yet, as NATS last reported",
    ["consumer"],
)


def render() -> tuple[bytes, str]:
    """The current metrics in the Prometheus text format, and its content type."""
    return generate_latest(), CONTENT_TYPE_LATEST
