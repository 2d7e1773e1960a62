"""Settings of the scheduler service (``FLOWMESH_SCHEDULER_*`` plus the shared ones)."""

from typing import ClassVar, Self

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from flowmesh.runtime.settings import BaseServiceSettings


class SchedulerSettings(BaseServiceSettings):
    """``FLOWMESH_SCHEDULER_DATABASE_URL``, ``FLOWMESH_SCHEDULER_HEALTH_PORT``, … override the shared values."""

    model_config = SettingsConfigDict(env_prefix="FLOWMESH_SCHEDULER_")
    service_name: ClassVar[str] = "scheduler"

    poll_interval_s: float = Field(
        default=0.2,
        gt=0,
        le=5,
        description="how often each replica claims what comes due within the lookahead (keep it under "
        "lookahead_s, so a due time is claimed before it comes)",
    )
    lookahead_s: float = Field(
        default=0.5,
        gt=0,
        le=0.9,
        description="claim due times this far ahead, then fire each on time from memory; under 1 s, so a "
        "disabled schedule stops within one second",
    )
    lease_s: float = Field(
        default=2.0,
        gt=0,
        le=5,
        description="a claim not fired this long after its due time (replica killed) is taken over by another",
    )
    misfire_threshold_s: float = Field(
        default=5.0,
        gt=0,
        description="a due time found later than this (every replica was down) is a misfire: the schedule's "
        "misfire policy decides; keep it above lease_s so a replica's failover is late, not a misfire",
    )
    fire_all_limit: int = Field(default=100, ge=1, le=10_000, description="most missed due times fireAll catches up")
    claim_batch: int = Field(default=1000, ge=1, le=10_000, description="most due times one claim takes")
    publish_timeout_s: float = Field(default=5.0, gt=0, description="wait for JetStream's acknowledgement of a fire")
    event_workers: int = Field(default=4, ge=1, le=64, description="flow announcements handled at once")

    @model_validator(mode="after")
    def _claims_come_before_due_times(self) -> Self:
        if self.poll_interval_s >= self.lookahead_s:
            raise ValueError("poll_interval_s must be shorter than lookahead_s, or due times are claimed late")
        return self
