"""Least privilege holds on the NATS cluster the shape runs (docs/architecture.md#trust-on-nats), a few checks of
``tests/security/test_nats_permissions.py`` again against three nodes with the generated users.

An integrator publishes its own tenant's events (JetStream acknowledges them, on the R3 stream) and
nothing more: another tenant's run events, the runner's commands and the privileged key-reveal RPC are
refused by the server with a permissions violation. An anonymous connection is refused outright.
"""

from __future__ import annotations

import asyncio
import time

import nats.errors
import pytest
from nats.aio.client import Client

from flowmesh.cli.cluster import ClusterShape
from flowmesh.contracts import subjects
from flowmesh.contracts.permissions import inbox_prefix, integrator_user
from flowmesh.contracts.streams import EVENTS
from flowmesh.contracts.subjects import UsageOp


async def _violations(nc: Client, refused: list[str], subject: str, timeout: float = 5.0) -> bool:
    """Whether the server reported a permissions violation naming ``subject`` (nats-py lower-cases it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await nc.flush()
        if any("permissions violation" in r and subject.lower() in r for r in refused):
            return True
        await asyncio.sleep(0.05)
    return False


@pytest.mark.timeout(60)
async def test_an_integrator_may_publish_its_own_events_and_nothing_of_anyone_else(shape: ClusterShape) -> None:
    user = integrator_user("acme")
    refused: list[str] = []

    async def on_error(err: Exception) -> None:
        refused.append(str(err))

    nc = Client()
    await nc.connect(
        shape.nats_urls,
        user=user,
        password=shape.passwords[user],
        inbox_prefix=inbox_prefix(user),
        error_cb=on_error,
        connect_timeout=5,
        allow_reconnect=False,
    )
    try:
        ack = await nc.jetstream(timeout=10).publish(subjects.external_event("acme", "x"), b"{}")
        assert ack.stream == EVENTS.name and ack.seq > 0
        assert not refused
        await nc.subscribe("fm.runs.globex.>")
        assert await _violations(nc, refused, "fm.runs.globex.>"), refused
        await nc.publish(subjects.RUN_START_CMD, b"{}")
        assert await _violations(nc, refused, subjects.RUN_START_CMD), refused
        await nc.publish(UsageOp.KEYS_REVEAL, b"{}")
        assert await _violations(nc, refused, UsageOp.KEYS_REVEAL), refused
    finally:
        await nc.close()


@pytest.mark.timeout(60)
async def test_an_anonymous_connection_is_refused_by_every_node(shape: ClusterShape) -> None:
    for url in shape.nats_urls:
        nc = Client()
        try:
            with pytest.raises(nats.errors.Error) as refused:
                await nc.connect(url, connect_timeout=2, allow_reconnect=False, max_reconnect_attempts=0)
        finally:
            await nc.close()
        assert "authorization violation" in str(refused.value).lower(), refused.value
