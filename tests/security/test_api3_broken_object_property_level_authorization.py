"""OWASP API3:2023 Broken Object Property Level Authorization.

The risk for Flowmesh: objects have properties a client must not set (a flow's ``id``, ``tenantId``,
``revision``, ``status``, ``activeVersion``; a trigger's ``url`` and signing ``secret``; a run's
``status``) and properties a client must never read back (a secret's value, a provider key, a
webhook's token and signing secret after creation, sealed ciphertext). Mass assignment of the first
kind moves objects between tenants or skips the publish/activate rules; exposure of the second hands
out credentials.

What these tests prove: every create/update body refuses read-only properties with a 422 naming
them and changes nothing (the gateway reads bodies strictly, ``additionalProperties: false``); an
imported document's ids and tenant are the importer's, never the ones written in it; a webhook's URL
and secret are shown once, in the answer that made them, and in no later read, export or list; no
answer carries a secret's value, a key, ciphertext or another tenant's id. Deeper tests:
``tests/e2e/test_flows_api.py`` (bad bodies), ``test_secrets.py`` and ``test_usage.py`` (values
never recorded or logged), ``test_audit.py`` (no values in the log).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import pytest

from attacks import problem, tenant_of
from flowmesh.contracts.testing import linear, node
from stack import publish_flow, wait_run

SECRET_VALUE = "s3cr3t-" + uuid.uuid4().hex
KEY_VALUE = "sk-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def flow(victim: httpx.Client) -> dict[str, Any]:
    flow_id = publish_flow(victim, linear(node("a")))
    found: dict[str, Any] = victim.get(f"/flows/{flow_id}").json()
    return found


def refused_naming(r: httpx.Response, field: str) -> None:
    body = problem(r, 422)
    assert field in json.dumps(body), (field, body)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("id", "0190d1e2-0000-7000-8000-000000000000"),
        ("tenantId", "someone-else"),
        ("revision", 99),
        ("status", "published"),
        ("active", True),
        ("activeVersion", 1),
        ("latestVersion", 7),
        ("createdAt", "2000-01-01T00:00:00Z"),
    ],
)
def test_read_only_flow_properties_are_refused_on_create_and_update(
    victim: httpx.Client, flow: dict[str, Any], field: str, value: Any
) -> None:
    total = victim.get("/flows").json()["total"]
    refused_naming(victim.post("/flows", json={"name": "mass", field: value}), field)
    assert victim.get("/flows").json()["total"] == total
    refused_naming(victim.patch(f"/flows/{flow['id']}", json={field: value}), field)
    refused_naming(victim.put(f"/flows/{flow['id']}", json={"name": flow["name"], field: value}), field)
    assert victim.get(f"/flows/{flow['id']}").json() == flow


def test_read_only_trigger_run_secret_and_key_properties_are_refused(
    victim: httpx.Client, flow: dict[str, Any]
) -> None:
    fid = flow["id"]
    hook = {"type": "webhook", "name": "in"}
    for field, value in (
        ("id", "t1"),
        ("flowId", "another"),
        ("url", "https://evil.example/hook"),
        ("secret", "whsec_" + "A" * 44),
        ("createdAt", "2000-01-01T00:00:00Z"),
    ):
        refused_naming(victim.post(f"/flows/{fid}/triggers", json={**hook, field: value}), field)
    # the signing secret cannot be chosen through the config either
    refused_naming(
        victim.post(f"/flows/{fid}/triggers", json={**hook, "config": {"signed": True, "secret": "whsec_x"}}), "secret"
    )
    assert victim.get(f"/flows/{fid}/triggers").json()["items"] == []
    r = victim.post(f"/flows/{fid}/triggers", json=hook)
    assert r.status_code == 201
    trigger_id = r.json()["id"]
    for field in ("url", "secret", "flowId", "type"):
        refused_naming(victim.patch(f"/triggers/{trigger_id}", json={field: "x"}), field)
    for field, value in (("status", "succeeded"), ("tenantId", "x"), ("id", "r1"), ("output", {})):
        refused_naming(victim.post(f"/flows/{fid}/runs", json={"input": {}, field: value}), field)
    refused_naming(victim.post("/secrets", json={"name": "S", "value": "v", "hint": "…0000"}), "hint")
    refused_naming(victim.post("/api-keys", json={"provider": "openai", "apiKey": "sk-x", "keyHint": "x"}), "keyHint")
    assert victim.get("/runs", params={"flowId": fid}).json()["total"] == 0
    assert victim.get("/secrets").json()["items"] == []


def test_an_import_takes_no_id_or_tenant_from_the_document(victim: httpx.Client, attacker: httpx.Client) -> None:
    flow_id = publish_flow(victim, linear(node("a")))
    doc = victim.get(f"/flows/{flow_id}/export").json()
    doc["flow"]["id"] = flow_id
    doc["flow"]["tenantId"] = tenant_of(victim)
    r = attacker.post("/flows/import", json=doc)
    assert r.status_code == 201, r.text
    made = r.json()
    assert made["id"] != flow_id and made["tenantId"] == tenant_of(attacker)
    assert victim.get(f"/flows/{flow_id}").json()["tenantId"] == tenant_of(victim)


def test_a_webhooks_url_and_secret_are_shown_once(victim: httpx.Client) -> None:
    flow_id = publish_flow(victim, linear(node("a")))
    r = victim.post(f"/flows/{flow_id}/triggers", json={"type": "webhook", "name": "in", "config": {"signed": True}})
    assert r.status_code == 201
    made = r.json()
    url, secret = made["url"], made["secret"]
    assert url and secret.startswith("whsec_")
    token = url.rsplit("/", 1)[1]
    later = [
        victim.get(f"/flows/{flow_id}/triggers"),
        victim.patch(f"/triggers/{made['id']}", json={"name": "renamed"}),
        victim.get(f"/flows/{flow_id}/export"),
        victim.get(f"/flows/{flow_id}"),
        victim.get("/audit", params={"targetId": made["id"]}),
    ]
    for answer in later:
        assert answer.status_code == 200, answer.text
        assert secret not in answer.text and token not in answer.text, answer.request.url


def test_no_answer_carries_a_secret_value_a_key_or_ciphertext(victim: httpx.Client) -> None:
    r = victim.post("/secrets", json={"name": "DB_PASSWORD", "value": SECRET_VALUE})
    assert r.status_code == 201 and set(r.json()) == {"name", "hint", "createdAt", "updatedAt"}
    r = victim.post("/api-keys", json={"provider": "openai", "apiKey": KEY_VALUE})
    assert r.status_code == 201 and set(r.json()) <= {"provider", "keyHint", "createdAt", "lastUsedAt"}
    flow_id = publish_flow(victim, linear(node("t")))
    run_id = victim.post(f"/flows/{flow_id}/runs", json={"input": {}}).json()["id"]
    wait_run(victim, run_id)
    answers = [
        victim.get("/secrets"),
        victim.get("/api-keys"),
        victim.get("/audit", params={"pageSize": 100}),
        victim.get(f"/runs/{run_id}"),
        victim.get(f"/runs/{run_id}/steps"),
        victim.get("/usage"),
    ]
    for answer in answers:
        assert answer.status_code == 200, answer.text
        text = answer.text
        assert SECRET_VALUE not in text and KEY_VALUE not in text, answer.request.url
        for internal in ("ciphertext", "sealed", "nonce", "apiKey", "value", "secret", "key"):
            assert f'"{internal}":' not in text, (internal, answer.request.url)
    hints = {s["name"]: s["hint"] for s in answers[0].json()["items"]}
    assert hints["DB_PASSWORD"] == "…" + SECRET_VALUE[-4:]
