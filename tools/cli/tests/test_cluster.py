"""``flowmesh cluster``: the embedded NATS cluster, ``ClusterShape``, and the command end to end."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import nats.errors
import nats.js.errors
import psutil  # type: ignore[import-untyped]
import pytest
from nats.js.api import StreamConfig
from typer.testing import CliRunner

from flowmesh.cli.cluster import ClusterConfig, ClusterShape, load_or_create_passwords
from flowmesh.cli.embedded import EmbeddedNatsCluster, free_port, nats_meta_leader, start_nats_cluster
from flowmesh.cli.main import app
from flowmesh.cli.tokens import mint_token

FLOWMESH = str(Path(sys.executable).parent / "flowmesh")


def _json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as response:
        body: dict[str, Any] = json.load(response)
        return body


def _wait(condition: Callable[[], object], *, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------------------------------------
# The embedded NATS cluster

USER_PASSWORD = "fm" + secrets.token_hex(8)
AUTH_CONF = """
accounts {
  T {
    jetstream: enabled
    users: [ { user: tester, password: $FM_TEST_PASSWORD } ]
  }
}
"""


@pytest.fixture(scope="module")
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNatsCluster]:
    root = tmp_path_factory.mktemp("nats-cluster")
    with start_nats_cluster(root, auth_conf=AUTH_CONF, env={"FM_TEST_PASSWORD": USER_PASSWORD}) as cluster:
        yield cluster


async def _ignore(_: Exception) -> None:
    pass


async def _assert_anonymous_refused(url: str) -> None:
    """A client without credentials is turned away (the callers show that the URL serves users)."""
    # One attempt, no reconnection: nats-py then raises the server's -ERR as it is (with retries it
    # would say NoServersError, or on a cluster keep retrying the servers the INFO lists).
    client = nats.NATS()
    try:
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await client.connect(url, connect_timeout=2, allow_reconnect=False, error_cb=_ignore)
    finally:
        await client.close()


async def _connect(url: str | list[str]) -> nats.NATS:
    return await nats.connect(
        url,
        user="tester",
        password=USER_PASSWORD,
        connect_timeout=2,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.2,
    )


async def test_a_three_node_cluster_elects_a_meta_leader_and_refuses_anonymous_clients(
    nats_cluster: EmbeddedNatsCluster,
) -> None:
    assert len(nats_cluster.nodes) == 3
    assert nats_cluster.urls == ",".join(node.url for node in nats_cluster.nodes)
    leaders = {nats_meta_leader(node.monitor_port) for node in nats_cluster.nodes}
    assert len(leaders) == 1 and leaders <= {"n1", "n2", "n3"}
    for node in nats_cluster.nodes:
        config = (node.store_dir.parent / f"{node.store_dir.name}.conf").read_text()
        assert "include ./auth.conf" in config
        assert USER_PASSWORD not in config
    await _assert_anonymous_refused(nats_cluster.nodes[0].url)
    client = await _connect(nats_cluster.nodes[1].url)
    await client.close()


async def test_an_r3_stream_stays_writable_when_its_leader_node_dies_and_the_node_rejoins(
    nats_cluster: EmbeddedNatsCluster,
) -> None:
    client = await _connect(nats_cluster.url_list)
    try:
        js = client.jetstream(timeout=5)
        name = f"S{uuid.uuid4().hex[:8]}"
        await js.add_stream(StreamConfig(name=name, subjects=[f"{name}.>"], num_replicas=3))
        assert (await js.publish(f"{name}.a", b"1")).seq == 1
        info = await js.stream_info(name)
        assert info.cluster is not None and info.cluster.leader is not None
        assert len(info.cluster.replicas or []) == 2
        leader = nats_cluster.index_of(info.cluster.leader)

        await asyncio.to_thread(nats_cluster.kill, leader)
        # The client reconnects to another node, the stream elects a new leader among the two left.
        deadline = time.monotonic() + 20
        while True:
            try:
                ack = await js.publish(f"{name}.b", b"2", timeout=1)
                break
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError):
                assert time.monotonic() < deadline, "the stream was not writable again within 20 s"
                await asyncio.sleep(0.1)
        assert ack.seq == 2
        info = await js.stream_info(name)
        assert info.cluster is not None and info.cluster.leader not in (None, nats_cluster.server_name(leader))

        old_pid = nats_cluster.nodes[leader].process.pid
        restarted = await asyncio.to_thread(nats_cluster.restart, leader)
        assert restarted.process.pid != old_pid and restarted.port == nats_cluster.ports[leader].client

        def caught_up(info: object) -> bool:
            replicas = getattr(getattr(info, "cluster", None), "replicas", None) or []
            return any(r.name == nats_cluster.server_name(leader) and r.current for r in replicas)

        deadline = time.monotonic() + 20
        while not caught_up(await js.stream_info(name)):
            assert time.monotonic() < deadline, "the restarted node did not catch up within 20 s"
            await asyncio.sleep(0.1)
        assert (await js.stream_info(name)).state.messages == 2
    finally:
        await client.close()


def test_passwords_are_generated_once_into_a_private_file(tmp_path: Path) -> None:
    path = tmp_path / "cluster" / "nats-passwords.json"
    first = load_or_create_passwords(path, ["gateway", "runner"])
    assert first.keys() == {"gateway", "runner"}
    assert all(re.fullmatch(r"fm[0-9a-f]{48}", p) for p in first.values())
    assert path.stat().st_mode & 0o777 == 0o600
    again = load_or_create_passwords(path, ["runner", "integrator-acme"])
    assert again["runner"] == first["runner"]
    assert json.loads(path.read_text()).keys() == {"gateway", "runner", "integrator-acme"}


def test_cluster_config_reads_the_integrators(tmp_path: Path) -> None:
    config = ClusterConfig.from_env(
        {"FLOWMESH_DATA_DIR": str(tmp_path), "FLOWMESH_CLUSTER_INTEGRATORS": "acme, beta,acme", "NATS_URL": "x"}
    )
    assert (config.integrators, config.cluster_dir, config.http_port) == (("acme", "beta"), tmp_path / "cluster", 8080)
    assert ClusterConfig.from_env({}).integrators == ("dev",)


# --------------------------------------------------------------------------------------------------
# ClusterShape, with stand-in services (the real ones run in the end-to-end test below)

_FAKE = textwrap.dedent(
    """
    import http.server, json, os, sys
    service = sys.argv[1]
    port = int(os.environ["FLOWMESH_HTTP_PORT" if service == "gateway" else f"FLOWMESH_{service.upper()}_HEALTH_PORT"])
    keys = ["NATS_URL", "FLOWMESH_NATS_USER", "FLOWMESH_NATS_PASSWORD", "FLOWMESH_STREAM_REPLICAS", "EXTRA"]
    print("env", json.dumps({k: os.environ.get(k) for k in keys}), flush=True)
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = str(port).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *args):
            pass
    http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
    """
)
_FAKE_COMMANDS = {s: [sys.executable, "-c", _FAKE, s] for s in ("gateway", "flows", "runner", "scheduler", "usage")}


def _env_of(shape: ClusterShape, name: str) -> dict[str, str]:
    line = next(line for line in shape.logs(name).splitlines() if line.startswith("env "))
    env: dict[str, str] = json.loads(line[4:])
    return env


def test_a_shape_runs_two_replicas_of_each_service_behind_its_front(tmp_path: Path) -> None:
    with ClusterShape(
        tmp_path, commands=_FAKE_COMMANDS, database_url="postgresql+asyncpg://unused@127.0.0.1:1/x", env={"EXTRA": "1"}
    ) as shape:
        assert shape.names == [f"{s}-{n}" for s in _FAKE_COMMANDS for n in (1, 2)]
        pids = shape.pids()
        assert all(pid is not None for pid in pids.values())

        envs = {name: _env_of(shape, name) for name in shape.names}
        assert envs["runner-2"]["FLOWMESH_NATS_USER"] == "runner"
        assert envs["runner-2"]["FLOWMESH_NATS_PASSWORD"] == shape.passwords["runner"]
        assert envs["runner-2"]["FLOWMESH_STREAM_REPLICAS"] == "3"
        assert envs["runner-2"]["EXTRA"] == "1"
        assert "integrator-dev" in shape.passwords
        firsts = {env["NATS_URL"].split(",")[0] for env in envs.values()}
        assert firsts == set(shape.nats_urls), "the replicas' first NATS URLs spread over the nodes"
        assert all(sorted(env["NATS_URL"].split(",")) == sorted(shape.nats_urls) for env in envs.values())

        gateway_ports = {url.rsplit(":", 1)[1] for url in shape.gateway_urls}
        with httpx.Client(base_url=shape.base_url, timeout=5, limits=httpx.Limits(max_keepalive_connections=0)) as c:
            assert {c.get("/").text for _ in range(4)} == gateway_ports

        shape.kill("runner-1")
        assert shape.pids()["runner-1"] is None  # no restart: the test decides
        shape.kill("gateway-2", signal.SIGTERM)
        with httpx.Client(base_url=shape.base_url, timeout=5, limits=httpx.Limits(max_keepalive_connections=0)) as c:
            assert all(c.get("/").status_code == 200 for _ in range(4)), "the front skips the stopped gateway"
        shape.start("runner-1")
        shape.start("gateway-2")
        shape.wait_ready(timeout=20)
        assert shape.starts["runner-1"] == 2
        family = [psutil.Process(pid) for pid in shape.pids().values() if pid is not None]
        family += [psutil.Process(node.process.pid) for node in shape.nats.nodes] if shape.nats else []
    _, alive = psutil.wait_procs(family, timeout=10)
    assert alive == []


def test_a_shape_with_restart_brings_a_killed_replica_back(tmp_path: Path) -> None:
    with ClusterShape(
        tmp_path,
        commands={name: _FAKE_COMMANDS[name] for name in ("gateway", "runner")},
        replicas={"runner": 1},
        nats_nodes=1,
        database_url="postgresql+asyncpg://unused@127.0.0.1:1/x",
        restart=True,
    ) as shape:
        assert shape.names == ["gateway-1", "gateway-2", "runner-1"]
        assert _env_of(shape, "runner-1")["FLOWMESH_STREAM_REPLICAS"] == "1"
        old = shape.pids()["runner-1"]
        shape.kill("runner-1")
        _wait(lambda: shape.pids()["runner-1"] not in (None, old), timeout=10, what="runner-1 to be restarted")
        shape.wait_ready(timeout=10)


# --------------------------------------------------------------------------------------------------
# The command

runner = CliRunner()


def test_cluster_help_says_what_runs() -> None:
    result = runner.invoke(app, ["cluster", "--help"])
    assert result.exit_code == 0, result.output
    for words in ("3-node NATS cluster", "two replicas", "FLOWMESH_HTTP_PORT", "FLOWMESH_CLUSTER_INTEGRATORS"):
        assert words in " ".join(result.output.split()), result.output


def test_cluster_refuses_a_busy_port(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {**os.environ, "FLOWMESH_HTTP_PORT": str(port), "FLOWMESH_DATA_DIR": str(tmp_path)}
        result = subprocess.run([FLOWMESH, "cluster"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"port {port} on 127.0.0.1 is in use" in result.stderr


class _Command:
    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.data_dir = tmp_path / "data"
        self.output = tmp_path / "cluster.out"
        env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "DATABASE_URL", "FLOWMESH_JWT_SECRET")}
        env.update({"FLOWMESH_DATA_DIR": str(self.data_dir), "FLOWMESH_HTTP_PORT": str(self.port), "NO_COLOR": "1"})
        with self.output.open("wb") as out:
            self.process = subprocess.Popen(
                [FLOWMESH, "cluster"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # like a terminal's foreground job: a group of its own
            )

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def ready(self) -> bool:
        assert self.process.poll() is None, self.text()[-5000:]
        if "Ctrl-C stops everything" not in self.text():
            return False
        try:
            return httpx.get(self.base + "/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def tree(self) -> list[psutil.Process]:
        return [psutil.Process(self.process.pid), *psutil.Process(self.process.pid).children(recursive=True)]


@pytest.fixture(scope="module")
def command(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Command]:
    started = _Command(tmp_path_factory.mktemp("cluster-command"))
    try:
        _wait(started.ready, timeout=120, what="flowmesh cluster to be ready", interval=0.25)
        yield started
    finally:
        if started.process.poll() is None:
            survivors = started.tree()
            os.killpg(started.process.pid, signal.SIGKILL)
            for proc in survivors:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            started.process.wait(10)


@pytest.mark.timeout(200)
async def test_the_command_runs_a_flow_through_its_front_refuses_anonymous_nats_and_stops_on_ctrl_c(
    command: _Command,
) -> None:
    text = command.text()
    assert f"front        http://127.0.0.1:{command.port}" in text
    gateways = re.findall(r"gateway-\d\s+http://127\.0\.0\.1:(\d+)", text)
    assert len(gateways) == 2
    nats_urls = re.findall(r"NATS n\d\s+(nats://127\.0\.0\.1:\d+)\s+monitor (http://127\.0\.0\.1:\d+)", text)
    assert len(nats_urls) == 3
    assert "PostgreSQL   postgresql+asyncpg://postgres@127.0.0.1:" in text
    integrator = re.search(r"user (integrator-dev) password (\S+)", text)
    assert integrator, text
    # every replica logs under its name; the front being ready says nothing of when the last one
    # (usage, say) writes its first line on a busy machine
    replicas = [f"{name}-{n}" for name in ("gateway", "flows", "runner", "scheduler", "usage") for n in (1, 2)]
    _wait(lambda: all(r in command.text() for r in replicas), timeout=60, what=f"log lines of {replicas}")

    # a one-step flow, created, published and run through the front
    secret = (command.data_dir / "jwt-secret").read_text().strip()
    headers = {"Authorization": "Bearer " + mint_token(secret, sub="alice", tenant=f"t{uuid.uuid4().hex[:8]}")}
    flow = {
        "nodes": [
            {"id": "start", "type": "trigger", "data": {}},
            {"id": "add", "type": "transform", "data": {"output": {"v": "{{ input.v + 1 }}"}}},
        ],
        "edges": [{"id": "e", "source": "start", "target": "add"}],
    }
    async with httpx.AsyncClient(base_url=command.base + "/api/v1", headers=headers, timeout=15) as api:
        created = await api.post("/flows", json={"name": "one step", "definition": flow})
        assert created.status_code == 201, created.text
        flow_id = created.json()["id"]
        assert (await api.post(f"/flows/{flow_id}/publish")).status_code == 201
        started = await api.post(f"/flows/{flow_id}/runs", json={"input": {"v": 41}})
        assert started.status_code == 201, started.text
        run_id = started.json()["id"]
        deadline = time.monotonic() + 30
        while (run := (await api.get(f"/runs/{run_id}")).json())["status"] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline, run
            await asyncio.sleep(0.1)
        assert run["status"] == "succeeded", run
        steps = (await api.get(f"/runs/{run_id}/steps")).json()["items"]
        assert {s["stepId"]: s["output"] for s in steps}["add"] == {"v": 42}

    # NATS: anonymous clients refused, the printed integrator accepted, the streams on 3 nodes
    await _assert_anonymous_refused(nats_urls[0][0])
    client = await nats.connect(
        nats_urls[1][0],
        user=integrator.group(1),
        password=integrator.group(2),
        connect_timeout=2,
        allow_reconnect=False,
    )
    await client.close()
    jsz = await asyncio.to_thread(_json, nats_urls[2][1] + "/jsz?accounts=true&streams=true&config=true")
    streams = [s for account in jsz["account_details"] for s in account.get("stream_detail", [])]
    assert streams, jsz
    assert {s["config"]["num_replicas"] for s in streams} == {3}

    # Ctrl-C: everything it started exits
    tree = command.tree()
    os.killpg(command.process.pid, signal.SIGINT)
    assert await asyncio.to_thread(command.process.wait, 60) == 0, command.text()[-5000:]
    _, alive = await asyncio.to_thread(psutil.wait_procs, tree, 20)
    assert alive == [], [p.pid for p in alive]
    assert command.text().splitlines()[-1].endswith("stopped")
