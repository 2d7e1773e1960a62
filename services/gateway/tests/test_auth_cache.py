"""A verified token is remembered by its exact text for a minute at most, and never past its ``exp``."""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import jwt
import pytest

from flowmesh.contracts.errors import Unauthorized
from flowmesh.gateway import auth
from flowmesh.gateway.auth import VERIFIED_TTL_S, JwtVerifier
from flowmesh.gateway.settings import GatewaySettings

SECRET = "s" * 48


def a_token(**claims: object) -> str:
    now = int(time.time())
    body = {"sub": "alice", "tenant": "t1", "iss": "flowmesh", "aud": "flowmesh", "iat": now, "exp": now + 600}
    return jwt.encode({**body, **claims}, SECRET, algorithm="HS256")


class _Clock:
    """``datetime`` as PyJWT reads the time (``datetime.now(tz=...)``), at a given instant."""

    def __init__(self, at: float) -> None:
        self.at = at

    def now(self, tz: datetime.tzinfo | None = None) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.at, tz)


def count_full_checks(verifier: JwtVerifier, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The tokens ``verifier`` checks in full from now on (a remembered one is not checked)."""
    checked: list[str] = []
    full = verifier._verify

    async def counting(token: str) -> tuple[auth.Principal, float]:
        checked.append(token)
        return await full(token)

    monkeypatch.setattr(verifier, "_verify", counting)
    return checked


@pytest.fixture
def verifier(tmp_path: Path) -> JwtVerifier:
    return JwtVerifier(GatewaySettings(env="dev", jwt_secret=SECRET, data_dir=tmp_path, jwt_leeway_s=0))


async def test_a_token_is_checked_once_then_remembered(verifier: JwtVerifier, monkeypatch: pytest.MonkeyPatch) -> None:
    checked = count_full_checks(verifier, monkeypatch)
    token = a_token()
    assert (await verifier.verify(token)).tenant == "t1"
    assert (await verifier.verify(token)).sub == "alice"
    assert checked == [token]
    # another text is another token: a changed signature is checked, and refused
    with pytest.raises(Unauthorized):
        await verifier.verify(token[:-2] + ("AA" if not token.endswith("AA") else "BB"))


async def test_a_remembered_token_is_checked_again_after_a_minute_and_refused_after_its_exp(
    verifier: JwtVerifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = time.time()
    short = a_token(exp=int(now) + 30)
    await verifier.verify(short)
    later = now + 31  # past exp, within the minute: for the cache and for PyJWT's own clock
    monkeypatch.setattr(auth.time, "time", lambda: later)
    monkeypatch.setattr(jwt.api_jwt, "datetime", _Clock(later))
    with pytest.raises(Unauthorized, match="expired"):
        await verifier.verify(short)
    monkeypatch.undo()

    long = a_token()
    await verifier.verify(long)
    checked = count_full_checks(verifier, monkeypatch)
    monkeypatch.setattr(auth.time, "time", lambda: now + VERIFIED_TTL_S + 1)
    await verifier.verify(long)
    assert checked == [long]  # a minute on, its signature is checked again


async def test_an_invalid_token_is_never_remembered(verifier: JwtVerifier) -> None:
    bad = jwt.encode({"sub": "alice", "iss": "flowmesh", "aud": "other", "exp": int(time.time()) + 60}, SECRET)
    for _ in range(2):
        with pytest.raises(Unauthorized, match=r"(?i)audience"):
            await verifier.verify(bad)
    assert bad not in verifier._verified
