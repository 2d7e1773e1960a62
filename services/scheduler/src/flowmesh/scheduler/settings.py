"""Settings of the scheduler service (``FLOWMESH_SCHEDULER_*`` plus the shared ones)."""

from typing import ClassVar

from pydantic_settings import SettingsConfigDict

from flowmesh.runtime.settings import BaseServiceSettings


class SchedulerSettings(BaseServiceSettings):
    """``FLOWMESH_SCHEDULER_DATABASE_URL``, ``FLOWMESH_SCHEDULER_HEALTH_PORT``, … override the shared values."""

    model_config = SettingsConfigDict(env_prefix="FLOWMESH_SCHEDULER_")
    service_name: ClassVar[str] = "scheduler"
