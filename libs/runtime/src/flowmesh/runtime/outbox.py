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

from nats.js import JetStreamContext
from sqlalchemy import Column, DateTime, MetaData, Table, Text, delete, func, select
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from flowmesh.contracts import headers as h
from flowmesh.contracts.ids import new_id
from flowmesh.runtime.tracing import inject

log = logging.getLogger(__name__)


def outbox_table(metadata: MetaData) -> Table:
    """The ``outbox`` table in a service's schema (created by that service's migration)."""
    return Table(
        "outbox",
        metadata,
        Column("id", UUID(as_uuid=False), primary_key=True),
        Column("subject", Text, nullable=False),
        Column("payload", JSONB, nullable=False),
        Column("headers", JSONB, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    )


async def enqueue(
    session: AsyncSession, table: Table, *, subject: str, payload: Any, tenant: str, msg_id: str | None = None
) -> str:
    """Add a message to the outbox inside the caller's transaction; returns its id (= ``Nats-Msg-Id``)."""
    msg_id = msg_id or new_id()
    # the trace that caused the message goes with it: the relay publishes it later, from elsewhere
    hdrs = inject({h.TENANT: tenant, h.SCHEMA: h.SCHEMA_VERSION})
    await session.execute(table.insert().values(id=msg_id, subject=subject, payload=payload, headers=hdrs))
    return msg_id


class OutboxRelay:
    """Publishes outbox rows to JetStream: at once when told, and on a short poll after a crash."""

    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], table: Table, *, batch: int = 200, poll_s: float = 1.0
    ) -> None:
        self._sessions = sessions
        self._table = table
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
        t = self._table
        async with self._sessions.begin() as session:
            rows = (
                await session.execute(
                    select(t.c.id, t.c.subject, t.c.payload, t.c.headers)
                    .order_by(t.c.created_at, t.c.id)
                    .limit(self._batch)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            if not rows:
                return 0
            # sent back to back on one connection, so the stream keeps their order
            acks = await asyncio.gather(
                *(
                    js.publish(
                        row.subject,
                        json.dumps(row.payload, separators=(",", ":")).encode(),
                        headers={**row.headers, h.MSG_ID: row.id},
                    )
                    for row in rows
                ),
                return_exceptions=True,
            )
            done = [row.id for row, ack in zip(rows, acks, strict=True) if not isinstance(ack, BaseException)]
            for ack in acks:
                if isinstance(ack, BaseException):
                    log.warning("outbox publish failed, will retry: %s", ack)
            if done:
                await session.execute(delete(t).where(t.c.id.in_(done)))
            return len(done)
