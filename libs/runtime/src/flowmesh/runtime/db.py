"""The async SQLAlchemy engine: one per process, one session per message or request."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, Final, TypeVar

import asyncpg
import orjson
from sqlalchemy import Select, func, select
from sqlalchemy.engine import RowMapping, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine


def create_engine(url: str, *, pool_size: int = 10, application_name: str = "flowmesh") -> AsyncEngine:
    """An asyncpg-backed engine; a dropped connection invalidates the pool, so a restarted server heals."""
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_recycle=1800,
        connect_args={"server_settings": {"application_name": application_name}},
        # jsonb gives numbers back without exponent (1e35 as 36 digits): read them as the services
        # read every message, with orjson, so a number stays a float and never becomes an integer
        # too large to encode again
        json_deserializer=orjson.loads,
    )


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions that keep loaded values after commit (handlers serialise them afterwards)."""
    return async_sessionmaker(engine, expire_on_commit=False)


async def create_driver_pool(
    url: str, *, size: int = 10, application_name: str = "flowmesh", settings: Mapping[str, str] | None = None
) -> asyncpg.Pool:
    """A plain asyncpg pool on the same database, for a service's hottest statements.

    SQLAlchemy's async session costs several times the statement itself on a path run hundreds of
    times a second; the runner's start path uses this pool instead (SQL still only in ``repo``).
    JSONB parameters and results are JSON text here. ``settings``: session settings of every
    connection (planner settings of a service whose statements are all keyed lookups).
    """
    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min(size, 4),
        max_size=size,
        server_settings={"application_name": application_name, **(settings or {})},
        reset=_no_session_reset,
    )
    assert pool is not None
    return pool


class DriverPool:
    """A service's driver pool, opened with the service: ``service.resource(pool.opened)``."""

    def __init__(self, url: str, *, size: int, application_name: str) -> None:
        self._url = url
        self._size = size
        self._name = application_name
        self._pool: asyncpg.Pool | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        """The open pool (from start to stop of the service)."""
        if self._pool is None:
            raise RuntimeError(f"the driver pool of {self._name} is not open")
        return self._pool

    @contextlib.asynccontextmanager
    async def opened(self) -> AsyncIterator[asyncpg.Pool]:
        """Open the pool for the life of the block."""
        self._pool = await create_driver_pool(self._url, size=self._size, application_name=self._name)
        try:
            yield self._pool
        finally:
            pool, self._pool = self._pool, None
            await pool.close()


async def _no_session_reset(conn: asyncpg.Connection) -> None:
    """Nothing to reset: these pools create no session state (asyncpg still rolls back an open
    transaction before this). Its default (unlock, close cursors, unlisten, reset settings) would
    be a round trip on every release."""


@contextlib.asynccontextmanager
async def snapshot(sessions: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """A read-only session whose statements all see one snapshot of the database (REPEATABLE READ).

    Under READ COMMITTED each statement sees the rows committed before it began: a page read in
    one statement and its total in another can disagree when a write lands between them.
    """
    async with sessions() as session:
        await session.connection(execution_options={"isolation_level": "REPEATABLE READ", "postgresql_readonly": True})
        yield session


@contextlib.asynccontextmanager
async def reading(sessions: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """A session for reads that are each one statement (a statement sees one snapshot of its own).

    Autocommit: no ``BEGIN`` before the statement and no ``ROLLBACK`` when the session closes, two
    round trips a read saves (a quarter of a read's cost in the services' profiles).
    """
    async with sessions() as session:
        await session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
        yield session


_Row = TypeVar("_Row", RowMapping, asyncpg.Record)

PAGE_TOTAL = "page_total_"
"""The label of the window count :func:`read_page` adds to the page's columns."""


async def read_page(
    session: AsyncSession, items: Select[Any], *, offset: int, limit: int
) -> tuple[Sequence[RowMapping], int]:
    """One page of ``items`` (a select with its ORDER BY) and how many rows match, as of one instant.

    The page and the count are one statement (a window count is taken before OFFSET/LIMIT), so a
    :func:`reading` session is enough. A page past the end has no row to carry the count: it is
    counted apart, and the empty page agrees with that count only if the count leaves nothing at
    ``offset`` either; rows added between the two statements make it read the page again.
    The rows carry the count under :data:`PAGE_TOTAL` too; callers ignore it.
    """
    counted = items.add_columns(func.count().over().label(PAGE_TOTAL)).offset(offset).limit(limit)
    matching = select(func.count()).select_from(items.order_by(None).subquery())

    async def page() -> Sequence[RowMapping]:
        return (await session.execute(counted)).mappings().all()

    async def count() -> int:
        return int((await session.execute(matching)).scalar_one())

    return await _consistent_page(page, count, offset=offset)


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
    """:func:`read_page` on a driver connection (or pool), for a service's busiest lists.

    ``SELECT {columns} FROM {source} ORDER BY {order_by}``, where ``source`` (a FROM with its
    WHERE) refers to ``args`` as ``$1`` … (the caller's repo module writes the SQL; values only
    ever travel as parameters). Each statement runs on its own: it sees one snapshot of its own.
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
    page: Callable[[], Awaitable[Sequence[_Row]]], count: Callable[[], Awaitable[int]], *, offset: int
) -> tuple[Sequence[_Row], int]:
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
