"""Embedded NATS and PostgreSQL: real servers, started and stopped by PID."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import asyncpg
import nats
import psutil  # type: ignore[import-untyped]
import pytest

from flowmesh.cli.embedded import (
    EmbeddedPostgres,
    EmbeddedServerError,
    free_port,
    start_nats,
    start_postgres,
)


def _restricted_dir(tmp_path: Path) -> Path:
    """A directory below a 0700 parent, as a fresh temp dir often is."""
    locked = tmp_path / f"locked-{uuid.uuid4().hex[:8]}"
    locked.mkdir(mode=0o700)
    return locked / "data"


def test_free_port_can_be_bound() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


async def test_nats_runs_jetstream_and_stops_without_leftover_process(
    tmp_path: Path, assert_gone: Callable[..., None]
) -> None:
    server = await asyncio.to_thread(start_nats, tmp_path / "nats")
    proc = psutil.Process(server.process.pid)
    try:
        assert server.url == f"nats://127.0.0.1:{server.port}"
        client = await nats.connect(server.url)
        try:
            js = client.jetstream()
            stream = f"S{uuid.uuid4().hex[:8]}"
            await js.add_stream(name=stream, subjects=[f"{stream}.>"])
            ack = await js.publish(f"{stream}.hello", b"world")
            assert (ack.stream, ack.seq) == (stream, 1)
            info = await js.stream_info(stream)
            assert info.state.messages == 1
        finally:
            await client.close()
    finally:
        server.stop()
    assert server.process.returncode is not None
    assert_gone([proc])
    assert (tmp_path / "nats.log").read_text().strip(), "the server logs to a file next to its store"


def test_nats_sync_always_is_applied(tmp_path: Path) -> None:
    with (
        start_nats(tmp_path / "nats", sync_always=True) as server,
        urllib.request.urlopen(f"http://127.0.0.1:{server.monitor_port}/varz", timeout=5) as response,
    ):
        varz = json.load(response)
    assert varz["jetstream"]["config"]["sync_always"] is True


def test_nats_refuses_a_second_server_on_the_same_store_dir(tmp_path: Path) -> None:
    with start_nats(tmp_path / "nats") as server:
        with pytest.raises(EmbeddedServerError, match=f"pid {server.process.pid}"):
            start_nats(tmp_path / "nats")
        assert server.running


def test_nats_startup_failure_reports_the_log_tail(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(EmbeddedServerError, match="address already in use"):
            start_nats(tmp_path / "nats", port=port)


async def _insert_and_count(pg: EmbeddedPostgres, value: int) -> int:
    conn = await asyncpg.connect(pg.dsn)
    try:
        assert await conn.fetchval("select 1") == 1
        await conn.execute("create table if not exists t (v int)")
        await conn.execute("insert into t values ($1)", value)
        count: int = await conn.fetchval("select count(*) from t")
        return count
    finally:
        await conn.close()


def _postgres_family(pg: EmbeddedPostgres) -> list[psutil.Process]:
    main = psutil.Process(pg.process.pid)
    return [main, *main.children(recursive=True)]


async def test_postgres_serves_queries_and_restarts_on_its_data_dir_after_stop_and_sigkill(
    tmp_path: Path, assert_gone: Callable[..., None]
) -> None:
    data_dir = _restricted_dir(tmp_path)

    pg = await asyncio.to_thread(start_postgres, data_dir)
    try:
        assert pg.url == f"postgresql+asyncpg://postgres@127.0.0.1:{pg.port}/postgres"
        assert await _insert_and_count(pg, 1) == 1
    finally:
        family = _postgres_family(pg)
        await asyncio.to_thread(pg.stop)
    assert_gone(family)

    pg = await asyncio.to_thread(start_postgres, data_dir)
    try:
        assert await _insert_and_count(pg, 2) == 2
        family = _postgres_family(pg)
        # A crash: the postmaster dies without cleaning up, postmaster.pid stays behind.
        os.kill(pg.process.pid, signal.SIGKILL)
        await asyncio.to_thread(pg.process.wait)
        assert (data_dir / "postmaster.pid").exists()
    finally:
        await asyncio.to_thread(pg.stop)
    assert_gone(family)

    pg = await asyncio.to_thread(start_postgres, data_dir)
    try:
        assert await _insert_and_count(pg, 3) == 3
    finally:
        family = _postgres_family(pg)
        await asyncio.to_thread(pg.stop)
    assert_gone(family)
    assert (data_dir.parent / "data.log").read_text().strip(), "the server logs beside its data dir"


async def test_postgres_starts_when_the_stale_pid_file_names_an_unrelated_live_process(
    tmp_path: Path, assert_gone: Callable[..., None]
) -> None:
    data_dir = _restricted_dir(tmp_path)
    pg = await asyncio.to_thread(start_postgres, data_dir)
    family = _postgres_family(pg)
    os.kill(pg.process.pid, signal.SIGKILL)
    await asyncio.to_thread(pg.stop)
    assert_gone(family)
    # The crashed server's PID now belongs to someone else (PIDs are reused fast in containers).
    sleeper = await asyncio.create_subprocess_exec(sys.executable, "-c", "import time; time.sleep(60)")
    try:
        pid_file = data_dir / "postmaster.pid"
        lines = pid_file.read_text().splitlines()
        pid_file.write_text("\n".join([str(sleeper.pid), *lines[1:]]) + "\n")

        pg = await asyncio.to_thread(start_postgres, data_dir)
        try:
            assert await _insert_and_count(pg, 1) == 1
        finally:
            family = _postgres_family(pg)
            await asyncio.to_thread(pg.stop)
        assert_gone(family)
        assert sleeper.returncode is None, "the unrelated process is left alone"
    finally:
        sleeper.kill()
        await sleeper.wait()


async def test_postgres_refuses_a_second_server_on_the_same_data_dir(tmp_path: Path) -> None:
    data_dir = _restricted_dir(tmp_path)
    pg = await asyncio.to_thread(start_postgres, data_dir)
    try:
        with pytest.raises(EmbeddedServerError, match="already running"):
            await asyncio.to_thread(start_postgres, data_dir)
        assert await _insert_and_count(pg, 1) == 1
    finally:
        await asyncio.to_thread(pg.stop)
