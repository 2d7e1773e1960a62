"""Gateway settings: production refuses weak or missing secrets; dev makes one once."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from flowmesh.gateway.settings import GatewaySettings

STRONG = "s" * 48
NATS = {"nats_user": "gateway", "nats_password": "n" * 32}
"""Production also needs the service's NATS user (tested in libs/runtime)."""


@pytest.mark.parametrize("secret", [None, "", "changeme", "secret", "short-but-not-placeholder"])
def test_production_refuses_a_missing_placeholder_or_short_secret(secret: str | None, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="FLOWMESH_JWT_SECRET"):
        GatewaySettings(env="production", **NATS, jwt_secret=secret, data_dir=tmp_path)


def test_production_accepts_a_strong_secret_or_a_jwks_url(tmp_path: Path) -> None:
    assert GatewaySettings(env="production", **NATS, jwt_secret=STRONG, data_dir=tmp_path).jwt_secret == STRONG
    s = GatewaySettings(env="production", **NATS, jwks_url="https://idp.example.test/jwks.json", data_dir=tmp_path)
    assert s.jwt_secret is None
    assert not (tmp_path / "jwt-secret").exists()


def test_dev_generates_a_secret_once_and_keeps_it(tmp_path: Path) -> None:
    first = GatewaySettings(env="dev", data_dir=tmp_path / "data").jwt_secret
    again = GatewaySettings(env="dev", data_dir=tmp_path / "data").jwt_secret
    assert first and first == again and len(first) >= 48
    assert (tmp_path / "data" / "jwt-secret").stat().st_mode & 0o777 == 0o600


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FLOWMESH_ENV", "dev")
    monkeypatch.setenv("FLOWMESH_HTTP_PORT", "9123")
    monkeypatch.setenv("FLOWMESH_JWT_SECRET", STRONG)
    monkeypatch.setenv("FLOWMESH_CORS_ORIGINS", "http://a.test, http://b.test")
    s = GatewaySettings(data_dir=tmp_path)
    assert s.http_port == 9123 and s.jwt_secret == STRONG
    assert s.cors_origin_list == ["http://a.test", "http://b.test"]


def test_metrics_leave_the_public_port_in_production_unless_placed(tmp_path: Path) -> None:
    production = GatewaySettings(env="production", **NATS, jwt_secret=STRONG, data_dir=tmp_path)
    assert production.metrics_placement == "health" and production.docs == "public"
    assert production.health_listener
    dev = GatewaySettings(env="dev", data_dir=tmp_path)
    assert dev.metrics_placement == "public" and not dev.health_listener
    public = GatewaySettings(env="production", **NATS, jwt_secret=STRONG, data_dir=tmp_path, metrics="public")
    assert public.metrics_placement == "public" and not public.health_listener
    with pytest.raises(ValidationError):
        GatewaySettings(env="dev", data_dir=tmp_path, docs="private")
