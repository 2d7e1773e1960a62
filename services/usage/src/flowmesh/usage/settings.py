"""Settings of the usage service (``FLOWMESH_USAGE_*`` plus the shared ones)."""

from typing import ClassVar

from pydantic_settings import SettingsConfigDict

from flowmesh.runtime.settings import BaseServiceSettings


class UsageSettings(BaseServiceSettings):
    """``FLOWMESH_USAGE_DATABASE_URL``, ``FLOWMESH_USAGE_HEALTH_PORT``, … override the shared values."""

    model_config = SettingsConfigDict(env_prefix="FLOWMESH_USAGE_")
    service_name: ClassVar[str] = "usage"
