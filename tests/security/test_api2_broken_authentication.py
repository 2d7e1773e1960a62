"""OWASP API2:2023 Broken Authentication.

The risk for Flowmesh: the gateway trusts a bearer JWT's ``tenant`` and ``role`` claims, a webhook
trusts its signature, a browser's WebSocket trusts a ticket. A token accepted without its signature,
algorithm, lifetime, issuer and audience checked would let anyone name any tenant; a signed webhook
delivery that could be replayed, or a ticket used twice, would start runs or open streams for
whoever captured one.

What these tests prove, as an attacker holding only public knowledge and captured traffic: tokens
forged to name the victim's tenant (``alg: none``, another key, an HMAC keyed with the public RSA
key's text, expired, another issuer or audience, a tampered payload, missing claims, an unknown role,
a ticket or a query parameter instead of a header) are 401 on reads and writes and change nothing; a
captured signed webhook cannot be re-signed under another id, timestamp or body, is refused outside
±5 minutes, and replayed as captured it starts no second run; a WebSocket ticket opens one stream
once and is no HTTP credential. Deeper tests: ``tests/e2e/test_flows_api.py`` (malformed tokens),
``test_jwks.py`` (RS256/ES256 rotation and HS/RS confusion against a real JWKS),
``test_gateway_rules.py`` (``sub``/``tenant``/``role`` spelling), ``test_webhooks.py``, ``test_live.py``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from attacks import problem, tenant_of
from flowmesh.contracts.testing import linear, node
from stack import SECRET, ProcessStack, open_ws, publish_flow, refused, signed_headers, token, wait_run


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def forgeries(tenant: str) -> dict[str, str]:
    """Tokens an attacker can make that all name the victim's tenant."""
    now = int(time.time())
    claims = {"sub": tenant, "tenant": tenant, "role": "admin", "iss": "flowmesh", "aud": "flowmesh", "exp": now + 600}
    good = token(tenant)
    head, payload, sig = good.split(".")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    tampered = json.loads(base64.urlsafe_b64decode(payload + "=="))
    tampered["role"] = "admin"
    return {
        "alg none": f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims)}.",
        "alg None spelled otherwise": f"{b64({'alg': 'None', 'typ': 'JWT'})}.{b64(claims)}.",
        "signed with another secret": token(tenant, secret="attacker-" + "0" * 40),
        "HS256 keyed with a public key's text": _hs256_raw(claims, public_pem),
        "RS256 with the attacker's own key": jwt.encode(claims, rsa_key, algorithm="RS256"),
        "HS512 with the right secret": token(tenant, alg="HS512"),
        "expired an hour ago": token(tenant, exp_in=-3600),
        "another issuer": token(tenant, iss="https://evil.example"),
        "another audience": token(tenant, aud="another-api"),
        "payload tampered after signing": f"{head}.{b64(tampered)}.{sig}",
        "signature cut off": f"{head}.{payload}.",
        "no exp": jwt.encode({k: v for k, v in claims.items() if k != "exp"}, SECRET, algorithm="HS256"),
        "no sub": jwt.encode({k: v for k, v in claims.items() if k != "sub"}, SECRET, algorithm="HS256"),
        "unknown role": token(tenant, role="superuser"),
        "a service's role": token(tenant, role="service:runner"),
    }


def _hs256_raw(claims: dict[str, Any], key: bytes) -> str:
    """HS256 keyed with ``key``, whatever it is (PyJWT refuses a PEM as an HMAC key, an attacker does not)."""
    signing_input = f"{b64({'alg': 'HS256', 'typ': 'JWT'})}.{b64(claims)}"
    mac = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def victims_flow(victim: httpx.Client) -> str:
    return publish_flow(victim, linear(node("a")))


def test_forged_tokens_naming_the_victims_tenant_are_401_and_change_nothing(
    stack: ProcessStack, victim: httpx.Client, victims_flow: str
) -> None:
    before = victim.get(f"/flows/{victims_flow}").json()
    runs_before = victim.get("/runs", params={"flowId": victims_flow}).json()["total"]
    api = stack.base + "/api/v1"
    for case, forged in forgeries(tenant_of(victim)).items():
        auth = {"Authorization": f"Bearer {forged}"}
        for method, path, body in (
            ("GET", f"/flows/{victims_flow}", None),
            ("PATCH", f"/flows/{victims_flow}", {"name": "forged"}),
            ("POST", f"/flows/{victims_flow}/runs", {"input": {}}),
            ("DELETE", f"/flows/{victims_flow}", None),
            ("PUT", f"/admin/tenants/{tenant_of(victim)}/plan", {"plan": "free"}),
        ):
            r = httpx.request(method, api + path, headers=auth, json=body, timeout=10)
            detail = problem(r, 401)["detail"]
            assert forged not in detail, case  # a refusal never echoes the token
            assert r.headers.get("WWW-Authenticate", "Bearer").startswith("Bearer"), case
    assert victim.get(f"/flows/{victims_flow}").json() == before
    assert victim.get("/runs", params={"flowId": victims_flow}).json()["total"] == runs_before
    assert victim.get("/usage").json()["plan"] == "enterprise"


def test_credentials_anywhere_but_the_authorization_header_are_ignored(
    stack: ProcessStack, victim: httpx.Client
) -> None:
    good = str(victim.headers["Authorization"]).removeprefix("Bearer ")
    api = stack.base + "/api/v1/flows"
    problem(httpx.get(api, params={"access_token": good}, timeout=10), 401)
    problem(httpx.get(api, cookies={"token": good}, timeout=10), 401)
    problem(httpx.get(api, headers={"Authorization": f"Token {good}"}, timeout=10), 401)
    problem(httpx.get(api, headers={"X-Api-Key": good}, timeout=10), 401)
    assert httpx.get(api, headers={"Authorization": f"Bearer {good}"}, timeout=10).status_code == 200


ECHO = linear(node("echo", output={"body": "{{ input.body }}"}))


def test_a_captured_signed_webhook_cannot_be_replayed_or_re_signed(victim: httpx.Client, victims_flow: str) -> None:
    flow_id = publish_flow(victim, ECHO)
    r = victim.post(f"/flows/{flow_id}/triggers", json={"type": "webhook", "name": "in", "config": {"signed": True}})
    assert r.status_code == 201, r.text
    url, secret = r.json()["url"], r.json()["secret"]
    body = json.dumps({"amount": 10}).encode()
    captured = signed_headers(secret, body)
    with httpx.Client(timeout=15) as public:
        first = public.post(url, content=body, headers=captured)
        assert first.status_code == 202, first.text
        run_id = first.json()["runId"]
        # the same delivery again: the same run, none started
        assert public.post(url, content=body, headers=captured).json() == {"runId": run_id}
        # the captured signature under another id, another time or another body: not ours
        for changed in (
            {**captured, "webhook-id": f"msg_{uuid.uuid4().hex}"},
            {**captured, "webhook-timestamp": str(int(captured["webhook-timestamp"]) + 1)},
        ):
            problem(public.post(url, content=body, headers=changed), 401)
        problem(public.post(url, content=json.dumps({"amount": 10_000}).encode(), headers=captured), 401)
        # signed correctly, but outside the five minutes either way
        for skew in (-301, 301):
            stale = signed_headers(secret, body, ts=int(time.time()) + skew)
            problem(public.post(url, content=body, headers=stale), 401)
        # signed with a guessed secret
        problem(public.post(url, content=body, headers=signed_headers("whsec_" + "A" * 44, body)), 401)
    wait_run(victim, run_id)
    runs = victim.get("/runs", params={"flowId": flow_id}).json()
    assert runs["total"] == 1 and runs["items"][0]["id"] == run_id


def test_a_websocket_ticket_opens_one_stream_once_and_is_no_api_credential(
    stack: ProcessStack, victim: httpx.Client, victims_flow: str
) -> None:
    run_id = victim.post(f"/flows/{victims_flow}/runs", json={"input": {}}).json()["id"]
    ticket = victim.post("/ws-tickets").json()["ticket"]
    problem(httpx.get(stack.base + "/api/v1/flows", headers={"Authorization": f"Bearer {ticket}"}, timeout=10), 401)
    with open_ws(stack, f"/ws/runs/{run_id}?ticket={ticket}", None) as ws:
        assert json.loads(ws.recv(timeout=15))["run"]["id"] == run_id
    assert refused(stack, f"/ws/runs/{run_id}?ticket={ticket}", ["flowmesh.v1"]) == 401
    assert refused(stack, f"/ws/flows/{victims_flow}?ticket={ticket}", ["flowmesh.v1"]) == 401
