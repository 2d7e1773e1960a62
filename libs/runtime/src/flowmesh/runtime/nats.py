"""NATS and JetStream: the broker every service uses, and idempotent provisioning of streams."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Iterable
from typing import Annotated, Any

import nats.errors
from faststream._internal.context import Context  # the class behind faststream.Context()
from faststream.nats import NatsBroker
from faststream.nats.message import NatsMessage as _NatsMessage
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError, BucketNotFoundError
from nats.js.kv import KeyValue

from flowmesh.contracts.streams import ALL_STREAMS, StreamSpec

log = logging.getLogger(__name__)


class _MessageContext(Context):
    """FastStream's message injection, resolved on the event loop.

    ``Context.use`` is synchronous, so fast-depends runs it on a worker thread for every message
    (a thread hop and a GIL hand-over per delivery); an async ``use`` is awaited in place.
    """

    async def use(self, /, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        resolved: dict[str, Any] = super().use(**kwargs)
        return resolved


# the delivered message, for handler signatures: ``async def h(body: ..., msg: Message)``
Message = Annotated[_NatsMessage, _MessageContext("message")]


def _fetch_times_out_as_nats_says() -> None:
    """Make a pull ``fetch`` that got nothing raise nats-py's ``TimeoutError``, never asyncio's.

    nats-py 2.x raises either, depending on where the deadline passes; FastStream 0.7.8's pull loop
    suppresses only nats-py's, so asyncio's escaped it: an ERROR with a traceback in the logs and a
    restart of the consuming task, on an idle subscription. (nats-py's error subclasses asyncio's,
    so every other caller catches it as before.)
    """
    fetch = JetStreamContext.PullSubscription.fetch
    if getattr(fetch, "__flowmesh__", False):
        return

    @functools.wraps(fetch)
    async def fetch_or_timeout(self: JetStreamContext.PullSubscription, *args: Any, **kwargs: Any) -> Any:
        try:
            return await fetch(self, *args, **kwargs)
        except nats.errors.TimeoutError:
            raise
        except TimeoutError as exc:
            raise nats.errors.TimeoutError from exc

    fetch_or_timeout.__flowmesh__ = True  # type: ignore[attr-defined]
    JetStreamContext.PullSubscription.fetch = fetch_or_timeout  # type: ignore[method-assign]


_fetch_times_out_as_nats_says()


def create_broker(nats_url: str, *, name: str, graceful_timeout: float = 10.0) -> NatsBroker:
    """A FastStream NATS broker that reconnects for ever (a restarted NATS must not kill a service)."""
    return NatsBroker(
        servers=[u.strip() for u in nats_url.split(",") if u.strip()],
        name=f"flowmesh-{name}",
        max_reconnect_attempts=-1,
        reconnect_time_wait=1,
        connect_timeout=2,
        graceful_timeout=graceful_timeout,
        # our logging setup (JSON lines) instead of FastStream's own coloured handler;
        # per-message "Received/Processed" lines are debug detail, not operations logs
        logger=logging.getLogger("flowmesh.broker"),
        log_level=logging.DEBUG,
    )


async def stop_broker(broker: NatsBroker, *, timeout: float = 10.0) -> None:
    """Stop taking messages, let in-flight handlers finish, close; bounded even when NATS is gone.

    With NATS unreachable, draining waits for a reconnection that may never come: a process told
    to stop must stop all the same.
    """
    try:
        await asyncio.wait_for(broker.stop(), timeout)
    except TimeoutError:
        log.warning("NATS did not drain within %ss; closing without it", timeout)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(broker.connection.close(), 1.0)


def stream_config(spec: StreamSpec, *, replicas: int = 1) -> StreamConfig:
    """The nats-py config of a contract stream spec."""
    return StreamConfig(
        name=spec.name,
        description=spec.description or None,
        subjects=list(spec.subjects),
        retention=RetentionPolicy(spec.retention),
        storage=StorageType.FILE,
        max_age=spec.max_age_s or None,
        duplicate_window=spec.duplicate_window_s,
        num_replicas=replicas,
    )


async def provision_streams(
    js: JetStreamContext, specs: Iterable[StreamSpec] = ALL_STREAMS, *, replicas: int = 1
) -> None:
    """Create each stream, or bring an existing one to its spec. Safe to run from every replica at once."""
    for spec in specs:
        config = stream_config(spec, replicas=replicas)
        try:
            await js.add_stream(config)
        except BadRequestError:
            # exists with another configuration (an older spec): update it in place
            await js.update_stream(config)
        log.debug("stream %s ready", spec.name)


async def ensure_bucket(js: JetStreamContext, bucket: str, *, ttl_s: float, history: int = 1) -> KeyValue:
    """A JetStream KV bucket whose entries expire after ``ttl_s``; created if missing (any replica may race)."""
    try:
        return await js.key_value(bucket)
    except BucketNotFoundError:
        pass
    try:
        return await js.create_key_value(KeyValueConfig(bucket=bucket, ttl=ttl_s, history=history))
    except BadRequestError:
        return await js.key_value(bucket)  # another replica created it first
