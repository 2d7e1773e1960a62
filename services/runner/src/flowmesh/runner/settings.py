"""Settings of the runner (``FLOWMESH_RUNNER_*`` plus the shared ones)."""

from typing import ClassVar

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from flowmesh.runtime.settings import BaseServiceSettings


class RunnerSettings(BaseServiceSettings):
    """``FLOWMESH_RUNNER_DATABASE_URL``, ``FLOWMESH_RUNNER_HEALTH_PORT``, … override the shared values."""

    model_config = SettingsConfigDict(env_prefix="FLOWMESH_RUNNER_")
    service_name: ClassVar[str] = "runner"

    http_step_allow_private: bool | None = Field(
        default=None,
        validation_alias=AliasChoices("FLOWMESH_HTTP_STEP_ALLOW_PRIVATE", "http_step_allow_private"),
        description="let http steps reach private, loopback and link-local addresses (default: only in dev)",
    )
    http_step_max_bytes: int = Field(default=1024 * 1024, ge=1024, description="response body cap of http steps")
    http_step_timeout_ms: int = Field(default=30_000, ge=1, description="per-attempt timeout when a step sets none")
    workers: int = Field(default=64, ge=1, le=1024, description="step messages handled at once")
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
        """Whether http steps may reach private addresses."""
        return self.is_dev if self.http_step_allow_private is None else self.http_step_allow_private
