"""Versions, publishing, triggers, export/import and the catalog through the gateway, end to end."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from stack import ProcessStack

PROBLEM = "application/problem+json"
CHAIN = {
    "nodes": [
        {"id": "start", "type": "trigger", "data": {}, "position": {"x": 0, "y": 0}},
        {"id": "a", "type": "transform", "data": {"output": {"v": "{{ input.v + 1 }}"}}, "width": 80},
    ],
    "edges": [{"id": "e", "source": "start", "target": "a"}],
}


def problem(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith(PROBLEM)
    return r.json()  # type: ignore[no-any-return]


def draft(c: httpx.Client, **body: Any) -> dict[str, Any]:
    body.setdefault("definition", CHAIN)
    r = c.post("/flows", json={"name": f"f-{uuid.uuid4().hex[:6]}", **body})
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def test_catalog_lists_every_step_type_with_its_schema(alice: httpx.Client) -> None:
    items = alice.get("/catalog/steps").json()["items"]
    by_type = {i["type"]: i for i in items}
    assert len(by_type) == 13
    assert by_type["condition"]["handles"] == ["true", "false"]
    assert "url" in by_type["http"]["dataSchema"]["properties"]
    assert "url" in by_type["http"]["dataSchema"]["required"]


def test_validate_publish_and_versions(alice: httpx.Client) -> None:
    flow = draft(alice)
    url = f"/flows/{flow['id']}"
    assert alice.post(url + "/validate").json() == {"valid": True, "errors": []}
    r = alice.post(url + "/publish")
    assert r.status_code == 201 and r.json()["version"] == 1 and r.json()["definition"] == CHAIN
    r = alice.post(url + "/publish")
    assert r.status_code == 200 and r.json()["version"] == 1
    got = alice.get(url).json()
    assert (got["status"], got["active"], got["activeVersion"], got["latestVersion"]) == ("published", True, 1, 1)
    alice.patch(url, json={"definition": {**CHAIN, "nodes": [*CHAIN["nodes"], {"id": "b", "type": "mystery"}]}})
    report = alice.post(url + "/validate").json()
    assert report["valid"] is False
    assert {e["path"] for e in report["errors"]} == {"/nodes/2/type", "/nodes/2"}
    body = problem(alice.post(url + "/publish"), 422)
    assert {e["path"] for e in body["errors"]} == {"/nodes/2/type", "/nodes/2"}
    assert alice.get(url + "/versions").json()["total"] == 1
    assert alice.get(url + "/versions/1").json()["definition"] == CHAIN
    problem(alice.get(url + "/versions/2"), 404)
    problem(alice.get(url + "/versions/abc"), 404)


def test_rollback_activate_deactivate_and_delete_rules(alice: httpx.Client) -> None:
    flow = draft(alice)
    url = f"/flows/{flow['id']}"
    alice.post(url + "/publish")
    alice.patch(url, json={"description": "second"})
    alice.patch(url, json={"inputSchema": {"type": "object"}})
    assert alice.post(url + "/publish").json()["version"] == 2
    r = alice.post(url + "/rollback", json={"version": 1})
    assert r.status_code == 200 and r.json()["activeVersion"] == 1 and r.json()["latestVersion"] == 2
    problem(alice.post(url + "/rollback", json={"version": 9}), 404)
    for bad in ({}, {"version": 0}, {"version": "one"}, {"version": 1, "why": "x"}):
        problem(alice.post(url + "/rollback", json=bad), 422)
    assert alice.post(url + "/deactivate").json()["active"] is False
    assert alice.post(url + "/activate").json()["active"] is True
    assert "force=true" in problem(alice.delete(url), 409)["detail"]
    assert alice.delete(url, params={"force": "true"}).status_code == 204
    problem(alice.get(url), 404)


def test_duplicate_export_import_round_trip(alice: httpx.Client, stack: ProcessStack) -> None:
    flow = draft(alice, description="d", inputSchema={"type": "object"}, settings={"runTimeoutMs": 60000})
    url = f"/flows/{flow['id']}"
    alice.post(url + "/triggers", json={"type": "webhook", "name": "in", "config": {"signed": True}})
    alice.post(url + "/triggers", json={"type": "event", "name": "ev", "config": {"eventType": "order.paid"}})
    copy = alice.post(url + "/duplicate")
    assert copy.status_code == 201 and copy.json()["name"] == flow["name"] + " (copy)"
    doc = alice.get(url + "/export").json()
    assert doc["formatVersion"] == 1 and len(doc["flow"]["triggers"]) == 2
    assert doc["flow"]["definition"] == CHAIN and doc["flow"]["settings"] == {"runTimeoutMs": 60000}
    r = alice.post("/flows/import", json=doc)
    assert r.status_code == 201, r.text
    hook = next(t for t in r.json()["triggers"] if t["type"] == "webhook")
    assert hook["url"].startswith(stack.base + "/api/v1/hooks/") and hook["secret"].startswith("whsec_")
    assert alice.get(f"/flows/{r.json()['id']}/export").json() == doc
    problem(alice.post("/flows/import", json={**doc, "formatVersion": 2}), 422)
    problem(alice.post("/flows/import", json={"formatVersion": 1}), 422)
    problem(alice.post("/flows/import", json={**doc, "extra": True}), 422)
    problem(alice.post("/flows/import", json=[doc]), 422)


def test_trigger_crud_and_validation(alice: httpx.Client, stack: ProcessStack) -> None:
    flow = draft(alice)
    url = f"/flows/{flow['id']}/triggers"
    r = alice.post(url, json={"type": "webhook", "name": "plain"})
    assert r.status_code == 201 and r.json()["url"].startswith(stack.base + "/api/v1/hooks/")
    assert "secret" not in r.json()
    hook_id = r.json()["id"]
    sched = alice.post(
        url, json={"type": "schedule", "name": "s", "config": {"cron": "0 0 9 * * MON", "timezone": "America/New_York"}}
    )
    assert sched.status_code == 201 and sched.json()["config"]["misfire"] == "skip"
    listed = alice.get(url).json()["items"]
    assert [t["id"] for t in listed] == [hook_id, sched.json()["id"]] and "url" not in listed[0]
    r = alice.patch(f"/triggers/{sched.json()['id']}", json={"enabled": False, "config": {"cron": "*/2 * * * *"}})
    assert r.status_code == 200 and r.json()["enabled"] is False and r.json()["config"]["cron"] == "*/2 * * * *"
    assert alice.delete(f"/triggers/{hook_id}").status_code == 204
    problem(alice.delete(f"/triggers/{hook_id}"), 404)

    bad = [
        ({"type": "schedule", "name": "x", "config": {"cron": "every day"}}, "/config/cron"),
        (
            {"type": "schedule", "name": "x", "config": {"cron": "* * * * *", "timezone": "Nowhere/City"}},
            "/config/timezone",
        ),
        ({"type": "event", "name": "x", "config": {"eventType": "a.*"}}, "/config/eventType"),
        ({"type": "event", "name": "x", "config": {"eventType": "a", "filter": "event.x >"}}, "/config/filter"),
        ({"type": "carrier-pigeon", "name": "x"}, "/type"),
        ({"type": "webhook", "name": ""}, "/name"),
        ({"type": "webhook", "name": "x", "secret": "mine"}, "/secret"),
    ]
    for body, path in bad:
        assert path in [e["path"] for e in problem(alice.post(url, json=body), 422)["errors"]], body
    problem(alice.patch(f"/triggers/{sched.json()['id']}", json={"config": {"cron": "nope"}}), 422)
    assert len(alice.get(url).json()["items"]) == 1


def test_every_lifecycle_endpoint_hides_other_tenants_flows(alice: httpx.Client, mallory: httpx.Client) -> None:
    flow = draft(alice)
    url = f"/flows/{flow['id']}"
    alice.post(url + "/publish")
    trig = alice.post(url + "/triggers", json={"type": "webhook", "name": "h"}).json()
    calls = [
        ("POST", url + "/validate", None),
        ("POST", url + "/publish", None),
        ("GET", url + "/versions", None),
        ("GET", url + "/versions/1", None),
        ("POST", url + "/rollback", {"version": 1}),
        ("POST", url + "/activate", None),
        ("POST", url + "/deactivate", None),
        ("POST", url + "/duplicate", None),
        ("GET", url + "/export", None),
        ("GET", url + "/triggers", None),
        ("POST", url + "/triggers", {"type": "webhook", "name": "x"}),
        ("PATCH", f"/triggers/{trig['id']}", {"enabled": False}),
        ("DELETE", f"/triggers/{trig['id']}", None),
    ]
    for method, path, body in calls:
        problem(mallory.request(method, path, json=body), 404)
    assert alice.get(url).json()["active"] is True
    assert alice.get(url + "/triggers").json()["items"][0]["enabled"] is True


@pytest.mark.parametrize("path", ["/flows/not-a-uuid/publish", f"/flows/{uuid.uuid4()}/publish"])
def test_missing_flows_are_404(alice: httpx.Client, path: str) -> None:
    problem(alice.post(path), 404)
