"""Least privilege on NATS: every service and integrator is a user allowed only what it needs.

The users come from ``flowmesh.contracts.permissions`` (rendered by ``flowmesh nats-config`` into
``deploy/nats/flowmesh-auth.conf``); these tests run a real nats-server with that configuration and
try, as each user, what the user must and must not be able to do. The privileged RPC headers
(``Flowmesh-Role: admin``, ``service:runner``) are trusted only because of this: the subjects that
honour them can be published by the gateway, or the runner, and by no one else.
"""

from __future__ import annotations

import asyncio
import gc
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nats.errors
import pytest
from nats.aio.client import Client

from flowmesh.cli.embedded import free_port, nats_server_binary
from flowmesh.cli.natsconf import password_var, render_auth_config
from flowmesh.contracts import subjects
from flowmesh.contracts.permissions import CALLS, SERVICES, inbox_prefix, integrator_user
from flowmesh.contracts.streams import QUOTA_BUCKET
from flowmesh.contracts.subjects import FlowsOp, RunsOp, SchedulerOp, UsageOp
from flowmesh.runtime.service import ServiceRuntime, StartupError
from flowmesh.runtime.settings import BaseServiceSettings

ROOT = Path(__file__).resolve().parents[2]
TENANTS = ("acme", "globex")


@dataclass
class AuthNats:
    url: str
    passwords: dict[str, str]
    process: subprocess.Popen[bytes]
    log: Path


@pytest.fixture(scope="module")
def auth_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthNats]:
    """A nats-server (JetStream) whose only users are those of ``flowmesh nats-config``."""
    root = tmp_path_factory.mktemp("auth-nats")
    users = [*SERVICES, *(integrator_user(t) for t in TENANTS)]
    passwords = {user: f"pw-{user}-0123456789" for user in users}
    (root / "auth.conf").write_text(render_auth_config(TENANTS))
    port, monitor = free_port(), free_port()
    (root / "nats.conf").write_text(
        f"listen: 127.0.0.1:{port}\nhttp: 127.0.0.1:{monitor}\n"
        f'jetstream {{ store_dir: "{root / "js"}" }}\ninclude ./auth.conf\n'
    )
    log = root / "nats.log"
    env = {password_var(user): pw for user, pw in passwords.items()}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(nats_server_binary()), "-c", str(root / "nats.conf")], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/healthz?js-enabled-only=true", timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
        yield AuthNats(f"nats://127.0.0.1:{port}", passwords, process, log)
    finally:
        process.terminate()
        process.wait(10)


@dataclass
class Session:
    """A connection as one user, with the permission violations the server reported to it."""

    nc: Client
    refused: list[str] = field(default_factory=list)

    async def refuses(self, subject: str, timeout: float = 2.0) -> bool:
        """Whether a violation naming ``subject`` arrives in time (nats-py lower-cases server errors)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            await self.nc.flush()
            if any("permissions violation" in r and subject.lower() in r for r in self.refused):
                return True
            await asyncio.sleep(0.02)
        return False


@pytest.fixture
async def connect(auth_nats: AuthNats) -> AsyncIterator[object]:
    sessions: list[Session] = []

    async def as_user(user: str) -> Session:
        session = Session(nc=Client())

        async def on_error(err: Exception) -> None:
            session.refused.append(str(err))

        await session.nc.connect(
            auth_nats.url,
            user=user,
            password=auth_nats.passwords[user],
            inbox_prefix=inbox_prefix(user),
            error_cb=on_error,
            allow_reconnect=False,
        )
        sessions.append(session)
        return session

    yield as_user
    for s in sessions:
        await s.nc.close()


# --- the configuration is the contracts' ------------------------------------------------------------


def test_the_committed_nats_users_are_generated_from_the_contracts() -> None:
    committed = (ROOT / "deploy" / "nats" / "flowmesh-auth.conf").read_text()
    assert committed == render_auth_config(), "regenerate it: make nats-config"


def _called_ops(service: str) -> set[str]:
    """Every ``<X>Op.<NAME>`` a service's code refers to, except the ones it serves."""
    ops = {"FlowsOp": FlowsOp, "RunsOp": RunsOp, "UsageOp": UsageOp, "SchedulerOp": SchedulerOp}
    found = set()
    for path in (ROOT / "services" / service / "src").rglob("*.py"):
        for line in path.read_text().splitlines():
            if ".handler(" in line:
                continue
            for cls, name in re.findall(r"\b(FlowsOp|RunsOp|UsageOp|SchedulerOp)\.([A-Z_]+)\b", line):
                found.add(getattr(ops[cls], name))
        if "QuotaView" in path.read_text():
            found.add(UsageOp.QUOTA)  # the runtime's quota view asks the usage service
    return found


@pytest.mark.parametrize("service", SERVICES)
def test_each_service_may_call_exactly_the_operations_its_code_calls(service: str) -> None:
    allowed = set(CALLS[service]) - {subjects.ping(s) for s in subjects.RPC_PREFIXES}
    assert _called_ops(service) == allowed


# --- what users may and may not do ------------------------------------------------------------------


async def _refused_connect(url: str, **kw: object) -> None:
    nc = Client()
    try:
        with pytest.raises((nats.errors.NoServersError, nats.errors.AuthorizationError, nats.errors.Error)):
            await nc.connect(url, allow_reconnect=False, connect_timeout=2, max_reconnect_attempts=0, **kw)  # type: ignore[arg-type]
    finally:
        await nc.close()


async def test_anonymous_connections_are_refused(auth_nats: AuthNats) -> None:
    await _refused_connect(auth_nats.url)


async def test_a_wrong_password_is_refused(auth_nats: AuthNats) -> None:
    await _refused_connect(auth_nats.url, user="runner", password="guess")


async def test_an_integrator_publishes_its_own_events_and_reads_its_own_runs(connect) -> None:  # type: ignore[no-untyped-def]
    ops = await connect("runner")
    acme = await connect(integrator_user("acme"))
    js = ops.nc.jetstream()
    from flowmesh.contracts.streams import ALL_STREAMS
    from flowmesh.runtime.nats import provision_streams

    await provision_streams(js, ALL_STREAMS)
    ack = await acme.nc.jetstream().publish(subjects.external_event("acme", "order.paid"), b"{}")
    assert ack.stream == "EVENTS"
    got = await acme.nc.subscribe(subjects.run_events_of_flow("acme", "f1"))
    out = await acme.nc.subscribe("fm.out.acme.>")
    await acme.nc.flush()
    await ops.nc.publish(subjects.run_event("acme", "f1", "r1", "run.queued"), b"{}")
    await ops.nc.publish(subjects.out_message("acme", "report"), b"{}")
    await ops.nc.flush()  # both are at the server, so waiting measures delivery only
    assert (await got.next_msg(timeout=10)).subject.endswith("run.queued")
    assert (await out.next_msg(timeout=10)).subject == "fm.out.acme.report"
    assert not acme.refused


@pytest.mark.parametrize(
    ("action", "subject"),
    [
        ("publish", "fm.events.globex.order"),  # another tenant's events
        ("publish", subjects.RUN_START_CMD),  # commands
        ("publish", subjects.STEP_WORK),
        ("publish", UsageOp.KEYS_REVEAL),  # request/reply, above all the privileged ones
        ("publish", UsageOp.SECRETS_REVEAL),
        ("publish", UsageOp.PLAN_SET),
        ("publish", FlowsOp.LIST),
        ("publish", f"$KV.{QUOTA_BUCKET}.acme"),  # KV buckets
        ("publish", f"$JS.API.STREAM.INFO.KV_{QUOTA_BUCKET}"),
        ("publish", "$JS.API.CONSUMER.CREATE.RUN_EVENTS"),  # a consumer over every tenant's events
        ("subscribe", "fm.runs.globex.>"),  # another tenant's runs and messages
        ("subscribe", "fm.runs.>"),
        ("subscribe", "fm.out.globex.>"),
        ("subscribe", "_INBOX.>"),  # other users' replies (a revealed API key travels in one)
        ("subscribe", "_INBOX.runner.>"),
        ("subscribe", "fm.rpc.usage.>"),  # impersonating a service
    ],
)
async def test_an_integrator_is_refused_everything_else(connect, action: str, subject: str) -> None:  # type: ignore[no-untyped-def]
    acme = await connect(integrator_user("acme"))
    if action == "publish":
        await acme.nc.publish(subject, b"{}")
    else:
        await acme.nc.subscribe(subject)
    assert await acme.refuses(subject), f"{action} {subject} was allowed"


@pytest.mark.parametrize(
    ("user", "subject"),
    [
        ("flows", UsageOp.KEYS_REVEAL),
        ("scheduler", UsageOp.KEYS_REVEAL),
        ("gateway", UsageOp.KEYS_REVEAL),
        ("flows", UsageOp.SECRETS_REVEAL),
        ("scheduler", UsageOp.SECRETS_REVEAL),
        ("gateway", UsageOp.SECRETS_REVEAL),
        ("runner", UsageOp.PLAN_SET),
        ("flows", UsageOp.PLAN_SET),
        ("usage", RunsOp.START),
        ("flows", subjects.RUN_START_CMD),
        ("gateway", subjects.STEP_WORK),
    ],
)
async def test_privileged_subjects_can_be_published_only_by_their_caller(connect, user: str, subject: str) -> None:  # type: ignore[no-untyped-def]
    session = await connect(user)
    await session.nc.publish(subject, b"{}")
    assert await session.refuses(subject)


async def test_the_runner_may_ask_for_a_key_or_secrets_and_the_gateway_may_set_a_plan(connect) -> None:  # type: ignore[no-untyped-def]
    usage, runner, gateway = await connect("usage"), await connect("runner"), await connect("gateway")
    served = []

    async def answer(msg) -> None:  # type: ignore[no-untyped-def]
        served.append(msg.subject)
        await msg.respond(b"{}")

    await usage.nc.subscribe("fm.rpc.usage.>", queue="usage", cb=answer)
    await usage.nc.flush()  # twice: nats-py sends a PING ahead of commands still in its buffer
    await usage.nc.flush()
    assert (await runner.nc.request(UsageOp.KEYS_REVEAL, b"{}", timeout=2)).data == b"{}"
    assert (await runner.nc.request(UsageOp.SECRETS_REVEAL, b"{}", timeout=2)).data == b"{}"
    assert (await gateway.nc.request(UsageOp.PLAN_SET, b"{}", timeout=2)).data == b"{}"
    assert served == [UsageOp.KEYS_REVEAL, UsageOp.SECRETS_REVEAL, UsageOp.PLAN_SET]
    assert not (usage.refused or runner.refused or gateway.refused)


async def test_no_service_reads_another_services_replies(connect) -> None:  # type: ignore[no-untyped-def]
    gateway = await connect("gateway")
    await gateway.nc.subscribe(f"{inbox_prefix('runner')}.>")
    assert await gateway.refuses("_INBOX.runner")


# --- services that cannot work say why --------------------------------------------------------------


def _settings(url: str, **kw: object) -> BaseServiceSettings:
    return BaseServiceSettings(nats_url=url, env="dev", health_port=0, **kw)  # type: ignore[arg-type]


# nats-py leaves the socket of a refused connection open; collected here, its warning is this test's
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning", "ignore::ResourceWarning")
async def test_a_service_with_a_wrong_password_says_which_settings_to_check(auth_nats: AuthNats) -> None:
    service = ServiceRuntime(
        "scheduler", _settings(auth_nats.url, nats_user="scheduler", nats_password="x" * 20), migrations=None
    )
    with pytest.raises(StartupError, match="FLOWMESH_NATS_USER and FLOWMESH_NATS_PASSWORD"):
        async with service.running(health=False):
            pass
    del service
    gc.collect()


async def test_a_service_whose_user_lacks_a_permission_names_the_subject(auth_nats: AuthNats) -> None:
    # the usage service's user may not serve the scheduler's subjects
    pw = auth_nats.passwords["usage"]
    service = ServiceRuntime(
        "scheduler", _settings(auth_nats.url, nats_user="usage", nats_password=pw), migrations=None
    )
    with pytest.raises(StartupError, match=r"fm\.rpc\.scheduler\.ping"):
        async with service.running(health=False):
            pass


async def test_production_refuses_a_nats_that_lets_anyone_in(infra) -> None:  # type: ignore[no-untyped-def]
    settings = BaseServiceSettings(
        nats_url=infra.nats_url, env="production", nats_user="scheduler", nats_password="p" * 24, health_port=0
    )
    service = ServiceRuntime("scheduler", settings, migrations=None)
    with pytest.raises(StartupError, match="does not authenticate"):
        async with service.running(health=False):
            pass


def test_the_entry_point_exits_with_the_subject_and_no_traceback(auth_nats: AuthNats, tmp_path: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "FLOWMESH_ENV": "dev",
        "FLOWMESH_DATA_DIR": str(tmp_path),
        "NATS_URL": auth_nats.url,
        "FLOWMESH_NATS_USER": "usage",
        "FLOWMESH_NATS_PASSWORD": auth_nats.passwords["usage"],
        "FLOWMESH_SCHEDULER_HEALTH_PORT": "0",
        "DATABASE_URL": "postgresql+asyncpg://nobody@127.0.0.1:1/none",
        "FLOWMESH_LOG_FORMAT": "text",
    }
    # the scheduler migrates first: without a database it fails there, so point it at no schema at all
    done = subprocess.run(
        [sys.executable, "-m", "flowmesh.gateway"],
        env={
            **env,
            "FLOWMESH_NATS_USER": "scheduler",
            "FLOWMESH_NATS_PASSWORD": auth_nats.passwords["scheduler"],
            "FLOWMESH_HTTP_PORT": str(free_port()),
            "FLOWMESH_JWT_SECRET": "j" * 40,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    # the gateway's first JetStream call as the scheduler's user: reading the WebSocket tickets' bucket
    assert "cannot start: NATS refused what gateway needs as user 'scheduler'" in output, output
    assert '"$JS.API.STREAM.INFO.KV_fm_ws_tickets"' in output, output
    assert "Traceback" not in output


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({}, "FLOWMESH_NATS_USER and FLOWMESH_NATS_PASSWORD"),
        ({"FLOWMESH_NATS_USER": "usage", "FLOWMESH_NATS_PASSWORD": "changeme"}, "FLOWMESH_NATS_PASSWORD"),
        ({"FLOWMESH_NATS_USER": "usage"}, "FLOWMESH_NATS_PASSWORD"),
        (
            {"FLOWMESH_NATS_USER": "usage", "FLOWMESH_NATS_PASSWORD": "p" * 32, "FLOWMESH_USAGE_KEYS_SECRET": "secret"},
            "FLOWMESH_USAGE_KEYS_SECRET",
        ),
        ({"FLOWMESH_NATS_CREDS": "/nonexistent/usage.creds"}, "FLOWMESH_NATS_CREDS"),
    ],
)
def test_production_settings_that_cannot_work_exit_naming_the_setting(
    env: dict[str, str], named: str, tmp_path: Path
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "flowmesh.usage", "check"],
        env={"PATH": "/usr/bin:/bin", "FLOWMESH_ENV": "production", "FLOWMESH_DATA_DIR": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert named in done.stderr and "Traceback" not in done.stderr, done.stderr
