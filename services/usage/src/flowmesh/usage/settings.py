"""Settings of the usage service (``FLOWMESH_USAGE_*`` plus the shared ones)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import SettingsConfigDict

from flowmesh.contracts.models.usage import PlanName
from flowmesh.runtime.settings import PLACEHOLDER_SECRETS, BaseServiceSettings, load_or_create_dev_secret

KEYS_SECRET_FILE = "usage-keys-secret"
"""Where, inside the data dir, the dev stack keeps the generated key-encryption secret."""
MIN_SECRET_LENGTH = 32


class UsageSettings(BaseServiceSettings):
    """``FLOWMESH_USAGE_DATABASE_URL``, ``FLOWMESH_USAGE_HEALTH_PORT``, … override the shared values."""

    model_config = SettingsConfigDict(env_prefix="FLOWMESH_USAGE_")
    service_name: ClassVar[str] = "usage"

    default_plan: PlanName = Field(
        default="free",
        validation_alias=AliasChoices("FLOWMESH_DEFAULT_PLAN", "default_plan"),
        description="plan of a tenant without a plan of its own",
    )
    keys_secret: str | None = Field(
        default=None,
        description="secrets that encrypt stored API keys, comma-separated: the first encrypts, every one decrypts "
        "(rotation); generated once into the data dir outside production",
    )
    meter_batch: int = Field(default=500, ge=1, le=1000, description="run events metered per transaction, at most")
    meter_wait_s: float = Field(
        default=0.2, gt=0, le=5, description="how long a batch collects more events after its first one"
    )
    ack_wait_s: float = Field(
        default=10.0, ge=1, description="a batch unacknowledged this long (its replica died) is redelivered"
    )
    dedupe_days: int = Field(
        default=35,
        ge=8,
        description="how long metered event ids are kept to refuse duplicates (longer than RUN_EVENTS' 7 days)",
    )
    plan_cache_s: float = Field(default=30.0, ge=0, description="how long the plans table is remembered")

    @model_validator(mode="after")
    def _secrets(self) -> UsageSettings:
        if self.keys_secret is not None and not self.keys_secret.strip():
            self.keys_secret = None
        if self.keys_secret is None:
            if not self.is_dev:
                raise ValueError(
                    "set FLOWMESH_USAGE_KEYS_SECRET in production (stored API keys are encrypted with it); "
                    "generate one with `openssl rand -base64 48`"
                )
            self.keys_secret = load_or_create_dev_secret(self.data_dir, KEYS_SECRET_FILE)
        if not self.is_dev:
            for secret in self.keys_secret_list:
                if secret.lower() in PLACEHOLDER_SECRETS or len(secret) < MIN_SECRET_LENGTH:
                    raise ValueError(
                        f"FLOWMESH_USAGE_KEYS_SECRET holds a placeholder or a secret shorter than {MIN_SECRET_LENGTH} "
                        "characters; generate one with `openssl rand -base64 48`"
                    )
        return self

    @property
    def keys_secret_list(self) -> list[str]:
        """The key-encryption secrets, newest (the one that encrypts) first."""
        return [s.strip() for s in (self.keys_secret or "").split(",") if s.strip()]
