"""The transactional outbox: messages written with the state change they announce, published after.

A service inserts outbox rows in the same transaction as its change (:func:`enqueue`). The relay
publishes them to JetStream with ``Nats-Msg-Id`` = row id and deletes each row once JetStream
acknowledged it. A crash before the publish leaves the row for the next relay run; a crash after
the publish but before the delete re-publishes a message JetStream drops as a duplicate within its
window (consumers de-duplicate by id beyond it). Several replicas share the work with
``FOR UPDATE SKIP LOCKED``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from nats.js import JetStreamContext

from flowmesh.contracts import headers as h
from flowmesh.contracts.ids import new_id
from flowmesh.runtime.db import Database
from flowmesh.runtime.tracing import inject

log = logging.getLogger(__name__)


async def enqueue(
    conn: asyncpg.Connection, schema: str, *, subject: str, payload: Any, tenant: str, msg_id: str | None = None
) -> str:
    """Add a message to the outbox inside the caller's transaction; returns its id (= ``Nats-Msg-Id``)."""
    msg_id = msg_id or new_id()
    # the trace that caused the message goes with it: the relay publishes it later, from elsewhere
    hdrs = inject({h.TENANT: tenant, h.SCHEMA: h.SCHEMA_VERSION})
    await conn.execute(
        f"INSERT INTO {schema}.outbox (id, subject, payload, headers) VALUES ($1, $2, $3, $4)",
        msg_id,
        subject,
        payload,
        hdrs,
    )
    return msg_id


class OutboxRelay:
    """Publishes outbox rows to JetStream: at once when told, and on a short poll after a crash."""

    def __init__(self, db: Database, schema: str, *, batch: int = 200, poll_s: float = 1.0) -> None:
        self._db = db
        self._schema = schema
        self._batch = batch
        self._poll_s = poll_s
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._js: JetStreamContext | None = None

    def notify(self) -> None:
        """A transaction with outbox rows committed: publish them now."""
        self._wake.set()

    def start(self, js: JetStreamContext) -> None:
        """Run in the background until :meth:`stop`."""
        self._js = js
        self._task = asyncio.create_task(self._run(js), name="outbox-relay")

    @contextlib.asynccontextmanager
    async def running(self, js: JetStreamContext) -> AsyncIterator[OutboxRelay]:
        """Relay in the background for the duration of the block (a service resource)."""
        self.start(js)
        try:
            yield self
        finally:
            await self.stop()

    async def publish_now(self) -> None:
        """Publish what is pending before going on (so a reply follows its announcement); never raises."""
        if self._js is None:
            return
        try:
            await self.drain(self._js)
        except Exception as exc:
            log.warning("outbox publish failed, the relay will retry: %s", exc)
            self.notify()

    async def stop(self) -> None:
        """Stop after the current batch; unpublished rows wait for the next start."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self, js: JetStreamContext) -> None:
        while True:
            try:
                while await self.drain(js) == self._batch:
                    pass
            except Exception:
                log.exception("outbox relay failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll_s)
            self._wake.clear()

    async def drain(self, js: JetStreamContext) -> int:
        """Publish one batch of pending rows, oldest first; returns how many were published."""
        async with self._db.transaction() as conn:
            rows = await conn.fetch(
                f"SELECT id, subject, payload, headers FROM {self._schema}.outbox"
                " ORDER BY created_at, id LIMIT $1 FOR UPDATE SKIP LOCKED",
                self._batch,
            )
            if not rows:
                return 0
            # sent back to back on one connection, so the stream keeps their order
            acks = await asyncio.gather(
                *(
                    js.publish(
                        row["subject"],
                        json.dumps(row["payload"], separators=(",", ":")).encode(),
                        headers={**row["headers"], h.MSG_ID: row["id"]},
                    )
                    for row in rows
                ),
                return_exceptions=True,
            )
            done = [row["id"] for row, ack in zip(rows, acks, strict=True) if not isinstance(ack, BaseException)]
            for ack in acks:
                if isinstance(ack, BaseException):
                    log.warning("outbox publish failed, will retry: %s", ack)
            if done:
                await conn.execute(f"DELETE FROM {self._schema}.outbox WHERE id = ANY($1::uuid[])", done)
            return len(done)
