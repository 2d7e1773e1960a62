"""OWASP API1:2023 Broken Object Level Authorization.

The risk for Flowmesh: every tenant's flows, versions, triggers, runs, secrets and provider keys are
addressed by ids in the path, and any signed-up tenant holds a valid token. If a service looked an
object up by id alone, a stranger who learns (or guesses) an id could read, change, run or delete it.

What these tests prove, through the public API only: the operations are generated from the committed
OpenAPI document, so a new route with an id in its path fails :func:`test_every_operation_is_in_the_table`
until it is covered here. Another tenant calling each of them, with every method and a valid body,
on the victim's real ids gets 404 (403 on the platform admin's routes), exactly as for an id that
does not exist, and the victim's objects are unchanged afterwards. WebSocket handshakes for another
tenant's run or flow are refused before the upgrade, and no list shows another tenant's items.
Deeper tests: ``tests/e2e/test_flows_api.py`` and ``test_flows_lifecycle.py`` (the flows verbs),
``test_runs.py``, ``test_webhooks.py`` (a webhook's run belongs to its trigger's owner),
``test_audit.py`` (the audit log's scope, also over NATS).
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from attacks import problem, tenant_of
from flowmesh.contracts.ids import new_id
from flowmesh.contracts.testing import linear, node
from stack import ProcessStack, bearer, publish_flow, refused, wait_run

ROOT = Path(__file__).resolve().parents[2]
OPENAPI = json.loads((ROOT / "docs/api/openapi.json").read_text())
METHODS = ("get", "post", "put", "patch", "delete")
EXCLUDED = {
    "deliverWebhook": "its path parameter is the webhook token, the credential itself",
    # another tenant's event of the same type stays that tenant's: test_events_http.py checks it
    "publishEvent": "its path parameter is an event type, a name in the caller's own tenant, not an object",
}

# What another tenant sends to each operation with an id in its path: a body valid for the schema
# (so a refusal is about the object, not the request), and the status it must get.
# "ws" operations are WebSocket handshakes, tried by test_websockets_of_another_tenant_are_refused.
TABLE: dict[str, dict[str, Any]] = {
    "getFlow": {},
    "updateFlow": {"body": {"name": "taken over"}},
    "replaceFlow": {"body": {"name": "taken over"}},
    "deleteFlow": {},
    "activateFlow": {},
    "deactivateFlow": {},
    "duplicateFlow": {},
    "exportFlow": {},
    "publishFlow": {},
    "rollbackFlow": {"body": {"version": 1}},
    "validateFlow": {},
    "startRun": {"body": {"input": {"v": 1}}},
    "getFlowStats": {},
    "listTriggers": {},
    "createTrigger": {"body": {"type": "webhook", "name": "mine now"}},
    "listVersions": {},
    "getVersion": {},
    "getRun": {},
    "cancelRun": {},
    "listRunEvents": {},
    "resumeRun": {"body": {"stepId": "ok", "decision": "approved"}},
    "retryRun": {"body": {"mode": "fromStart"}},
    "listRunSteps": {},
    "deleteTrigger": {},
    "updateTrigger": {"body": {"enabled": False}},
    "deleteApiKey": {},
    "deleteSecret": {},
    "setTenantPlan": {"body": {"plan": "free"}, "status": 403},
    "watchRun": {"ws": True},
    "watchFlow": {"ws": True},
}

APPROVAL = linear(node("ok", "approval"), node("after"))


def id_operations() -> list[tuple[str, str, str]]:
    """``(operationId, method, path)`` of every documented operation with a path parameter."""
    found = []
    for path, item in OPENAPI["paths"].items():
        for method in METHODS:
            op = item.get(method)
            if op is not None and re.search(r"\{\w+\}", path):
                found.append((op["operationId"], method.upper(), path))
    return sorted(found)


@pytest.fixture(scope="module")
def owned(victim: httpx.Client) -> dict[str, str]:
    """The victim's real objects, one of each kind an id can name: path parameter -> value."""
    flow_id = publish_flow(victim, APPROVAL)
    assert victim.post(f"/flows/{flow_id}/activate").status_code == 200
    r = victim.post(f"/flows/{flow_id}/triggers", json={"type": "webhook", "name": "in", "config": {"signed": True}})
    assert r.status_code == 201, r.text
    trigger_id = r.json()["id"]
    r = victim.post(f"/flows/{flow_id}/runs", json={"input": {"v": 1}})
    assert r.status_code == 201, r.text
    run_id = r.json()["id"]
    wait_run(victim, run_id, until=("waiting",))
    secret = f"VICTIM_{uuid.uuid4().hex[:8].upper()}"
    assert victim.post("/secrets", json={"name": secret, "value": "s3cr3t-value-of-the-victim"}).status_code == 201
    assert (
        victim.post("/api-keys", json={"provider": "openai", "apiKey": "sk-victim-0123456789abcdef"}).status_code == 201
    )
    return {
        "flowId": flow_id,
        "runId": run_id,
        "triggerId": trigger_id,
        "version": "1",
        "provider": "openai",
        "name": secret,
        "tenantId": tenant_of(victim),
    }


def strangers_ids() -> dict[str, str]:
    """Ids of the same shapes that name nothing at all."""
    return {
        "flowId": new_id(),
        "runId": new_id(),
        "triggerId": new_id(),
        "version": "1",
        "provider": "openai",
        "name": "NOBODY_HAS_THIS",
        "tenantId": f"nobody-{uuid.uuid4().hex[:8]}",
    }


def state(c: httpx.Client, ids: dict[str, str]) -> dict[str, Any]:
    """Everything of the victim's that an attacker's call could change."""
    flow = c.get(f"/flows/{ids['flowId']}").json()
    triggers = c.get(f"/flows/{ids['flowId']}/triggers").json()["items"]
    return {
        "flow": flow,
        "versions": c.get(f"/flows/{ids['flowId']}/versions").json(),
        "triggers": sorted((t["id"], t["enabled"], t["name"]) for t in triggers),
        "run": {k: v for k, v in c.get(f"/runs/{ids['runId']}").json().items() if k != "updatedAt"},
        "runs": sorted(r["id"] for r in c.get("/runs", params={"flowId": ids["flowId"]}).json()["items"]),
        "secrets": c.get("/secrets").json(),
        "keys": c.get("/api-keys").json(),
        "plan": c.get("/usage").json()["plan"],
        "flows": c.get("/flows").json()["total"],
    }


def call(c: httpx.Client, method: str, path: str, ids: dict[str, str], entry: dict[str, Any]) -> httpx.Response:
    url = re.sub(r"\{(\w+)\}", lambda m: ids[m.group(1)], path).removeprefix("/api/v1")
    return c.request(method, url, json=entry.get("body"))


def test_every_operation_is_in_the_table() -> None:
    ops = {op for op, _, _ in id_operations()}
    assert ops - TABLE.keys() - EXCLUDED.keys() == set(), "a new route with an id: say here what a stranger gets"
    assert TABLE.keys() - ops == set(), "the table names operations the API no longer has"


def test_another_tenant_gets_404_on_every_operation_and_changes_nothing(
    victim: httpx.Client, attacker: httpx.Client, owned: dict[str, str]
) -> None:
    before = state(victim, owned)
    tried = 0
    for op, method, path in id_operations():
        entry = TABLE.get(op, {})
        if op in EXCLUDED or entry.get("ws"):
            continue
        status = entry.get("status", 404)
        theirs = problem(call(attacker, method, path, owned, entry), status)
        nothing = problem(call(attacker, method, path, strangers_ids(), entry), status)
        # an object of another tenant is indistinguishable from one that does not exist
        assert (theirs["type"], theirs["title"]) == (nothing["type"], nothing["title"]), op
        for value in (owned["flowId"], owned["runId"], owned["triggerId"], owned["name"]):
            assert value not in json.dumps(theirs) or value in path.format(**owned), op
        tried += 1
    assert tried >= 25
    assert state(victim, owned) == before
    # and the attacker made nothing of its own on the way (no duplicate, no run, no trigger)
    assert attacker.get("/flows").json()["total"] == 0
    assert attacker.get("/runs").json()["total"] == 0


def test_an_admin_route_is_refused_to_a_member_whatever_tenant_it_names(
    attacker: httpx.Client, victim: httpx.Client, owned: dict[str, str]
) -> None:
    for tenant in (owned["tenantId"], tenant_of(attacker)):
        problem(attacker.put(f"/admin/tenants/{tenant}/plan", json={"plan": "enterprise"}), 403)
    assert victim.get("/usage").json()["plan"] == "enterprise"  # the stack's default, unchanged


def test_websockets_of_another_tenant_are_refused_before_the_upgrade(
    stack: ProcessStack, attacker: httpx.Client, owned: dict[str, str]
) -> None:
    ws_ops = [(op, path) for op, _, path in id_operations() if TABLE.get(op, {}).get("ws")]
    assert {op for op, _ in ws_ops} == {"watchRun", "watchFlow"}
    with_token = ["flowmesh.v1", "bearer." + bearer(attacker)]
    for _, path in ws_ops:
        assert refused(stack, path.format(**owned), with_token) == 404
    # a ticket is the attacker's own credential too: it names the attacker's tenant, not the victim's
    ticket = attacker.post("/ws-tickets").json()["ticket"]
    assert refused(stack, f"/ws/runs/{owned['runId']}?ticket={ticket}", ["flowmesh.v1"]) == 404


def test_no_list_shows_another_tenants_items(
    victim: httpx.Client, attacker: httpx.Client, owned: dict[str, str]
) -> None:
    assert attacker.post("/flows", json={"name": "attacker's own"}).status_code == 201
    victims = tenant_of(victim)
    lists: dict[str, httpx.Response] = {
        "flows": attacker.get("/flows", params={"pageSize": 100}),
        "runs": attacker.get("/runs", params={"pageSize": 100}),
        "runs of the victim's flow": attacker.get("/runs", params={"flowId": owned["flowId"]}),
        "secrets": attacker.get("/secrets"),
        "api-keys": attacker.get("/api-keys"),
        "audit": attacker.get("/audit", params={"pageSize": 100}),
        "usage": attacker.get("/usage"),
        "usage export": attacker.get("/usage/export"),
    }
    for name, r in lists.items():
        assert r.status_code == 200, (name, r.text)
        text = r.text
        for value in (owned["flowId"], owned["runId"], owned["triggerId"], owned["name"], victims):
            assert value not in text, (name, value)
    assert [f["name"] for f in lists["flows"].json()["items"]] == ["attacker's own"]
    assert lists["runs"].json()["total"] == 0 and lists["runs of the victim's flow"].json()["total"] == 0
    assert lists["secrets"].json()["items"] == [] and lists["api-keys"].json()["items"] == []
    assert lists["usage"].json()["runsUsed"] == 0
    audit = lists["audit"].json()["items"]
    assert audit and {e["tenantId"] for e in audit} == {tenant_of(attacker)}
    # naming the victim's tenant in a member's query is refused, not quietly answered
    problem(attacker.get("/audit", params={"tenantId": victims}), 403)
    # the victim's own lists do show them: the assertions above could fail
    assert owned["flowId"] in victim.get("/flows").text and owned["name"] in victim.get("/secrets").text
