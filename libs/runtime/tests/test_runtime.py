"""The runtime against real NATS and PostgreSQL: provisioning, migrations, health, graceful stop."""

from __future__ import annotations

import asyncio
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory

from flowmesh.contracts import streams
from flowmesh.contracts.errors import Conflict, ServiceUnavailable
from flowmesh.contracts.models.usage import TenantQuota
from flowmesh.runtime.db import Database
from flowmesh.runtime.migrate import MigrationError, head_revision, migrate
from flowmesh.runtime.nats import create_broker, provision_streams, stream_config
from flowmesh.runtime.quota import refuses_runs
from flowmesh.runtime.rpc import RpcClient, RpcContext
from flowmesh.runtime.service import ServiceRuntime
from flowmesh.runtime.settings import BaseServiceSettings
from flowmesh.runtime.testing import service_settings

FLOWS_MIGRATIONS = Path(__file__).parents[3] / "services/flows/src/flowmesh/flows/migrations"
EVERY_MIGRATIONS = sorted(Path(__file__).parents[3].glob("services/*/src/flowmesh/*/migrations"))


def _alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(FLOWS_MIGRATIONS))
    return cfg


def settings(infra: Any, **kw: Any) -> BaseServiceSettings:
    return service_settings(BaseServiceSettings, infra.nats_url, infra.database_url, **kw)


async def test_streams_are_provisioned_idempotently_and_brought_to_spec(infra: Any) -> None:
    broker = create_broker(infra.nats_url, name="test")
    await broker.connect()
    js = broker.connection.jetstream()
    try:
        await provision_streams(js)
        await provision_streams(js)  # a second replica starting: nothing changes, nothing fails
        info = await js.stream_info(streams.RUN_EVENTS.name)
        assert info.config.subjects == list(streams.RUN_EVENTS.subjects)
        # an older deployment's stream with another config is updated in place
        old = stream_config(streams.OUT)
        old.max_age = 3600
        await js.update_stream(old)
        await provision_streams(js, [streams.OUT])
        assert (await js.stream_info(streams.OUT.name)).config.max_age == streams.OUT.max_age_s
    finally:
        await broker.stop()


def database(infra: Any) -> Database:
    return Database(infra.database_url, size=2, application_name="test")


async def test_migrations_run_once_per_schema_with_their_own_version_table(infra: Any) -> None:
    schema = "flows"
    async with database(infra).opened() as pool:
        # three replicas starting at once: one upgrades, the others wait on its lock and find it done
        dbs = [database(infra) for _ in range(3)]
        for db in dbs:
            await db.open()
        try:
            await asyncio.gather(*(migrate(db, schema=schema, script_location=FLOWS_MIGRATIONS) for db in dbs))
        finally:
            for db in dbs:
                await db.close()
        version = await pool.fetchval("SELECT version_num FROM flows.alembic_version")
        public = await pool.fetchval("SELECT to_regclass('public.alembic_version')::text")
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert version == head
    assert public is None


async def test_a_failed_migration_says_why_and_the_service_does_not_start(infra: Any, tmp_path: Path) -> None:
    (tmp_path / "versions").mkdir()
    (tmp_path / "env.py").write_text("from flowmesh.runtime.migrate import run_env\n\nrun_env()\n")
    (tmp_path / "script.py.mako").write_text("")
    (tmp_path / "versions" / "0001_bad.py").write_text(
        "from alembic import op\n\nrevision = '0001'\ndown_revision = None\n\n"
        "def upgrade() -> None:\n    op.execute('SELECT * FROM no_such_table_anywhere')\n"
    )
    db = database(infra)
    async with db.opened():
        with pytest.raises(MigrationError, match="no_such_table_anywhere"):
            await migrate(db, schema="bad_migration", script_location=tmp_path)


@pytest.mark.parametrize("location", EVERY_MIGRATIONS, ids=lambda p: p.parent.name)
def test_the_head_revision_read_without_alembic_is_alembics(location: Path) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(location))
    assert head_revision(location) == ScriptDirectory.from_config(cfg).get_current_head()


def test_versions_with_two_heads_have_no_head_revision(tmp_path: Path) -> None:
    (tmp_path / "versions").mkdir()
    for name, down in (("a", None), ("b", "a"), ("c", "a")):
        (tmp_path / "versions" / f"{name}.py").write_text(f"revision = {name!r}\ndown_revision = {down!r}\n")
    assert head_revision(tmp_path) is None


async def test_a_schema_at_its_newest_revision_starts_without_importing_alembic(infra: Any) -> None:
    db = database(infra)
    async with db.opened():
        await migrate(db, schema="flows", script_location=FLOWS_MIGRATIONS)
    # a second start, as a fresh process: at head, the version is read and Alembic never loaded
    code = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from flowmesh.runtime.db import Database\n"
        "from flowmesh.runtime.migrate import migrate\n"
        "async def main():\n"
        f"    db = Database({infra.database_url!r}, size=1, application_name='test')\n"
        "    async with db.opened():\n"
        f"        await migrate(db, schema='flows', script_location=Path({str(FLOWS_MIGRATIONS)!r}))\n"
        "asyncio.run(main())\n"
        "print(sorted({'alembic', 'sqlalchemy'} & set(sys.modules)))\n"
    )
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0
    assert out.decode().strip() == "[]"


def test_settings_read_the_shared_and_the_prefixed_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    class FlowsLike(BaseServiceSettings):
        model_config = {"env_prefix": "FLOWMESH_FLOWS_"}

    monkeypatch.setenv("NATS_URL", "nats://a:1,nats://b:2")
    monkeypatch.setenv("DATABASE_URL", "postgresql+asyncpg://shared/db")
    monkeypatch.setenv("FLOWMESH_ENV", "dev")
    assert FlowsLike().db_url == "postgresql+asyncpg://shared/db"
    monkeypatch.setenv("FLOWMESH_FLOWS_DATABASE_URL", "postgresql+asyncpg://own/db")
    monkeypatch.setenv("FLOWMESH_FLOWS_HEALTH_PORT", "9999")
    s = FlowsLike()
    assert s.db_url == "postgresql+asyncpg://own/db" and s.health_port == 9999
    assert s.nats_url == "nats://a:1,nats://b:2" and s.is_dev


async def test_service_answers_health_readiness_and_metrics(infra: Any) -> None:
    service = ServiceRuntime("flows", settings(infra), migrations=FLOWS_MIGRATIONS)
    async with service.running(), aiohttp.ClientSession() as http:
        assert service.health is not None
        base = f"http://127.0.0.1:{service.health.port}"
        async with http.get(base + "/healthz") as r:
            assert r.status == 200
        async with http.get(base + "/readyz") as r:
            body = await r.json()
            assert r.status == 200 and body["checks"] == {"nats": True, "postgres": True}
        async with http.get(base + "/metrics") as r:
            assert r.status == 200 and "flowmesh_rpc_served_total" in await r.text()


async def test_rpc_errors_travel_back_as_the_same_exception_and_absent_services_are_unavailable(infra: Any) -> None:
    name = f"svc{uuid.uuid4().hex[:8]}"
    subject = f"fm.rpc.test.{name}.op"
    service = ServiceRuntime(name, settings(infra), migrations=None)

    @service.rpc.handler(subject)
    async def op(ctx: RpcContext, body: Any) -> Any:
        if body.get("fail"):
            raise Conflict("not now")
        if body.get("crash"):
            raise RuntimeError("bug")
        return {"tenant": ctx.tenant, "echo": body}

    client_broker = create_broker(infra.nats_url, name="client")
    await client_broker.start()
    client = RpcClient(client_broker, timeout=2)
    try:
        with pytest.raises(ServiceUnavailable):
            await client.call(subject, {}, tenant="t")
        async with service.running(health=False):
            assert await client.call(subject, {"a": 1}, tenant="t") == {"tenant": "t", "echo": {"a": 1}}
            with pytest.raises(Conflict, match="not now"):
                await client.call(subject, {"fail": True}, tenant="t")
            with pytest.raises(Exception, match="Internal error") as err:
                await client.call(subject, {"crash": True}, tenant="t")
            assert "bug" not in str(err.value)  # internals are logged, never sent
    finally:
        await client_broker.stop()


async def test_stopping_finishes_in_flight_requests_before_closing(infra: Any) -> None:
    name = f"svc{uuid.uuid4().hex[:8]}"
    subject = f"fm.rpc.test.{name}.slow"
    service = ServiceRuntime(name, settings(infra), migrations=None)
    started = asyncio.Event()

    @service.rpc.handler(subject)
    async def slow(_: RpcContext, __: Any) -> str:
        started.set()
        await asyncio.sleep(0.5)
        return "finished"

    client_broker = create_broker(infra.nats_url, name="client")
    await client_broker.start()
    client = RpcClient(client_broker, timeout=5)
    try:
        async with service.running(health=False):
            pending = asyncio.create_task(client.call(subject, {}, tenant="t"))
            await asyncio.wait_for(started.wait(), 5)
        # the block exited (SIGTERM path) while the request was in flight: it still got its answer
        assert await pending == "finished"
        with pytest.raises(ServiceUnavailable):
            await client.call(subject, {}, tenant="t")
    finally:
        await client_broker.stop()


def _quota(**kw: object) -> TenantQuota:
    values: dict[str, object] = {
        "tenant_id": "t",
        "plan": "free",
        "plan_revision": 1,
        "period": "2026-11",
        "period_start": datetime(2026, 11, 1, tzinfo=UTC),
        "period_end": datetime(2026, 12, 1, tzinfo=UTC),
        "runs_used": 1000,
        "runs_limit": 1000,
        "runs_in_flight_limit": 10,
        "flows_limit": 1,
        "overage_allowed": False,
        "runs_exhausted": True,
        "updated_at": datetime(2026, 11, 20, tzinfo=UTC),
    }
    return TenantQuota.model_validate({**values, **kw})


def test_runs_are_refused_only_with_the_months_runs_used_up_and_no_overage() -> None:
    now = datetime(2026, 11, 23, 12, tzinfo=UTC)
    assert refuses_runs(_quota(), now)
    assert not refuses_runs(_quota(runs_used=999), now)
    assert not refuses_runs(_quota(overage_allowed=True), now)  # pro: billed, not refused
    assert not refuses_runs(_quota(runs_limit=None), now)  # unlimited
    assert not refuses_runs(_quota(), datetime(2026, 12, 1, tzinfo=UTC))  # a new month starts at 0
    assert refuses_runs(_quota(runs_limit=0, runs_used=0, period="2026-10"), now)
