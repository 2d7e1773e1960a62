"""Alembic migrations per service schema, each with its own version table.

A service migrates itself at start-up. A schema already at the newest revision (every start but the
first after an upgrade) is recognised on the service's own pool, without Alembic. Otherwise the
upgrade runs in a child process (``python -m flowmesh.runtime.migrate``) under a PostgreSQL advisory
lock, so replicas starting together apply each migration once, and the service itself never loads
Alembic and SQLAlchemy (with Mako and every SQL dialect's DDL they cost a process about 35 MB it
would keep for its whole life).
"""

from __future__ import annotations

import ast
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator

    import asyncpg
    from sqlalchemy import Connection

    from flowmesh.runtime.db import Database

log = logging.getLogger(__name__)

URL_ENV = "FLOWMESH_MIGRATE_URL"
"""How the child process gets the database URL (not on its command line, where ``ps`` shows it)."""


class MigrationError(RuntimeError):
    """The schema could not be brought up to date; the message carries the migration's own error."""


async def migrate(db: Database, *, schema: str, script_location: Path) -> None:
    """Create ``schema`` if needed and upgrade it to the newest revision."""
    async with db.reading() as conn:
        if await at_head(conn, schema, script_location):
            return
    log.info("migrating schema %s", schema)
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "flowmesh.runtime.migrate",
        schema,
        str(script_location),
        env={**os.environ, URL_ENV: db.url},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await child.communicate()
    if child.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines()
        raise MigrationError(f"migrating schema {schema} failed: {lines[-1] if lines else f'exit {child.returncode}'}")
    log.info("schema %s is at revision %s", schema, head_revision(script_location))


async def at_head(conn: asyncpg.Connection, schema: str, script_location: Path) -> bool:
    """Whether ``schema``'s version table holds exactly the one head revision of ``script_location``.

    Anything else (no table yet, an older revision, several heads, a file this cannot read) is
    left to Alembic.
    """
    head = head_revision(script_location)
    if head is None:
        return False
    table = f'"{schema}".alembic_version'
    if await conn.fetchval("SELECT to_regclass($1)::text", table) is None:
        return False
    versions = [r[0] for r in await conn.fetch(f"SELECT version_num FROM {table}")]
    return versions == [head]


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


async def upgrade(url: str, *, schema: str, script_location: Path) -> None:
    """Under the schema's advisory lock, create it if needed and let Alembic upgrade it (the child's work)."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    lock_key = f"flowmesh.migrate.{schema}"
    try:
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
    finally:
        await engine.dispose()


def _upgrade(connection: Connection, schema: str, script_location: str) -> None:
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", script_location)
    cfg.attributes["connection"] = connection
    cfg.attributes["schema"] = schema
    command.upgrade(cfg, "head")


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


def _main(argv: list[str]) -> None:
    if len(argv) != 2 or URL_ENV not in os.environ:
        sys.exit(f"usage: {URL_ENV}=<database url> python -m flowmesh.runtime.migrate <schema> <migrations directory>")
    schema, script_location = argv
    try:
        asyncio.run(upgrade(os.environ[URL_ENV], schema=schema, script_location=Path(script_location)))
    except Exception as exc:
        # the database's own words, not the statement and SQLAlchemy's link that wrap them
        cause = getattr(exc, "orig", None) or exc
        lines = str(cause).strip().splitlines()
        sys.exit(f"{type(cause).__name__}: {lines[0] if lines else ''}")


if __name__ == "__main__":
    _main(sys.argv[1:])
