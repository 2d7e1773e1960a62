"""Publish, versions, rollback, activation, duplicate, export/import, triggers and the outbox."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
from nats.js.api import ConsumerConfig, DeliverPolicy

from flowmesh.contracts import headers
from flowmesh.contracts.errors import Conflict, InvalidInput, NotFound
from flowmesh.contracts.ids import new_id
from flowmesh.contracts.subjects import FlowsOp, flow_event, tenant_token
from flowmesh.contracts.testing import linear, subflow
from flowmesh.runtime.rpc import RpcClient
from flowmesh.runtime.service import ServiceRuntime
from flowmesh.runtime.testing import Infra, ServiceUnderTest, running_service

CHAIN = {
    "nodes": [
        {"id": "start", "type": "trigger", "data": {}, "position": {"x": 0, "y": 0}, "width": 50},
        {"id": "add", "type": "transform", "data": {"output": {"v": "{{ input.v + 1 }}"}}},
    ],
    "edges": [{"id": "e", "source": "start", "target": "add", "animated": True}],
}


async def new_flow(rpc: RpcClient, tenant: str, **body: Any) -> dict[str, Any]:
    body.setdefault("definition", CHAIN)
    return await rpc.call(FlowsOp.CREATE, {"name": "f", **body}, tenant=tenant)  # type: ignore[no-any-return]


async def published(rpc: RpcClient, tenant: str, **body: Any) -> dict[str, Any]:
    flow = await new_flow(rpc, tenant, **body)
    await rpc.call(FlowsOp.PUBLISH, {"flowId": flow["id"]}, tenant=tenant)
    return await rpc.call(FlowsOp.GET, {"flowId": flow["id"]}, tenant=tenant)  # type: ignore[no-any-return]


async def announcements(
    service: ServiceRuntime, tenant: str, *, expect: int, timeout: float = 5
) -> list[dict[str, Any]]:
    """Every message on ``fm.flows.{t}.>`` so far, waiting until at least ``expect`` arrived."""
    js = service.broker.connection.jetstream()
    sub = await js.pull_subscribe(
        f"fm.flows.{tenant_token(tenant)}.>",
        stream="FLOWS",
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, inactive_threshold=10),
    )
    got: list[dict[str, Any]] = []
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                msgs = await sub.fetch(100, timeout=0.3)
            except TimeoutError:
                msgs = []
            got += [
                {"subject": m.subject, "msgId": (m.headers or {}).get(headers.MSG_ID), **json.loads(m.data)}
                for m in msgs
            ]
            if (len(got) >= expect and not msgs) or asyncio.get_running_loop().time() > deadline:
                return got
    finally:
        await sub.unsubscribe()


async def test_publish_freezes_the_draft_and_makes_it_active(rpc: RpcClient, tenant: str) -> None:
    flow = await new_flow(rpc, tenant, inputSchema={"type": "object"}, settings={"runTimeoutMs": 1000})
    ref = {"flowId": flow["id"]}
    first = await rpc.call(FlowsOp.PUBLISH, ref, tenant=tenant)
    assert first["created"] is True and first["version"]["version"] == 1
    assert first["version"]["definition"] == CHAIN and first["version"]["settings"] == {"runTimeoutMs": 1000}
    again = await rpc.call(FlowsOp.PUBLISH, ref, tenant=tenant)
    assert again == {"created": False, "version": first["version"]}
    got = await rpc.call(FlowsOp.GET, ref, tenant=tenant)
    assert (got["status"], got["activeVersion"], got["latestVersion"]) == ("published", 1, 1)
    # a changed draft leaves version 1 as it was
    await rpc.call(
        FlowsOp.UPDATE, {**ref, "patch": {"inputSchema": {"type": "object", "required": ["v"]}}}, tenant=tenant
    )
    second = await rpc.call(FlowsOp.PUBLISH, ref, tenant=tenant)
    assert second["version"]["version"] == 2 and second["created"] is True
    v1 = await rpc.call(FlowsOp.VERSION, {**ref, "version": 1}, tenant=tenant)
    assert v1["inputSchema"] == {"type": "object"}
    page = await rpc.call(FlowsOp.VERSIONS, ref, tenant=tenant)
    assert [v["version"] for v in page["items"]] == [2, 1] and page["total"] == 2


async def test_an_invalid_draft_is_not_published(rpc: RpcClient, tenant: str) -> None:
    flow = await new_flow(rpc, tenant, definition={"nodes": [{"id": "x", "type": "mystery"}], "edges": []})
    with pytest.raises(InvalidInput) as err:
        await rpc.call(FlowsOp.PUBLISH, {"flowId": flow["id"]}, tenant=tenant)
    assert {e.path for e in err.value.errors or []} == {"/nodes", "/nodes/0/type"}
    report = await rpc.call(FlowsOp.VALIDATE, {"flowId": flow["id"]}, tenant=tenant)
    assert report["valid"] is False and len(report["errors"]) == 2
    assert (await rpc.call(FlowsOp.GET, {"flowId": flow["id"]}, tenant=tenant))["latestVersion"] is None


async def test_a_draft_with_a_too_costly_expression_is_refused_with_the_expression_named(
    rpc: RpcClient, tenant: str
) -> None:
    nested = "input.a.map(x, x.b.map(y, y.c.map(z, z.d.exists(w, w == 1))))"
    ok = "input.a.filter(x, x > 1).map(x, x * 2)"
    definition = {
        "nodes": [
            {"id": "start", "type": "trigger", "data": {}},
            {"id": "fine", "type": "transform", "data": {"output": {"v": "{{ " + ok + " }}"}}},
            {"id": "costly", "type": "condition", "data": {"expression": nested}},
        ],
        "edges": [
            {"id": "e1", "source": "start", "target": "fine"},
            {"id": "e2", "source": "fine", "target": "costly"},
        ],
    }
    flow = await new_flow(rpc, tenant, definition=definition)
    with pytest.raises(InvalidInput) as err:
        await rpc.call(FlowsOp.PUBLISH, {"flowId": flow["id"]}, tenant=tenant)
    assert err.value.status == 422
    assert [(e.path, e.message) for e in err.value.errors or []] == [
        (
            "/nodes/2/data/expression",
            f"node 'costly': expression {nested!r} is too costly: nests macros more than 3 deep",
        )
    ]
    definition["nodes"].pop()
    definition["edges"].pop()
    assert (await published(rpc, tenant, definition=definition))["activeVersion"] == 1


async def test_subflow_targets_are_looked_up_in_the_tenant(rpc: RpcClient, tenant: str) -> None:
    target = await published(rpc, tenant)
    other_tenants = await published(rpc, tenant + "-x")
    d = linear(subflow("a", target["id"]), subflow("b", other_tenants["id"]))
    flow = await new_flow(rpc, tenant, definition=d)
    report = await rpc.call(FlowsOp.VALIDATE, {"flowId": flow["id"]}, tenant=tenant)
    assert [e["path"] for e in report["errors"]] == ["/nodes/2/data/flowId"]


async def test_rollback_moves_only_the_active_pointer(rpc: RpcClient, tenant: str) -> None:
    flow = await published(rpc, tenant)
    ref = {"flowId": flow["id"]}
    await rpc.call(FlowsOp.UPDATE, {**ref, "patch": {"description": "v2"}}, tenant=tenant)
    await rpc.call(FlowsOp.UPDATE, {**ref, "patch": {"settings": {"runTimeoutMs": 5}}}, tenant=tenant)
    await rpc.call(FlowsOp.PUBLISH, ref, tenant=tenant)
    rolled = await rpc.call(FlowsOp.ROLLBACK, {**ref, "version": 1}, tenant=tenant)
    assert (rolled["activeVersion"], rolled["latestVersion"]) == (1, 2)
    assert rolled["settings"] == {"runTimeoutMs": 5}  # the draft is untouched
    with pytest.raises(NotFound):
        await rpc.call(FlowsOp.ROLLBACK, {**ref, "version": 7}, tenant=tenant)
    runnable = await rpc.call(FlowsOp.RUNNABLE, ref, tenant=tenant)
    assert runnable["version"]["version"] == 1 and runnable["active"] is True
    assert (await rpc.call(FlowsOp.RUNNABLE, {**ref, "version": 2}, tenant=tenant))["version"]["version"] == 2
    # publishing the draft that equals no active version makes a new one
    assert (await rpc.call(FlowsOp.PUBLISH, ref, tenant=tenant))["version"]["version"] == 3


async def test_activation_and_the_runnable_lookup(rpc: RpcClient, tenant: str) -> None:
    draft = await new_flow(rpc, tenant)
    with pytest.raises(Conflict, match="no published version"):
        await rpc.call(FlowsOp.RUNNABLE, {"flowId": draft["id"]}, tenant=tenant)
    flow = await published(rpc, tenant)
    off = await rpc.call(FlowsOp.DEACTIVATE, {"flowId": flow["id"]}, tenant=tenant)
    assert off["active"] is False
    assert (await rpc.call(FlowsOp.RUNNABLE, {"flowId": flow["id"]}, tenant=tenant))["active"] is False
    assert (await rpc.call(FlowsOp.ACTIVATE, {"flowId": flow["id"]}, tenant=tenant))["active"] is True


async def test_delete_rules_for_published_flows(rpc: RpcClient, tenant: str) -> None:
    flow = await published(rpc, tenant)
    with pytest.raises(Conflict):
        await rpc.call(FlowsOp.DELETE, {"flowId": flow["id"]}, tenant=tenant)
    await rpc.call(FlowsOp.DELETE, {"flowId": flow["id"], "force": True}, tenant=tenant)
    with pytest.raises(NotFound):
        await rpc.call(FlowsOp.RUNNABLE, {"flowId": flow["id"]}, tenant=tenant)


async def test_duplicate_export_and_import(rpc: RpcClient, tenant: str) -> None:
    flow = await published(
        rpc, tenant, description="orig", inputSchema={"type": "object"}, settings={"runTimeoutMs": 9}
    )
    await rpc.call(
        FlowsOp.TRIGGER_CREATE,
        {"flowId": flow["id"], "trigger": {"type": "webhook", "name": "in", "config": {"signed": True}}},
        tenant=tenant,
    )
    await rpc.call(
        FlowsOp.TRIGGER_CREATE,
        {
            "flowId": flow["id"],
            "trigger": {"type": "schedule", "name": "nightly", "config": {"cron": "0 2 * * *"}, "enabled": False},
        },
        tenant=tenant,
    )
    copy = await rpc.call(FlowsOp.DUPLICATE, {"flowId": flow["id"]}, tenant=tenant)
    assert copy["name"] == "f (copy)" and copy["definition"] == CHAIN and copy["status"] == "draft"
    assert copy["id"] != flow["id"]

    doc = await rpc.call(FlowsOp.EXPORT, {"flowId": flow["id"]}, tenant=tenant)
    assert doc["formatVersion"] == 1
    assert "whsec_" not in json.dumps(doc) and "token" not in json.dumps(doc)
    imported = await rpc.call(FlowsOp.IMPORT, doc, tenant=tenant)
    assert [t["url"].startswith("/api/v1/hooks/") for t in imported["triggers"] if t["type"] == "webhook"] == [True]
    assert [t["secret"].startswith("whsec_") for t in imported["triggers"] if t["type"] == "webhook"] == [True]
    again = await rpc.call(FlowsOp.EXPORT, {"flowId": imported["id"]}, tenant=tenant)
    assert again == doc

    with pytest.raises(InvalidInput):
        await rpc.call(FlowsOp.IMPORT, {**doc, "formatVersion": 2}, tenant=tenant)
    bad = {**doc, "flow": {**doc["flow"], "triggers": [{"type": "schedule", "name": "x", "config": {"cron": "no"}}]}}
    with pytest.raises(InvalidInput) as err:
        await rpc.call(FlowsOp.IMPORT, bad, tenant=tenant)
    assert [e.path for e in err.value.errors or []] == ["/flow/triggers/0/config/cron"]


async def test_triggers_crud_and_webhook_resolution(rpc: RpcClient, tenant: str) -> None:
    flow = await published(rpc, tenant)
    hook = await rpc.call(
        FlowsOp.TRIGGER_CREATE, {"flowId": flow["id"], "trigger": {"type": "webhook", "name": "h"}}, tenant=tenant
    )
    token = hook["url"].removeprefix("/api/v1/hooks/")
    assert hook["secret"] is None and len(token) >= 32
    listed = await rpc.call(FlowsOp.TRIGGERS, {"flowId": flow["id"]}, tenant=tenant)
    assert [t["id"] for t in listed["items"]] == [hook["id"]] and "url" not in listed["items"][0]

    target = await rpc.call(FlowsOp.WEBHOOK, {"token": token}, tenant="")
    assert target["tenantId"] == tenant and target["trigger"]["id"] == hook["id"] and target["published"] is True
    with pytest.raises(NotFound):
        await rpc.call(FlowsOp.WEBHOOK, {"token": token + "x"}, tenant="")

    off = await rpc.call(
        FlowsOp.TRIGGER_UPDATE, {"triggerId": hook["id"], "patch": {"enabled": False, "name": "n"}}, tenant=tenant
    )
    assert off["enabled"] is False and off["name"] == "n"
    with pytest.raises(InvalidInput):
        await rpc.call(
            FlowsOp.TRIGGER_UPDATE, {"triggerId": hook["id"], "patch": {"config": {"signed": True}}}, tenant=tenant
        )
    with pytest.raises(NotFound):
        await rpc.call(FlowsOp.TRIGGER_DELETE, {"triggerId": hook["id"]}, tenant=tenant + "-other")
    await rpc.call(FlowsOp.TRIGGER_DELETE, {"triggerId": hook["id"]}, tenant=tenant)
    with pytest.raises(NotFound):
        await rpc.call(FlowsOp.WEBHOOK, {"token": token}, tenant="")


async def test_changes_are_announced_in_order(rpc: RpcClient, tenant: str, flows_service: ServiceRuntime) -> None:
    flow = await published(rpc, tenant)
    ref = {"flowId": flow["id"]}
    trig = await rpc.call(
        FlowsOp.TRIGGER_CREATE,
        {**ref, "trigger": {"type": "schedule", "name": "s", "config": {"cron": "* * * * *"}}},
        tenant=tenant,
    )
    await rpc.call(FlowsOp.DEACTIVATE, ref, tenant=tenant)
    await rpc.call(FlowsOp.ACTIVATE, ref, tenant=tenant)
    await rpc.call(FlowsOp.ROLLBACK, {**ref, "version": 1}, tenant=tenant)  # already active: no event
    await rpc.call(FlowsOp.TRIGGER_DELETE, {"triggerId": trig["id"]}, tenant=tenant)
    await rpc.call(FlowsOp.DELETE, {**ref, "force": True}, tenant=tenant)
    got = await announcements(flows_service, tenant, expect=6)
    assert [m["type"] for m in got] == [
        "published",
        "triggerChanged",
        "deactivated",
        "activated",
        "triggerChanged",
        "deleted",
    ]
    assert got[0]["subject"] == flow_event(tenant, "published") and got[0]["activeVersion"] == 1
    assert got[1]["trigger"]["config"] == {"cron": "* * * * *", "timezone": "UTC", "misfire": "skip"}
    assert got[4]["triggerDeleted"] is True and got[5]["active"] is False
    assert all(m["msgId"] == m["id"] for m in got)


async def test_an_outbox_row_is_published_exactly_once_across_crashes(
    infra: Infra, flows_service: ServiceRuntime, service_under_test: ServiceUnderTest[Any]
) -> None:
    """Both crash points: killed after commit (not yet published), and after publish (not yet deleted)."""
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    committed, published_not_deleted = new_id(), new_id()
    subject = flow_event(tenant, "activated")
    payload = {"id": "x", "type": "activated", "tenantId": tenant}
    js = flows_service.broker.connection.jetstream()
    # a second, stopped replica's crash state, written straight to its tables
    async with flows_service.db.transaction() as conn:
        for msg_id in (committed, published_not_deleted):
            await conn.execute(
                "INSERT INTO flows.outbox (id, subject, payload, headers, created_at) "
                "VALUES ($1, $2, $3, '{}', now() - interval '1 hour')",
                msg_id,
                subject,
                {**payload, "id": msg_id},
            )
        # the second one already reached JetStream before the "crash"
        await js.publish(
            subject,
            json.dumps({**payload, "id": published_not_deleted}).encode(),
            headers={headers.MSG_ID: published_not_deleted},
        )
    # a replica starting up (or the running one polling) drains what it finds
    async with running_service(service_under_test.create_app, service_under_test.settings_for(infra)):
        got = await announcements(flows_service, tenant, expect=2)
    assert sorted(m["msgId"] for m in got) == sorted([committed, published_not_deleted])
    async with flows_service.db.reading() as conn:
        left = await conn.fetchval(
            "SELECT count(*) FROM flows.outbox WHERE id = ANY($1::uuid[])", [committed, published_not_deleted]
        )
    assert left == 0
