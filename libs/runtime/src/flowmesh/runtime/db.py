"""The async SQLAlchemy engine: one per process, one session per message or request."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine


def create_engine(url: str, *, pool_size: int = 10, application_name: str = "flowmesh") -> AsyncEngine:
    """An asyncpg-backed engine; a dropped connection invalidates the pool, so a restarted server heals."""
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_recycle=1800,
        connect_args={"server_settings": {"application_name": application_name}},
    )


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions that keep loaded values after commit (handlers serialise them afterwards)."""
    return async_sessionmaker(engine, expire_on_commit=False)
