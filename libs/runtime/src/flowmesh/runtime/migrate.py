"""Alembic migrations per service schema, each with its own version table.

A service migrates itself at start-up under a PostgreSQL advisory lock, so replicas starting
together apply each migration once.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command, context
from alembic.config import Config
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncEngine


def _upgrade(connection: Connection, schema: str, script_location: str) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", script_location)
    cfg.attributes["connection"] = connection
    cfg.attributes["schema"] = schema
    command.upgrade(cfg, "head")


async def migrate(engine: AsyncEngine, *, schema: str, script_location: Path) -> None:
    """Create ``schema`` if needed and upgrade it to the newest revision."""
    lock_key = f"flowmesh.migrate.{schema}"
    async with engine.connect() as conn:
        await conn.execute(text("SELECT pg_advisory_lock(hashtext(:k))"), {"k": lock_key})
        try:
            await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
            await conn.commit()
            await conn.run_sync(_upgrade, schema, str(script_location))
            await conn.commit()
        finally:
            await conn.execute(text("SELECT pg_advisory_unlock(hashtext(:k))"), {"k": lock_key})
            await conn.commit()


def run_env() -> None:
    """The body of every service's ``migrations/env.py``: online migrations on the given connection."""
    connection = context.config.attributes["connection"]
    schema = context.config.attributes["schema"]
    context.configure(
        connection=connection,
        version_table="alembic_version",
        version_table_schema=schema,
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()
