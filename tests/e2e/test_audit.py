"""The audit log over real HTTP: every change once, with its actor and target, in order; nothing for a
refused change; tenants see their own, admins every tenant's; pages across both services complete;
the tables refuse to be rewritten."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import httpx
import jwt
import pytest

from stack import ProcessStack, chain

DEFINITION = chain(1)


@pytest.fixture
def admin(stack: ProcessStack) -> Iterator[httpx.Client]:
    with stack.client(f"ops-{uuid.uuid4().hex[:6]}", role="admin") as client:
        yield client


@pytest.fixture
def team(stack: ProcessStack) -> Iterator[tuple[str, httpx.Client, httpx.Client]]:
    """A fresh tenant with two members, alice and bob."""
    tenant = f"acme-{uuid.uuid4().hex[:8]}"
    with stack.client(f"alice-{tenant}", tenant=tenant) as a, stack.client(f"bob-{tenant}", tenant=tenant) as b:
        yield tenant, a, b


def read_all(c: httpx.Client, page_size: int = 100, **params: Any) -> list[dict[str, Any]]:
    """Every entry, following ``next`` (bounded)."""
    items: list[dict[str, Any]] = []
    cursor = None
    for _ in range(200):
        r = c.get("/audit", params={"pageSize": page_size, **params, **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200, r.text
        page = r.json()
        assert len(page["items"]) <= page_size
        items += page["items"]
        cursor = page.get("next")
        if cursor is None:
            return items
    raise AssertionError("the audit log did not end within 200 pages")


def sub_of(c: httpx.Client) -> str:
    """The ``sub`` of a client's token."""
    token = c.headers["Authorization"].removeprefix("Bearer ")
    return str(jwt.decode(token, options={"verify_signature": False})["sub"])


def ok(r: httpx.Response, status: int = 200) -> dict[str, Any]:
    assert r.status_code == status, r.text
    return r.json() if r.content else {}


def test_each_change_is_one_entry_with_its_actor_and_target_newest_first(
    team: tuple[str, httpx.Client, httpx.Client], admin: httpx.Client
) -> None:
    tenant, alice, bob = team
    flow = ok(alice.post("/flows", json={"name": "orders", "definition": DEFINITION}), 201)
    fid = flow["id"]
    ok(bob.patch(f"/flows/{fid}", json={"name": "orders v2"}))
    ok(alice.put(f"/flows/{fid}", json={"name": "orders v2", "definition": DEFINITION, "description": "d"}))
    ok(alice.post(f"/flows/{fid}/publish"), 201)
    ok(alice.post(f"/flows/{fid}/publish"))  # the same content again: no new version, no entry
    ok(alice.patch(f"/flows/{fid}", json={"definition": chain(2)}))
    ok(alice.post(f"/flows/{fid}/publish"), 201)
    ok(bob.post(f"/flows/{fid}/rollback", json={"version": 1}))
    ok(bob.post(f"/flows/{fid}/deactivate"))
    ok(bob.post(f"/flows/{fid}/activate"))
    trig = ok(alice.post(f"/flows/{fid}/triggers", json={"type": "webhook", "name": "in"}), 201)
    ok(alice.patch(f"/triggers/{trig['id']}", json={"name": "inbound"}))
    ok(bob.delete(f"/triggers/{trig['id']}"), 204)
    ok(alice.post("/api-keys", json={"provider": "openai", "apiKey": "sk-never-shown-wxyz"}), 201)
    ok(bob.delete("/api-keys/openai"), 204)
    ok(alice.post("/secrets", json={"name": "CRM_TOKEN", "value": "crm-never-shown-5678"}), 201)
    ok(bob.delete("/secrets/CRM_TOKEN"), 204)
    ok(admin.put(f"/admin/tenants/{tenant}/plan", json={"plan": "enterprise"}))
    ok(alice.delete(f"/flows/{fid}", params={"force": "true"}), 204)

    got = read_all(alice)
    a, b, ops = sub_of(alice), sub_of(bob), sub_of(admin)
    assert [(e["action"], e["actor"], e["target"]["type"], e["target"]["id"]) for e in reversed(got)] == [
        ("flow.created", a, "flow", fid),
        ("flow.updated", b, "flow", fid),
        ("flow.updated", a, "flow", fid),
        ("flow.published", a, "flow", fid),
        ("flow.updated", a, "flow", fid),
        ("flow.published", a, "flow", fid),
        ("flow.rolledBack", b, "flow", fid),
        ("flow.deactivated", b, "flow", fid),
        ("flow.activated", b, "flow", fid),
        ("trigger.created", a, "trigger", trig["id"]),
        ("trigger.updated", a, "trigger", trig["id"]),
        ("trigger.deleted", b, "trigger", trig["id"]),
        ("apiKey.put", a, "apiKey", "openai"),
        ("apiKey.deleted", b, "apiKey", "openai"),
        ("secret.put", a, "secret", "CRM_TOKEN"),
        ("secret.deleted", b, "secret", "CRM_TOKEN"),
        ("plan.changed", ops, "tenant", tenant),
        ("flow.deleted", a, "flow", fid),
    ]
    assert {e["tenantId"] for e in got} == {tenant}
    assert [(e["at"], e["id"]) for e in got] == sorted(((e["at"], e["id"]) for e in got), reverse=True)
    assert got[1]["details"]["plan"] == "enterprise"
    text = str(got)
    # nor its last characters (a key's hint): not hex digits, which every id in the text is made of
    assert "sk-never-shown" not in text and "wxyz" not in text and trig["url"].rsplit("/", 1)[-1] not in text
    assert "never-shown-5678" not in text


def test_a_refused_change_records_nothing(team: tuple[str, httpx.Client, httpx.Client], admin: httpx.Client) -> None:
    tenant, alice, _ = team
    fid = ok(alice.post("/flows", json={"name": "f", "definition": DEFINITION}), 201)["id"]
    assert alice.post("/flows", json={"name": "", "definition": DEFINITION}).status_code == 422
    assert alice.patch(f"/flows/{fid}", json={"name": "x"}, headers={"If-Match": '"7"'}).status_code == 412
    ok(alice.post(f"/flows/{fid}/publish"), 201)
    assert alice.delete(f"/flows/{fid}").status_code == 409
    assert alice.post(f"/flows/{fid}/rollback", json={"version": 9}).status_code == 404
    assert alice.post(f"/flows/{fid}/triggers", json={"type": "schedule", "name": "s", "config": {}}).status_code == 422
    assert alice.delete("/api-keys/openai").status_code == 404
    assert alice.post("/api-keys", json={"provider": "openai", "apiKey": "has spaces"}).status_code == 422
    assert alice.put(f"/admin/tenants/{tenant}/plan", json={"plan": "pro"}).status_code == 403
    assert admin.put(f"/admin/tenants/{tenant}/plan", json={"plan": "gold"}).status_code == 422
    assert [e["action"] for e in read_all(alice)] == ["flow.published", "flow.created"]


def test_tenants_see_only_their_own_and_admins_see_and_filter_every_tenant(
    stack: ProcessStack, admin: httpx.Client
) -> None:
    ta, tb = f"ta-{uuid.uuid4().hex[:8]}", f"tb-{uuid.uuid4().hex[:8]}"
    with stack.client(f"u-{ta}", tenant=ta) as a, stack.client(f"u-{tb}", tenant=tb) as b:
        fa = ok(a.post("/flows", json={"name": "a", "definition": DEFINITION}), 201)["id"]
        ok(a.post("/api-keys", json={"provider": "openai", "apiKey": "sk-aaaaaaaa"}), 201)
        fb = ok(b.post("/flows", json={"name": "b", "definition": DEFINITION}), 201)["id"]

        assert [e["target"]["id"] for e in read_all(b)] == [fb]
        assert b.get("/audit", params={"targetId": fa}).json()["items"] == []
        assert b.get("/audit", params={"tenantId": ta}).status_code == 403
        assert [e["target"]["id"] for e in read_all(b, tenantId=tb)] == [fb]
        assert [e["target"]["id"] for e in read_all(a)] == ["openai", fa]

        assert [e["target"]["id"] for e in read_all(admin, tenantId=ta)] == ["openai", fa]
        assert [e["target"]["id"] for e in read_all(admin, tenantId=tb)] == [fb]
        # without tenantId, every tenant's: the newest entries include both of these tenants'
        newest = admin.get("/audit", params={"pageSize": 100, "since": read_all(a)[-1]["at"]}).json()["items"]
        assert {ta, tb} <= {e["tenantId"] for e in newest}
        assert [e["tenantId"] for e in read_all(admin, targetId=fb)] == [tb]
        assert [e["target"]["id"] for e in read_all(admin, tenantId=ta, action="apiKey.put")] == ["openai"]


def test_pages_across_both_services_are_complete_without_duplicates(
    team: tuple[str, httpx.Client, httpx.Client],
) -> None:
    _, alice, _ = team
    for i in range(6):
        fid = ok(alice.post("/flows", json={"name": f"f{i}", "definition": DEFINITION}), 201)["id"]
        ok(alice.post("/api-keys", json={"provider": f"p{i}", "apiKey": "sk-bbbbbbbb"}), 201)
        ok(alice.post(f"/flows/{fid}/deactivate"))
    whole = read_all(alice)
    assert len(whole) == 18
    for size in (1, 2, 5, 7):
        paged = read_all(alice, page_size=size)
        assert [e["id"] for e in paged] == [e["id"] for e in whole]

    # entries added while paging are newer than the cursor: the pages still hold exactly the log as it was
    first = ok(alice.get("/audit", params={"pageSize": 4}))
    ok(alice.post("/flows", json={"name": "late", "definition": DEFINITION}), 201)
    rest = read_all(alice, page_size=4, cursor=first["next"])
    assert [e["id"] for e in first["items"] + rest] == [e["id"] for e in whole]

    since, until = whole[10]["at"], whole[3]["at"]
    window = read_all(alice, page_size=2, since=since, until=until)
    assert all(since <= e["at"] < until for e in window)
    assert {e["id"] for e in whole if since <= e["at"] < until} == {e["id"] for e in window}


@pytest.mark.parametrize(
    "params",
    [
        {"pageSize": "0"},
        {"pageSize": "101"},
        {"pageSize": "ten"},
        {"cursor": "not-a-cursor"},
        {"cursor": "MjAyNi0wMS0wMVQwMDowMDowMC4wMDBaL25vdC1hbi1pZA"},  # a time and no uuid
        {"action": "flow.exploded"},
        {"since": "1700000000"},
        {"until": "yesterday"},
        {"targetId": "x" * 256},
        {"tenantId": "x" * 256},
    ],
)
def test_bad_query_parameters_are_422(alice: httpx.Client, params: dict[str, str]) -> None:
    r = alice.get("/audit", params=params)
    assert r.status_code == 422, r.text
    assert r.headers["Content-Type"].startswith("application/problem+json")


def test_the_audit_tables_refuse_update_and_delete(infra: Any, team: tuple[str, httpx.Client, httpx.Client]) -> None:
    tenant, alice, _ = team
    ok(alice.post("/flows", json={"name": "f", "definition": DEFINITION}), 201)
    ok(alice.post("/api-keys", json={"provider": "openai", "apiKey": "sk-cccccccc"}), 201)

    async def tamper() -> list[str]:
        conn = await asyncpg.connect(infra.database_url.replace("postgresql+asyncpg", "postgresql"))
        refused = []
        try:
            for schema in ("flows", "usage"):
                for sql in (
                    f"UPDATE {schema}.audit SET actor = 'mallory' WHERE tenant_id = $1",
                    f"DELETE FROM {schema}.audit WHERE tenant_id = $1",
                ):
                    try:
                        await conn.execute(sql, tenant)
                    except asyncpg.InsufficientPrivilegeError as exc:
                        refused.append(str(exc))
        finally:
            await conn.close()
        return refused

    refused = asyncio.run(tamper())
    assert len(refused) == 4 and all("append-only" in m for m in refused)
    assert [e["actor"] for e in read_all(alice)] == [sub_of(alice)] * 2
