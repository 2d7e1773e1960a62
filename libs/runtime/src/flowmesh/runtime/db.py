"""A service's database: one asyncpg pool per process, one connection per message or request.

Repos (the only modules with SQL) take an ``asyncpg.Connection`` and write plain SQL with ``$n``
parameters; values only ever travel as parameters. A service's own pool (:class:`Database`) reads
and writes JSONB as Python values (orjson) and UUIDs as strings, the way the contracts carry them.
A driver pool without those codecs (:func:`create_driver_pool`) passes JSON as text, for a path
that already holds the text (the runner's start path).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, Final

import asyncpg
import orjson

Connection = asyncpg.Connection
"""What a repo function takes: a connection, in a transaction or not as its caller chose."""


async def create_driver_pool(
    url: str,
    *,
    size: int = 10,
    application_name: str = "flowmesh",
    settings: Mapping[str, str] | None = None,
    codecs: bool = False,
) -> asyncpg.Pool:
    """An asyncpg pool of up to ``size`` connections, kept open (no connection per statement).

    ``settings``: session settings of every connection (planner settings of a service whose
    statements are all keyed lookups). ``codecs``: JSONB/JSON as Python values and UUIDs as
    strings; without, JSON travels as text and UUIDs as :class:`uuid.UUID`.
    """
    pool = await asyncpg.create_pool(
        dsn(url),
        min_size=min(size, 4),
        max_size=size,
        server_settings={"application_name": application_name, **(settings or {})},
        reset=_no_session_reset,
        init=_set_codecs if codecs else None,
    )
    assert pool is not None
    return pool


def dsn(url: str) -> str:
    """A libpq-style URL asyncpg accepts, from an SQLAlchemy-style one (``postgresql+asyncpg://``)."""
    return re.sub(r"^postgres(?:ql)?\+\w+://", "postgresql://", url)


def dumps(value: Any) -> str:
    """A value as JSON text for a JSONB parameter (orjson; the standard library for what it refuses,
    such as integers past 64 bits)."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return json.dumps(value, separators=(",", ":"))


async def _set_codecs(conn: asyncpg.Connection) -> None:
    # jsonb gives numbers back without exponent (1e35 as 36 digits): read them as the services read
    # every message, with orjson, so a number stays a float and never becomes an integer too large
    # to encode again
    for kind in ("jsonb", "json"):
        await conn.set_type_codec(kind, schema="pg_catalog", encoder=dumps, decoder=orjson.loads, format="text")
    await conn.set_type_codec("uuid", schema="pg_catalog", encoder=str, decoder=str, format="text")


class Database:
    """A service's pool, opened with the service (``async with db.opened(): ...``).

    :meth:`transaction`, :meth:`reading` and :meth:`snapshot` lend one connection for a unit of work.
    """

    def __init__(self, url: str, *, size: int, application_name: str) -> None:
        self.url = url
        self._size = size
        self._name = application_name
        self._pool: asyncpg.Pool | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        """The open pool (from start to stop of the service)."""
        if self._pool is None:
            raise RuntimeError(f"the database pool of {self._name} is not open")
        return self._pool

    async def open(self) -> None:
        """Open the pool (its first connections); a second call does nothing."""
        if self._pool is None:
            self._pool = await create_driver_pool(self.url, size=self._size, application_name=self._name, codecs=True)

    async def close(self) -> None:
        """Close every connection (waiting for those lent out to come back)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    @contextlib.asynccontextmanager
    async def opened(self) -> AsyncIterator[asyncpg.Pool]:
        """Open the pool for the life of the block."""
        await self.open()
        try:
            yield self.pool
        finally:
            await self.close()

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection in a transaction (READ COMMITTED): committed when the block ends, rolled back
        if it raises."""
        async with self.pool.acquire() as conn, conn.transaction():
            yield conn

    @contextlib.asynccontextmanager
    async def reading(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection for reads that are each one statement (a statement sees one snapshot of its own).

        No transaction: no ``BEGIN`` before the statement and no ``ROLLBACK`` after, two round trips a
        read saves.
        """
        async with self.pool.acquire() as conn:
            yield conn

    @contextlib.asynccontextmanager
    async def snapshot(self) -> AsyncIterator[asyncpg.Connection]:
        """A read-only connection whose statements all see one snapshot of the database (REPEATABLE READ).

        Under READ COMMITTED each statement sees the rows committed before it began: a page read in
        one statement and its total in another can disagree when a write lands between them.
        """
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            yield conn

    async def ping(self) -> None:
        """One round trip on a pooled connection (readiness)."""
        async with self.pool.acquire() as conn:
            await conn.fetchval("SELECT 1")


class Params:
    """The parameters of a statement whose conditions are chosen at run time: ``p(value)`` adds a value
    and answers its placeholder (``$1``, ``$2`` …); ``p.values`` go with the statement.

    ``where.append(f"tenant_id = {p(tenant)}")``: the SQL stays in the repo, values only travel apart.
    """

    def __init__(self, *values: Any) -> None:
        self.values: list[Any] = list(values)

    def __call__(self, value: Any) -> str:
        self.values.append(value)
        return f"${len(self.values)}"


def where(conditions: Sequence[str]) -> str:
    """``WHERE a AND b …`` of the conditions, or nothing when there are none."""
    return f"WHERE {' AND '.join(conditions)}" if conditions else ""


async def _no_session_reset(conn: asyncpg.Connection) -> None:
    """Nothing to reset: these pools create no session state (asyncpg still rolls back an open
    transaction before this). Its default (unlock, close cursors, unlisten, reset settings) would
    be a round trip on every release."""


PAGE_TOTAL = "page_total_"
"""The label of the window count :func:`read_page_on` adds to the page's columns."""


async def read_page_on(
    conn: asyncpg.Connection | asyncpg.Pool,
    *,
    columns: str,
    source: str,
    order_by: str,
    args: Sequence[Any],
    offset: int,
    limit: int,
) -> tuple[Sequence[asyncpg.Record], int]:
    """One page of ``SELECT {columns} FROM {source} ORDER BY {order_by}`` and how many rows match.

    ``source`` (a FROM with its WHERE) refers to ``args`` as ``$1`` … (the caller's repo module
    writes the SQL; values only ever travel as parameters). The page and the count are one statement
    (a window count is taken before OFFSET/LIMIT). A page past the end has no row to carry the count:
    it is counted apart, and the empty page agrees with that count only if the count leaves nothing at
    ``offset`` either; rows added between the two statements make it read the page again. The rows
    carry the count under :data:`PAGE_TOTAL` too; callers ignore it.
    """
    n = len(args)
    counted = (
        f"SELECT {columns}, count(*) OVER () AS {PAGE_TOTAL} FROM {source} "
        f"ORDER BY {order_by} OFFSET ${n + 1} LIMIT ${n + 2}"
    )
    matching = f"SELECT count(*) FROM {source}"

    async def page() -> Sequence[asyncpg.Record]:
        rows: list[asyncpg.Record] = await conn.fetch(counted, *args, offset, limit)
        return rows

    async def count() -> int:
        return int(await conn.fetchval(matching, *args))

    return await _consistent_page(page, count, offset=offset)


async def _consistent_page(
    page: Callable[[], Awaitable[Sequence[asyncpg.Record]]], count: Callable[[], Awaitable[int]], *, offset: int
) -> tuple[Sequence[asyncpg.Record], int]:
    """A page whose rows carry their total (:data:`PAGE_TOTAL`) and that total; a page past the end
    is counted apart, read again while the count says rows reached ``offset`` meanwhile."""
    total = 0
    for _ in range(_PAGE_READS):
        rows = await page()
        if rows:
            return rows, int(rows[0][PAGE_TOTAL])
        if not offset:
            return rows, 0
        total = await count()
        if total <= offset:  # as of the count, the page is empty too
            return rows, total
    return [], total  # rows kept coming and going across ``offset`` for every read: the last count


_PAGE_READS: Final = 5
"""Reads of a page past the end before its last count is taken as it is."""
