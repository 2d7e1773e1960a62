"""The services as real processes (``python -m flowmesh.<name>``) on the test NATS and PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jwt

from flowmesh.cli.embedded import free_port

SERVICES = ("gateway", "flows", "runner", "scheduler", "usage")
SECRET = "e2e-secret-" + "0123456789abcdef" * 4


def token(
    sub: str = "alice",
    *,
    tenant: str | None = None,
    role: str = "member",
    secret: str = SECRET,
    exp_in: int = 3600,
    iss: str = "flowmesh",
    aud: str = "flowmesh",
    alg: str = "HS256",
    headers: dict[str, str] | None = None,
    **extra: object,
) -> str:
    """A signed JWT as an identity provider would issue it."""
    now = int(time.time())
    claims = {
        "sub": sub,
        "tenant": tenant or sub,
        "role": role,
        "iss": iss,
        "aud": aud,
        "iat": now,
        "exp": now + exp_in,
        **extra,
    }
    return jwt.encode(claims, secret, algorithm=alg, headers=headers)


class ProcessStack:
    """Starts, kills and restarts service processes; stops only its own, by PID."""

    def __init__(
        self,
        nats_url: str,
        database_url: str,
        workdir: Path,
        *,
        env: dict[str, str] | None = None,
        services: tuple[str, ...] = SERVICES,
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.services = services
        self.env = {
            **os.environ,
            "FLOWMESH_ENV": "dev",
            "NATS_URL": nats_url,
            "DATABASE_URL": database_url,
            "FLOWMESH_DATA_DIR": str(workdir / "data"),
            "FLOWMESH_JWT_SECRET": SECRET,
            "FLOWMESH_HTTP_HOST": "127.0.0.1",
            "FLOWMESH_HTTP_PORT": str(self.port),
            "FLOWMESH_LOG_FORMAT": "json",
            **{f"FLOWMESH_{s.upper()}_HEALTH_PORT": "0" for s in SERVICES if s != "gateway"},
            **(env or {}),
        }
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str) -> None:
        log = (self.workdir / f"{name}.log").open("ab")
        try:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", f"flowmesh.{name}"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        finally:
            log.close()

    def start_all(self) -> None:
        for name in self.services:
            self.start(name)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(sig)
        proc.wait(15)

    def stop_all(self) -> None:
        for name in list(self.procs):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in list(self.procs.items()):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            del self.procs[name]

    def logs(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.logs(name)}")
            try:
                r = httpx.get(self.base + "/readyz", timeout=2)
                if r.status_code == 200:
                    return
                last = r.text
            except httpx.HTTPError as exc:
                last = str(exc)
            time.sleep(0.2)
        raise TimeoutError(f"stack not ready after {timeout}s: {last}")

    def client(self, sub: str = "alice", **kw: object) -> httpx.Client:
        return httpx.Client(
            base_url=self.base + "/api/v1", timeout=15, headers={"Authorization": "Bearer " + token(sub, **kw)}
        )  # type: ignore[arg-type]
