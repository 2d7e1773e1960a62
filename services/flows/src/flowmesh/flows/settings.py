"""Settings of the flows service (``FLOWMESH_FLOWS_*`` plus the shared ones)."""

from typing import ClassVar

from pydantic_settings import SettingsConfigDict

from flowmesh.runtime.settings import BaseServiceSettings


class FlowsSettings(BaseServiceSettings):
    """``FLOWMESH_FLOWS_DATABASE_URL``, ``FLOWMESH_FLOWS_HEALTH_PORT``, … override the shared values."""

    model_config = SettingsConfigDict(env_prefix="FLOWMESH_FLOWS_")
    service_name: ClassVar[str] = "flows"
