"""Settings of the runner service (``FLOWMESH_RUNNER_*`` plus the shared ones)."""

from typing import ClassVar

from pydantic_settings import SettingsConfigDict

from flowmesh.runtime.settings import BaseServiceSettings


class RunnerSettings(BaseServiceSettings):
    """``FLOWMESH_RUNNER_DATABASE_URL``, ``FLOWMESH_RUNNER_HEALTH_PORT``, … override the shared values."""

    model_config = SettingsConfigDict(env_prefix="FLOWMESH_RUNNER_")
    service_name: ClassVar[str] = "runner"
