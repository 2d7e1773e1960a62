"""The ``flowmesh`` command: help, tokens, and ``flowmesh dev`` as a real process tree."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jwt
import psutil  # type: ignore[import-untyped]
import pytest
from typer.testing import CliRunner

from flowmesh.cli.embedded import free_port
from flowmesh.cli.main import DEV_HEALTH_PORT_OFFSETS, SERVICES, DevConfig, app, dev_health_ports, dev_processes
from flowmesh.cli.tokens import load_or_create_jwt_secret, mint_token

SECRET = "test-secret-" + "0123456789abcdef" * 3

runner = CliRunner()


def _decode(
    token: str, secret: str = SECRET, *, issuer: str = "flowmesh", audience: str = "flowmesh"
) -> dict[str, object]:
    claims: dict[str, object] = jwt.decode(
        token, secret, algorithms=["HS256"], issuer=issuer, audience=audience, options={"require": ["exp"]}
    )
    return claims


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No Flowmesh settings from the outer environment; a fresh data dir."""
    for name in ("FLOWMESH_JWT_SECRET", "FLOWMESH_JWT_ISSUER", "FLOWMESH_JWT_AUDIENCE", "NATS_URL", "DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    data_dir = tmp_path / "data"
    monkeypatch.setenv("FLOWMESH_DATA_DIR", str(data_dir))
    return data_dir


@pytest.mark.parametrize("args", [["--help"], ["dev", "--help"], ["token", "--help"]])
def test_every_command_has_help(args: list[str]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_token_carries_the_requested_claims_and_verifies(clean_env: Path) -> None:
    result = runner.invoke(
        app, ["token", "--sub", "alice", "--tenant", "acme", "--role", "admin", "--ttl", "600", "--secret", SECRET]
    )
    assert result.exit_code == 0, result.output
    claims = _decode(result.stdout.strip())
    assert {k: claims[k] for k in ("sub", "tenant", "role", "iss", "aud")} == {
        "sub": "alice",
        "tenant": "acme",
        "role": "admin",
        "iss": "flowmesh",
        "aud": "flowmesh",
    }
    assert claims["exp"] == claims["iat"] + 600  # type: ignore[operator]
    assert abs(claims["iat"] - time.time()) < 60  # type: ignore[operator]


def test_token_defaults_tenant_to_sub_and_role_to_member(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWMESH_JWT_SECRET", SECRET)
    monkeypatch.setenv("FLOWMESH_JWT_ISSUER", "https://id.example")
    monkeypatch.setenv("FLOWMESH_JWT_AUDIENCE", "fm-api")
    result = runner.invoke(app, ["token", "--sub", "bob"])
    assert result.exit_code == 0, result.output
    claims = _decode(result.stdout.strip(), issuer="https://id.example", audience="fm-api")
    assert (claims["sub"], claims["tenant"], claims["role"]) == ("bob", "bob", "member")


def test_token_uses_the_data_dir_secret_created_once_with_mode_0600(clean_env: Path) -> None:
    secret = load_or_create_jwt_secret(clean_env)
    assert load_or_create_jwt_secret(clean_env) == secret
    assert stat.S_IMODE((clean_env / "jwt-secret").stat().st_mode) == 0o600
    assert len(secret) >= 64
    result = runner.invoke(app, ["token", "--sub", "carol"])
    assert result.exit_code == 0, result.output
    assert _decode(result.stdout.strip(), secret)["sub"] == "carol"


def test_token_without_any_secret_says_what_to_do(clean_env: Path) -> None:
    result = runner.invoke(app, ["token"])
    assert result.exit_code == 2
    assert "FLOWMESH_JWT_SECRET" in result.output
    assert "flowmesh dev" in result.output


def test_token_rejects_an_unknown_role(clean_env: Path) -> None:
    result = runner.invoke(app, ["token", "--role", "root", "--secret", SECRET])
    assert result.exit_code != 0


def test_console_script_prints_a_verifiable_token(clean_env: Path) -> None:
    script = Path(sys.executable).parent / "flowmesh"
    env = {**os.environ, "FLOWMESH_JWT_SECRET": SECRET}
    result = subprocess.run(
        [str(script), "token", "--sub", "dave"], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    assert _decode(result.stdout.strip())["sub"] == "dave"


def test_mint_token_round_trips() -> None:
    token = mint_token(SECRET, sub="erin", role="admin", ttl=5, issuer="i", audience="a", now=int(time.time()))
    claims = _decode(token, issuer="i", audience="a")
    assert (claims["tenant"], claims["role"], claims["exp"] - claims["iat"]) == ("erin", "admin", 5)  # type: ignore[operator]


def test_dev_config_reads_the_environment(tmp_path: Path) -> None:
    config = DevConfig.from_env(
        {
            "FLOWMESH_DATA_DIR": str(tmp_path / "d"),
            "NATS_URL": "nats://n:4222",
            "FLOWMESH_HTTP_PORT": "9090",
            "FLOWMESH_NATS_SYNC_ALWAYS": "true",
        }
    )
    assert config == DevConfig(data_dir=tmp_path / "d", nats_url="nats://n:4222", http_port=9090, nats_sync_always=True)
    assert DevConfig.from_env({}).data_dir == Path(".flowmesh").resolve()
    with pytest.raises(ValueError, match="FLOWMESH_HTTP_PORT"):
        DevConfig.from_env({"FLOWMESH_HTTP_PORT": "http"})


def test_dev_starts_a_runner_per_cpu_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert DevConfig.from_env({}).runners == 2
    monkeypatch.setattr(os, "cpu_count", lambda: 32)
    assert DevConfig.from_env({}).runners == 4  # beyond four, the cores are PostgreSQL's and NATS's
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert DevConfig.from_env({}).runners == 1
    assert DevConfig.from_env({"FLOWMESH_DEV_RUNNERS": "3"}).runners == 3
    for bad in ("0", "-1", "two", "17", "1.5"):
        with pytest.raises(ValueError, match="FLOWMESH_DEV_RUNNERS must be a number of runner processes from 1"):
            DevConfig.from_env({"FLOWMESH_DEV_RUNNERS": bad})
    processes = dev_processes({"gateway": ["g"], "runner": ["r"]}, runners=3)
    assert processes == {
        "gateway": ("gateway", ["g"]),
        "runner": ("runner", ["r"]),
        "runner-2": ("runner", ["r"]),
        "runner-3": ("runner", ["r"]),
    }


# --------------------------------------------------------------------------------------------------
# flowmesh dev, with stand-in services (the real ones are tested end to end in tests/)

_FAKE_GATEWAY = textwrap.dedent(
    """
    import http.server, os
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/readyz" else 404)
            self.end_headers()
        def log_message(self, *args):
            pass
    print("env", os.environ["FLOWMESH_ENV"], os.environ["FLOWMESH_HTTP_HOST"], flush=True)
    server = http.server.HTTPServer(("127.0.0.1", int(os.environ["FLOWMESH_HTTP_PORT"])), Handler)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    """
)
_FAKE_SERVICE = textwrap.dedent(
    """
    import os, signal, sys, time
    name = sys.argv[1]
    keys = ["NATS_URL", "DATABASE_URL", "FLOWMESH_DATA_DIR", "FLOWMESH_JWT_SECRET", "FLOWMESH_LOG_FORMAT",
            f"FLOWMESH_{name.upper()}_HEALTH_PORT"]
    print("env " + " ".join(f"{k}={os.environ.get(k)}" for k in keys), flush=True)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a slow service: only SIGTERM stops it
    while True:
        time.sleep(1)
    """
)
_DRIVER = textwrap.dedent(
    """
    import asyncio, json, sys
    from flowmesh.cli.main import DevConfig, run_dev
    sys.exit(asyncio.run(run_dev(DevConfig.from_env(), commands=json.loads(sys.argv[1]))))
    """
)


class _Dev:
    def __init__(self, process: subprocess.Popen[bytes], output: Path, data_dir: Path, port: int) -> None:
        self.process = process
        self.output = output
        self.data_dir = data_dir
        self.port = port

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def tree(self) -> list[psutil.Process]:
        return [psutil.Process(self.process.pid), *psutil.Process(self.process.pid).children(recursive=True)]


@pytest.fixture
def dev_stack(tmp_path: Path, wait_until: Callable[..., None]) -> Iterator[_Dev]:
    """``run_dev`` in its own process group, embedded servers included, with stand-in services."""
    data_dir = tmp_path / "data"
    port = free_port()
    commands = {"gateway": [sys.executable, "-c", _FAKE_GATEWAY]} | {
        name: [sys.executable, "-c", _FAKE_SERVICE, name] for name in ("flows", "runner", "scheduler", "usage")
    }
    env = {
        **os.environ,
        "FLOWMESH_DATA_DIR": str(data_dir),
        "FLOWMESH_HTTP_PORT": str(port),
        "FLOWMESH_DEV_RUNNERS": "3",
        "NO_COLOR": "1",
    }
    for name in ("NATS_URL", "DATABASE_URL", "FLOWMESH_JWT_SECRET"):
        env.pop(name, None)
    output = tmp_path / "dev.out"
    with output.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", _DRIVER, json.dumps(commands)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # like a terminal's foreground job: a group of its own
        )
    dev = _Dev(process, output, data_dir, port)
    try:
        wait_until(lambda: "Ctrl-C stops everything" in dev.text() or process.poll() is not None, timeout=60)
        assert process.poll() is None, dev.text()
        yield dev
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(40)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_dev_starts_everything_and_a_ctrl_c_to_the_group_stops_it_all(
    dev_stack: _Dev, assert_gone: Callable[..., None], wait_until: Callable[..., None]
) -> None:
    # the banner comes once the gateway is ready; a busy machine may not have run every process's
    # first line by then
    runners = ("runner    | env ", "runner-2  | env ", "runner-3  | env ")
    wait_until(lambda: all(r in dev_stack.text() for r in runners), timeout=60, what="every runner's first line")
    text = dev_stack.text()
    assert f"gateway     http://127.0.0.1:{dev_stack.port}" in text
    assert "NATS        nats://127.0.0.1:" in text
    assert "PostgreSQL  postgresql+asyncpg://postgres@127.0.0.1:" in text
    token = text.split("role admin, 24 h):")[1].split()[2]
    secret = (dev_stack.data_dir / "jwt-secret").read_text().strip()
    claims = jwt.decode(token, secret, algorithms=["HS256"], audience="flowmesh", issuer="flowmesh")
    assert (claims["sub"], claims["tenant"], claims["role"]) == ("dev", "dev", "admin")
    assert claims["exp"] - claims["iat"] == 24 * 3600
    assert "gateway   | env dev 127.0.0.1" in text
    runner_env = next(line for line in text.splitlines() if line.startswith("runner    | env "))
    assert "NATS_URL=nats://127.0.0.1:" in runner_env
    assert "DATABASE_URL=postgresql+asyncpg://postgres@127.0.0.1:" in runner_env
    assert f"FLOWMESH_DATA_DIR={dev_stack.data_dir}" in runner_env
    assert f"FLOWMESH_JWT_SECRET={secret}" in runner_env
    assert "FLOWMESH_LOG_FORMAT=text" in runner_env
    assert "FLOWMESH_RUNNER_HEALTH_PORT=None" not in runner_env
    # three runner processes (FLOWMESH_DEV_RUNNERS), each with a health port of its own
    runner_lines = [line for line in text.splitlines() if line.split("|")[0].strip().startswith("runner")]
    runner_ports = {
        line.split("|")[0].strip(): line.split("FLOWMESH_RUNNER_HEALTH_PORT=")[1].split()[0]
        for line in runner_lines
        if " env " in line
    }
    assert sorted(runner_ports) == ["runner", "runner-2", "runner-3"], runner_lines
    assert len(set(runner_ports.values())) == 3 and "None" not in runner_ports.values()

    tree = dev_stack.tree()
    names = " ".join(" ".join(proc.cmdline()) for proc in tree)
    assert "nats-server" in names
    assert "postgres" in names
    os.killpg(dev_stack.process.pid, signal.SIGINT)
    assert dev_stack.process.wait(40) == 0, dev_stack.text()
    assert_gone(tree, timeout=20)
    assert "stopped" in dev_stack.text().splitlines()[-1]


def test_dev_restarts_a_killed_service_and_stops_on_sigterm(
    dev_stack: _Dev, wait_until: Callable[..., None], assert_gone: Callable[..., None]
) -> None:
    def runner_pids() -> list[int]:
        pids = []
        for proc in psutil.Process(dev_stack.process.pid).children():
            try:
                if proc.cmdline()[-1:] == ["runner"]:
                    pids.append(proc.pid)
            except psutil.Error:
                pass  # a process that just exited
        return pids

    before = runner_pids()
    assert len(before) == 3  # FLOWMESH_DEV_RUNNERS
    first = before[0]
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: first not in (now := runner_pids()) and len(now) == 3, what="a new runner")
    assert [line for line in dev_stack.text().splitlines() if "exited with signal SIGKILL" in line]

    tree = dev_stack.tree()
    dev_stack.process.send_signal(signal.SIGTERM)
    assert dev_stack.process.wait(40) == 0, dev_stack.text()
    assert_gone(tree, timeout=20)


def test_dev_refuses_a_busy_http_port(tmp_path: Path, clean_env: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {**os.environ, "FLOWMESH_HTTP_PORT": str(port)}
        result = subprocess.run(
            [str(Path(sys.executable).parent / "flowmesh"), "dev"], env=env, capture_output=True, text=True, timeout=60
        )
    assert result.returncode == 1
    assert f"port {port}" in result.stderr


def test_dev_health_ports_follow_the_http_port_and_step_aside_when_taken() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        http_port = taken.getsockname()[1] - DEV_HEALTH_PORT_OFFSETS["runner"]
        ports = dev_health_ports(http_port, SERVICES)
    assert "gateway" not in ports and set(ports) == set(DEV_HEALTH_PORT_OFFSETS)
    assert ports["runner"] != http_port + DEV_HEALTH_PORT_OFFSETS["runner"]
