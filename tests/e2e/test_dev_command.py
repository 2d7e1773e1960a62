"""``flowmesh dev`` (what ``make run`` runs): the whole mesh on embedded servers, supervised."""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import psutil
import pytest

from flowmesh.cli.embedded import free_port
from flowmesh.cli.launch import port_is_free

SECRET = "dev-command-secret-" + "x" * 40
FLOWMESH = str(Path(sys.executable).parent / "flowmesh")


def free_port_block(size: int = 5) -> int:
    """A port with the ``size - 1`` after it free too, below the kernel's ephemeral range.

    ``flowmesh dev`` puts the services' health servers on the HTTP port's next four ports; from the
    ephemeral range (``free_port``), one of them could be taken meanwhile by any outgoing
    connection (a pool's, NATS's), and the service then failed to bind it at every restart.
    """
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        port = random.randrange(20_000, low - size)
        if all(port_is_free(p) for p in range(port, port + size)):
            return port
    return free_port()


class Dev:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port_block()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "dev.log"
        env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "DATABASE_URL")}
        env.update(
            {
                "FLOWMESH_DATA_DIR": str(workdir / "data"),
                "FLOWMESH_HTTP_PORT": str(self.port),
                "FLOWMESH_JWT_SECRET": SECRET,
                "NO_COLOR": "1",
            }
        )
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [FLOWMESH, "dev"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 150) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log()[-3000:]
            try:
                if httpx.get(self.base + "/readyz", timeout=2).status_code == 200 and "token" in self.log():
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise TimeoutError(self.log()[-3000:])

    def tree(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def service_pid(self, name: str) -> int:
        for p in self.tree():
            if f"flowmesh.{name}" in " ".join(p.cmdline()):
                return p.pid
        raise LookupError(name)

    def kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[Dev]:
    d = Dev(tmp_path)
    try:
        yield d
    finally:
        survivors = [p for p in d.tree() if p.is_running()] if d.proc.poll() is None else []
        d.kill_group()
        for p in survivors:
            p.kill()
        d.proc.wait(30)  # reaped here, not reported later as a running subprocess against another test


def gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return alive


@pytest.mark.timeout(300)
def test_dev_starts_the_mesh_restarts_a_dead_service_and_stops_cleanly_on_ctrl_c(dev: Dev) -> None:
    dev.wait_ready()
    out = dev.log()
    assert dev.base in out
    token = re.search(r"eyJ[\w-]+\.[\w-]+\.[\w-]+", out)
    assert token, out
    claims = jwt.decode(token.group(0), SECRET, algorithms=["HS256"], audience="flowmesh")
    assert claims["role"] == "admin"
    for name in ("gateway", "flows", "runner", "scheduler", "usage"):
        assert dev.service_pid(name)
    with httpx.Client(
        base_url=dev.base + "/api/v1", headers={"Authorization": f"Bearer {token.group(0)}"}, timeout=10
    ) as api:
        assert api.post("/flows", json={"name": "hello"}).status_code == 201
        old = dev.service_pid("flows")
        os.kill(old, signal.SIGKILL)  # the supervisor brings it back, like a Deployment
        deadline = time.monotonic() + 60
        while api.get("/flows").status_code != 200:
            assert time.monotonic() < deadline, dev.log()[-3000:]
            time.sleep(0.2)
    assert dev.service_pid("flows") != old

    tree = dev.tree()
    os.killpg(dev.proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    assert dev.proc.wait(40) == 0, dev.log()[-3000:]
    assert gone(tree, 10) == [], dev.log()[-3000:]


@pytest.mark.timeout(300)
def test_a_killed_dev_command_leaves_no_process_behind(dev: Dev) -> None:
    dev.wait_ready()
    tree = dev.tree()
    assert len(tree) >= 7  # five services, NATS, PostgreSQL (and its workers)
    dev.proc.kill()  # SIGKILL to the supervisor alone: its children must not outlive it
    dev.proc.wait(10)
    assert gone(tree, 30) == []
