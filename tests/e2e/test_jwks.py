"""RS256/ES256 tokens verified from a JWKS, with key rotation and algorithm-confusion refused."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from stack import ProcessStack


class Jwks:
    """A tiny identity provider publishing a JWKS that tests can rotate."""

    def __init__(self) -> None:
        self.keys: dict[str, Any] = {}
        self.served: list[dict[str, Any]] = []
        jwks = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = json.dumps({"keys": jwks.served}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add_rsa(self, kid: str) -> None:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.keys[kid] = key
        self.served.append(
            {**RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid, "alg": "RS256", "use": "sig"}
        )

    def add_ec(self, kid: str) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        self.keys[kid] = key
        self.served.append(
            {**ECAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid, "alg": "ES256", "use": "sig"}
        )

    def retire(self, kid: str) -> None:
        self.served = [k for k in self.served if k["kid"] != kid]

    def token(self, kid: str, alg: str, **claims: Any) -> str:
        now = int(time.time())
        body = {
            "sub": "ivy",
            "tenant": "ivy-co",
            "iss": "flowmesh",
            "aud": "flowmesh",
            "iat": now,
            "exp": now + 600,
            **claims,
        }
        return jwt.encode(body, self.keys[kid], algorithm=alg, headers={"kid": kid})

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def idp() -> Iterator[Jwks]:
    j = Jwks()
    j.add_rsa("rsa-1")
    j.add_ec("ec-1")
    yield j
    j.close()


@pytest.fixture(scope="module")
def jwks_gateway(stack: ProcessStack, idp: Jwks, infra, tmp_path_factory) -> Iterator[str]:  # type: ignore[no-untyped-def]
    # production mode with only a JWKS: no HMAC secret exists, so HS256 tokens cannot be accepted at all
    g = ProcessStack(
        infra.nats_url,
        infra.database_url,
        tmp_path_factory.mktemp("jwks"),
        services=("gateway",),
        env={
            "FLOWMESH_ENV": "production",
            "FLOWMESH_JWT_SECRET": "",
            "FLOWMESH_JWKS_URL": idp.url,
            "FLOWMESH_GATEWAY_JWKS_COOLDOWN_S": "0",
            # the session's NATS is open; production refuses that unless told (tests/cluster has users)
            "FLOWMESH_NATS_ALLOW_ANONYMOUS": "true",
        },
    )
    g.start_all()
    try:
        g.wait_ready()
        yield g.base
    finally:
        g.stop_all()


def get(base: str, tok: str) -> httpx.Response:
    return httpx.get(base + "/api/v1/flows", headers={"Authorization": f"Bearer {tok}"}, timeout=10)


def test_rs256_and_es256_tokens_from_the_jwks_are_accepted(jwks_gateway: str, idp: Jwks) -> None:
    assert get(jwks_gateway, idp.token("rsa-1", "RS256")).status_code == 200
    assert get(jwks_gateway, idp.token("ec-1", "ES256")).status_code == 200


def test_a_rotated_in_key_is_picked_up_and_a_retired_one_refused(jwks_gateway: str, idp: Jwks) -> None:
    idp.add_rsa("rsa-2")
    assert get(jwks_gateway, idp.token("rsa-2", "RS256")).status_code == 200
    assert get(jwks_gateway, idp.token("rsa-1", "RS256")).status_code == 200


def test_unknown_kid_wrong_claims_and_confusion_are_401(jwks_gateway: str, idp: Jwks) -> None:
    stranger = Jwks()
    stranger.add_rsa("rsa-1")  # same kid, another key
    try:
        assert get(jwks_gateway, stranger.token("rsa-1", "RS256")).status_code == 401
    finally:
        stranger.close()
    assert get(jwks_gateway, idp.token("rsa-1", "RS256", aud="someone-else")).status_code == 401
    assert get(jwks_gateway, idp.token("rsa-1", "RS256", exp=int(time.time()) - 120)).status_code == 401
    idp.keys["nope"] = idp.keys["rsa-1"]
    assert get(jwks_gateway, idp.token("nope", "RS256")).status_code == 401
    # HS256 signed with the public key as the HMAC secret: the classic algorithm-confusion attack
    public_pem = (
        idp.keys["rsa-1"]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    forged = _forge_hs256(public_pem)
    r = get(jwks_gateway, forged)
    assert r.status_code == 401 and r.headers["content-type"].startswith("application/problem+json")


def _forge_hs256(secret: bytes) -> str:
    """An HS256 token keyed with arbitrary bytes (PyJWT refuses PEM keys for HMAC, so sign by hand)."""
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}).encode())
    payload = b64(
        json.dumps({"sub": "ivy", "iss": "flowmesh", "aud": "flowmesh", "exp": int(time.time()) + 600}).encode()
    )
    sig = hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(sig)}"
