"""Alembic migrations per service schema, each with its own version table.

A service migrates itself at start-up under a PostgreSQL advisory lock, so replicas starting
together apply each migration once. A schema already at the newest revision (every start but the
first after an upgrade) is recognised without Alembic: importing it (with Mako, Pygments and every
SQL dialect's DDL) costs a process about 13 MB it keeps for its whole life.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

if TYPE_CHECKING:
    from collections.abc import Iterator


def _upgrade(connection: Connection, schema: str, script_location: str) -> None:
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", script_location)
    cfg.attributes["connection"] = connection
    cfg.attributes["schema"] = schema
    command.upgrade(cfg, "head")


async def migrate(engine: AsyncEngine, *, schema: str, script_location: Path) -> None:
    """Create ``schema`` if needed and upgrade it to the newest revision."""
    lock_key = f"flowmesh.migrate.{schema}"
    async with engine.connect() as conn:
        if await _at_head(conn, schema, script_location):
            return
        await conn.execute(text("SELECT pg_advisory_lock(hashtext(:k))"), {"k": lock_key})
        try:
            await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
            await conn.commit()
            await conn.run_sync(_upgrade, schema, str(script_location))
            await conn.commit()
        finally:
            await conn.execute(text("SELECT pg_advisory_unlock(hashtext(:k))"), {"k": lock_key})
            await conn.commit()


async def _at_head(conn: AsyncConnection, schema: str, script_location: Path) -> bool:
    """Whether ``schema``'s version table holds exactly the one head revision of ``script_location``.

    Anything else (no table yet, an older revision, several heads, a file this cannot read) is
    left to Alembic.
    """
    head = head_revision(script_location)
    if head is None:
        return False
    table = f'"{schema}".alembic_version'
    if (await conn.execute(text("SELECT to_regclass(:t)"), {"t": table})).scalar_one() is None:
        await conn.commit()
        return False
    versions = (await conn.execute(text(f"SELECT version_num FROM {table}"))).scalars().all()
    await conn.commit()
    return list(versions) == [head]


def head_revision(script_location: Path) -> str | None:
    """The one revision of ``<script_location>/versions`` no other revises; None unless exactly one.

    Read from each file's ``revision`` and ``down_revision`` assignments, as Alembic reads them.
    """
    revisions: set[str] = set()
    revised: set[str] = set()
    for path in sorted((script_location / "versions").glob("*.py")):
        assigned = dict(_assignments(path))
        revision = assigned.get("revision")
        if not isinstance(revision, str):
            return None
        revisions.add(revision)
        down = assigned.get("down_revision")
        if isinstance(down, str):
            revised.add(down)
        elif isinstance(down, tuple | list):
            revised.update(str(d) for d in down)
    heads = revisions - revised
    return next(iter(heads)) if len(heads) == 1 else None


def _assignments(path: Path) -> Iterator[tuple[str, object]]:
    """The module-level ``name = <literal>`` assignments of a Python file."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    try:
                        yield target.id, ast.literal_eval(node.value)
                    except ValueError:
                        continue


def run_env() -> None:
    """The body of every service's ``migrations/env.py``: online migrations on the given connection."""
    from alembic import context

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
