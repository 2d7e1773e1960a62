"""Settings of the runner (``FLOWMESH_RUNNER_*`` plus the shared ones)."""

import re
from typing import ClassVar

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import SettingsConfigDict
from yarl import URL

from flowmesh.runner.llm import DEFAULT_PROVIDERS
from flowmesh.runtime.settings import BaseServiceSettings

_PROVIDER = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class RunnerSettings(BaseServiceSettings):
    """``FLOWMESH_RUNNER_DATABASE_URL``, ``FLOWMESH_RUNNER_HEALTH_PORT``, … override the shared values."""

    model_config = SettingsConfigDict(env_prefix="FLOWMESH_RUNNER_")
    service_name: ClassVar[str] = "runner"

    http_step_allow_private: bool | None = Field(
        default=None,
        validation_alias=AliasChoices("FLOWMESH_HTTP_STEP_ALLOW_PRIVATE", "http_step_allow_private"),
        description="let http and llm steps reach private, loopback and link-local addresses (default: only in dev)",
    )
    http_step_max_bytes: int = Field(default=1024 * 1024, ge=1024, description="response body cap of http steps")
    step_output_max_bytes: int = Field(
        default=1024 * 1024,
        ge=0,
        description="largest output (as JSON) a step may record; over it the step fails output-too-large (0: none)",
    )
    run_output_max_bytes: int = Field(
        default=1024 * 1024,
        ge=0,
        description="largest output (as JSON) a run may end with; over it the run fails output-too-large (0: none)",
    )
    http_step_timeout_ms: int = Field(default=30_000, ge=1, description="per-attempt timeout when a step sets none")
    llm_providers: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "OpenAI-compatible providers of llm steps as a JSON object, name -> base URL (the step POSTs to "
            '{baseUrl}/chat/completions), merged over the defaults {"openai": "https://api.openai.com/v1"}'
        ),
    )
    llm_step_timeout_ms: int = Field(
        default=120_000, ge=1, description="per-attempt timeout of llm steps that set no timeoutMs"
    )
    workers: int = Field(default=64, ge=1, le=1024, description="step messages handled at once")
    local_steps: int = Field(
        default=64,
        ge=0,
        le=1024,
        description="steps executed at once by the replica whose change made them ready, with no work message "
        "(0: every step goes through the STEP_WORK stream)",
    )
    ack_wait_s: float = Field(
        default=30.0, ge=1, description="a step message unacknowledged this long is redelivered (crashed worker)"
    )
    sweep_interval_s: float = Field(default=5.0, gt=0)
    stalled_step_s: float = Field(default=120.0, gt=0, description="a dispatched step unfinished this long is re-sent")
    stalled_run_s: float = Field(default=10.0, gt=0, description="a queued run not started this long is re-sent")
    default_run_timeout_ms: int = Field(
        default=3_600_000,
        ge=0,
        description="time limit of a run whose flow sets no runTimeoutMs (0: none); enforced by the sweep",
    )
    timer_fallback_s: float = Field(
        default=10.0, gt=0, description="a deadline overdue this long (its timer was lost) is enforced by the sweep"
    )

    @property
    def allow_private(self) -> bool:
        """Whether http and llm steps may reach private addresses."""
        return self.is_dev if self.http_step_allow_private is None else self.http_step_allow_private

    @field_validator("llm_providers")
    @classmethod
    def _check_providers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, base in value.items():
            if not _PROVIDER.fullmatch(name):
                raise ValueError(f"provider name {name!r} must be 1-64 letters, digits, '_' or '-'")
            url = URL(base)
            if url.scheme not in ("http", "https") or not url.host:
                raise ValueError(f"base URL of provider {name!r} must be an http(s) URL, not {base!r}")
        return value

    @property
    def llm_base_urls(self) -> dict[str, str]:
        """Base URL of each llm provider, by lower-case name (names are case-insensitive, as stored keys')."""
        configured = {name.lower(): base.rstrip("/") for name, base in self.llm_providers.items()}
        return {**DEFAULT_PROVIDERS, **configured}
