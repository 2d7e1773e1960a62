"""OWASP API5:2023 Broken Function Level Authorization.

The risk for Flowmesh: some functions belong to the platform operator (a token with ``role: admin``:
changing a tenant's plan, reading the audit log across tenants) and some to one service only (the
runner reveals stored keys and secrets, ``service:runner``). A member reaching an operator function
could give itself the enterprise plan; anyone reaching the reveal functions reads every tenant's
credentials.

What these tests prove: admin routes are 403 to members, whichever tenant they name, and change
nothing; an operator's token is no master key to tenants' data: in its own tenant it sees no other
tenant's flows, runs or secrets, and only the admin routes act across tenants, as ``docs/decisions.md``
designs it (plans; the audit log with ``tenantId``). Behind the gateway, the services themselves
refuse a forged role over NATS: a member's ``plan.set`` and anyone but the runner asking to reveal a
key or secret (the operator included) are refused. Who may send such headers at all is NATS's
permissions, tested in ``tests/security/test_nats_permissions.py``; roles a token may carry are
tested in ``tests/e2e/test_gateway_rules.py``, plan changes in ``tests/e2e/test_usage.py``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from attacks import problem, tenant_of
from flowmesh.contracts.errors import Forbidden
from flowmesh.contracts.models.usage import KEYS_REVEAL_ROLE
from flowmesh.contracts.subjects import UsageOp
from flowmesh.contracts.testing import linear, node
from flowmesh.runtime.testing import rpc_client
from stack import ProcessStack, publish_flow


@pytest.fixture(scope="module")
def operator(stack: ProcessStack) -> Iterator[httpx.Client]:
    """The platform operator: ``role: admin``, in a tenant of its own."""
    with stack.client(f"ops-{uuid.uuid4().hex[:8]}", role="admin") as c:
        yield c


@pytest.fixture(scope="module")
def victims(victim: httpx.Client) -> dict[str, str]:
    flow_id = publish_flow(victim, linear(node("a")))
    run_id = victim.post(f"/flows/{flow_id}/runs", json={"input": {}}).json()["id"]
    assert victim.post("/secrets", json={"name": "VICTIM_TOKEN", "value": "victim-value-123456"}).status_code == 201
    assert victim.post("/api-keys", json={"provider": "openai", "apiKey": "sk-victim-key-123456"}).status_code == 201
    return {"flowId": flow_id, "runId": run_id, "tenant": tenant_of(victim)}


def test_admin_routes_are_403_to_members_and_change_nothing(
    victim: httpx.Client, attacker: httpx.Client, victims: dict[str, str]
) -> None:
    for tenant in (victims["tenant"], tenant_of(attacker), "any-tenant"):
        problem(attacker.put(f"/admin/tenants/{tenant}/plan", json={"plan": "enterprise"}), 403)
        problem(attacker.put(f"/admin/tenants/{tenant}/plan", json={"plan": "free"}), 403)
    problem(attacker.get("/audit", params={"tenantId": victims["tenant"]}), 403)
    assert victim.get("/usage").json()["plan"] == "enterprise"
    assert not [e for e in victim.get("/audit").json()["items"] if e["action"] == "plan.changed"]


def test_an_operator_token_is_no_master_key_to_tenant_data(operator: httpx.Client, victims: dict[str, str]) -> None:
    problem(operator.get(f"/flows/{victims['flowId']}"), 404)
    problem(operator.get(f"/runs/{victims['runId']}"), 404)
    problem(operator.post(f"/flows/{victims['flowId']}/runs", json={"input": {}}), 404)
    problem(operator.delete("/secrets/VICTIM_TOKEN"), 404)
    problem(operator.delete("/api-keys/openai"), 404)
    assert operator.get("/flows").json()["total"] == 0
    assert operator.get("/secrets").json()["items"] == []


def test_the_admin_routes_act_across_tenants_for_the_operator_only(
    operator: httpx.Client, victim: httpx.Client, victims: dict[str, str]
) -> None:
    audit = operator.get("/audit", params={"tenantId": victims["tenant"], "pageSize": 100})
    assert audit.status_code == 200
    assert {e["tenantId"] for e in audit.json()["items"]} == {victims["tenant"]}
    assert {e["target"]["id"] for e in audit.json()["items"]} >= {victims["flowId"], "VICTIM_TOKEN", "openai"}
    r = operator.put(f"/admin/tenants/{victims['tenant']}/plan", json={"plan": "pro"})
    assert r.status_code == 200, r.text
    assert victim.get("/usage").json()["plan"] == "pro"
    assert operator.put(f"/admin/tenants/{victims['tenant']}/plan", json={"plan": "enterprise"}).status_code == 200


async def _as(nats_url: str, subject: str, body: dict[str, Any], *, tenant: str, role: str) -> Any:
    async with rpc_client(nats_url, name="forger") as rpc:
        return await rpc.call(subject, body, tenant=tenant, role=role)


@pytest.mark.parametrize(
    ("subject", "body", "role"),
    [
        (UsageOp.PLAN_SET, {"tenantId": "{tenant}", "plan": "enterprise"}, "member"),
        (UsageOp.KEYS_REVEAL, {"provider": "openai"}, "member"),
        (UsageOp.KEYS_REVEAL, {"provider": "openai"}, "admin"),
        (UsageOp.SECRETS_REVEAL, {"names": ["VICTIM_TOKEN"]}, "member"),
        (UsageOp.SECRETS_REVEAL, {"names": ["VICTIM_TOKEN"]}, "admin"),
        (UsageOp.SECRETS_REVEAL, {"names": ["VICTIM_TOKEN"]}, "service:flows"),
    ],
)
def test_the_services_refuse_a_forged_role_over_nats(
    infra: Any, victims: dict[str, str], subject: str, body: dict[str, Any], role: str
) -> None:
    tenant = victims["tenant"]
    filled = {k: (v.format(tenant=tenant) if isinstance(v, str) else v) for k, v in body.items()}
    with pytest.raises(Forbidden):
        asyncio.run(_as(infra.nats_url, subject, filled, tenant=tenant, role=role))
    # the runner's role is what the subject is for: the refusal above is about the role alone
    if subject == UsageOp.SECRETS_REVEAL:
        revealed = asyncio.run(_as(infra.nats_url, subject, filled, tenant=tenant, role=KEYS_REVEAL_ROLE))
        assert revealed["values"] == {"VICTIM_TOKEN": "victim-value-123456"}
