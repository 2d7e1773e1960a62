"""Sealing API keys, rotating the secret, and the settings that refuse weak secrets in production."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from flowmesh.usage.settings import KEYS_SECRET_FILE, UsageSettings
from flowmesh.usage.vault import Vault, VaultError

A, B = "a-secret-" + "a" * 40, "b-secret-" + "b" * 40
KEY = "sk-live-0123456789abcdefghij"


def test_a_sealed_key_opens_only_for_its_own_row() -> None:
    vault = Vault([A])
    sealed = vault.seal(tenant="acme", provider="openai", api_key=KEY)
    assert KEY.encode() not in sealed
    assert vault.open(sealed, tenant="acme", provider="openai") == KEY
    with pytest.raises(VaultError, match="another"):
        vault.open(sealed, tenant="globex", provider="openai")
    with pytest.raises(VaultError, match="another"):
        vault.open(sealed, tenant="acme", provider="anthropic")
    with pytest.raises(VaultError, match="decrypted"):
        Vault([B]).open(sealed, tenant="acme", provider="openai")


def test_rotation_puts_the_new_secret_first_and_keeps_the_old_one_for_reading() -> None:
    old = Vault([A]).seal(tenant="acme", provider="openai", api_key=KEY)
    rotated = Vault([B, A])
    assert rotated.key_id == Vault([B]).key_id != Vault([A]).key_id
    assert rotated.open(old, tenant="acme", provider="openai") == KEY
    resealed = rotated.reseal(old)
    assert Vault([B]).open(resealed, tenant="acme", provider="openai") == KEY
    with pytest.raises(VaultError):
        Vault([B]).reseal(Vault(["c-secret-" + "c" * 40]).seal(tenant="acme", provider="openai", api_key=KEY))


def test_a_sealed_secret_opens_only_for_its_own_row_and_never_as_a_provider_key() -> None:
    vault = Vault([A])
    sealed = vault.seal_secret(tenant="acme", name="TOKEN", value=KEY)
    assert KEY.encode() not in sealed
    assert vault.open_secret(sealed, tenant="acme", name="TOKEN") == KEY
    with pytest.raises(VaultError, match="another"):
        vault.open_secret(sealed, tenant="globex", name="TOKEN")
    with pytest.raises(VaultError, match="another"):
        vault.open_secret(sealed, tenant="acme", name="OTHER")
    # a secret is no provider key, a provider key no secret: not even under a name equal to the provider
    as_key = vault.seal_secret(tenant="acme", name="openai", value=KEY)
    with pytest.raises(VaultError):
        vault.open(as_key, tenant="acme", provider="openai")
    key = vault.seal(tenant="acme", provider="openai", api_key=KEY)
    with pytest.raises(VaultError):
        vault.open_secret(key, tenant="acme", name="openai")
    # and a secret rotates like a key
    resealed = Vault([B, A]).reseal(sealed)
    assert Vault([B]).open_secret(resealed, tenant="acme", name="TOKEN") == KEY


NATS = {"nats_user": "usage", "nats_password": "n" * 32}
"""Production also needs the service's NATS user (tested in tests/security)."""


def test_production_refuses_a_missing_placeholder_or_short_secret(tmp_path: Path) -> None:
    for bad in (None, "", "changeme", "too-short", f"{A},secret"):
        with pytest.raises(ValidationError, match="FLOWMESH_USAGE_KEYS_SECRET"):
            UsageSettings(
                env="production", nats_user="usage", nats_password="n" * 32, keys_secret=bad, data_dir=tmp_path
            )
    good = UsageSettings(
        env="production", nats_user="usage", nats_password="n" * 32, keys_secret=f" {B} , {A} ", data_dir=tmp_path
    )
    assert good.keys_secret_list == [B, A]
    assert not (tmp_path / KEYS_SECRET_FILE).exists()


def test_dev_creates_a_secret_once_and_keeps_it(tmp_path: Path) -> None:
    first = UsageSettings(env="dev", data_dir=tmp_path)
    again = UsageSettings(env="dev", data_dir=tmp_path)
    assert first.keys_secret == again.keys_secret and len(first.keys_secret_list[0]) >= 32
    assert (tmp_path / KEYS_SECRET_FILE).stat().st_mode & 0o777 == 0o600


def test_the_default_plan_is_the_shared_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FLOWMESH_DEFAULT_PLAN", "pro")
    assert UsageSettings(env="dev", data_dir=tmp_path).default_plan == "pro"
    monkeypatch.setenv("FLOWMESH_DEFAULT_PLAN", "gold")
    with pytest.raises(ValidationError):
        UsageSettings(env="dev", data_dir=tmp_path)
