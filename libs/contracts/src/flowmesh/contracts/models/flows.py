"""Flows, versions and triggers: the definitions the flows service stores and the API returns."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, JsonValue, model_validator

from flowmesh.contracts.models.base import MAX_INT4, OpenModel, Timestamp, WireModel
from flowmesh.contracts.models.definition import FlowDefinition
from flowmesh.contracts.models.problem import FieldError

FlowName = Annotated[str, Field(min_length=1, max_length=100)]
Description = Annotated[str, Field(max_length=500)]
FlowStatus = Literal["draft", "published"]


class FlowSettings(OpenModel):
    """Per-flow settings frozen with each version."""

    run_timeout_ms: int | None = Field(default=None, ge=1)


class FlowCreate(WireModel):
    """Body of ``POST /flows`` and ``PUT /flows/{id}``."""

    name: FlowName
    description: Description | None = None
    definition: FlowDefinition = Field(default_factory=lambda: FlowDefinition(nodes=[], edges=[]))
    input_schema: dict[str, JsonValue] | None = None
    settings: FlowSettings = Field(default_factory=FlowSettings)


class FlowUpdate(WireModel):
    """Body of ``PATCH /flows/{id}``: only the fields given change."""

    name: FlowName | None = None
    description: Description | None = None
    definition: FlowDefinition | None = None
    input_schema: dict[str, JsonValue] | None = None
    settings: FlowSettings | None = None

    @model_validator(mode="after")
    def _required_stay_set(self) -> FlowUpdate:
        for field in ("name", "definition", "settings"):
            if field in self.model_fields_set and getattr(self, field) is None:
                raise ValueError(f"{field} cannot be null")
        return self


class FlowSummary(WireModel):
    """A flow in a list."""

    id: str
    tenant_id: str
    name: str
    description: str | None = None
    status: FlowStatus
    active: bool
    active_version: int | None = None
    latest_version: int | None = None
    revision: int
    created_at: Timestamp
    updated_at: Timestamp


def _no_warnings(value: list[FieldError]) -> bool:
    return not value


class Flow(FlowSummary):
    """A flow with its draft definition."""

    definition: dict[str, Any]
    input_schema: dict[str, Any] | None = None
    settings: dict[str, Any] = Field(default_factory=dict)
    warnings: list[FieldError] = Field(
        default_factory=list,
        exclude_if=_no_warnings,
        description="On create and update only, when there are any: what is allowed but ill-advised in the "
        "draft (a literal credential in an http step), as `POST /flows/{id}/validate` reports it.",
    )

    @property
    def etag(self) -> str:
        """The strong ETag of this flow's current state."""
        return f'"{self.revision}"'


class FlowVersion(WireModel):
    """An immutable, published version of a flow."""

    flow_id: str
    version: int
    definition: dict[str, Any]
    input_schema: dict[str, Any] | None = None
    settings: dict[str, Any] = Field(default_factory=dict)
    created_at: Timestamp


TriggerType = Literal["webhook", "schedule", "event"]


class Trigger(WireModel):
    """A way to start a flow: webhook, schedule or event."""

    id: str
    flow_id: str
    type: TriggerType
    name: str
    config: dict[str, Any] = Field(default_factory=dict)
    enabled: bool = True
    url: str | None = None
    secret: str | None = None
    created_at: Timestamp | None = None
    updated_at: Timestamp | None = None


class TriggerCreate(WireModel):
    """Body of ``POST /flows/{id}/triggers``."""

    type: TriggerType
    name: Annotated[str, Field(min_length=1, max_length=100)]
    config: dict[str, JsonValue] = Field(default_factory=dict)
    enabled: bool = True


class TriggerUpdate(WireModel):
    """Body of ``PATCH /triggers/{id}``."""

    name: Annotated[str, Field(min_length=1, max_length=100)] | None = None
    config: dict[str, JsonValue] | None = None
    enabled: bool | None = None


class WebhookConfig(WireModel):
    """``webhook`` trigger config."""

    model_config = ConfigDict(extra="forbid")

    signed: bool = False


class ScheduleConfig(WireModel):
    """``schedule`` trigger config: 5 cron fields, or 6 with seconds first."""

    model_config = ConfigDict(extra="forbid")

    cron: str = Field(min_length=1)
    timezone: str = "UTC"
    misfire: Literal["skip", "fireOnce", "fireAll"] = "skip"


class EventConfig(WireModel):
    """``event`` trigger config."""

    model_config = ConfigDict(extra="forbid")

    event_type: str = Field(min_length=1)
    filter: str | None = None


class ValidationReport(WireModel):
    """``POST /flows/{id}/validate``: every problem at once, and what is allowed but ill-advised."""

    valid: bool
    errors: list[FieldError] = Field(default_factory=list)
    warnings: list[FieldError] = Field(
        default_factory=list,
        exclude_if=_no_warnings,
        description="Only when there are any: what is allowed but ill-advised (a literal credential in an http "
        "step); never stops publishing.",
    )


class Rollback(WireModel):
    """Body of ``POST /flows/{id}/rollback``."""

    version: int = Field(ge=1, le=MAX_INT4)


class ExportedTrigger(WireModel):
    """A trigger in an export document: its definition, never its token or secret."""

    type: TriggerType
    name: Annotated[str, Field(min_length=1, max_length=100)]
    config: dict[str, JsonValue] = Field(default_factory=dict)
    enabled: bool = True


class ExportedFlow(WireModel):
    """The flow part of an export document."""

    name: FlowName
    description: Description | None = None
    definition: FlowDefinition = Field(default_factory=lambda: FlowDefinition(nodes=[], edges=[]))
    input_schema: dict[str, JsonValue] | None = None
    settings: FlowSettings = Field(default_factory=FlowSettings)
    triggers: list[ExportedTrigger] = Field(default_factory=list, max_length=100)


class FlowExport(WireModel):
    """``GET /flows/{id}/export`` and the body of ``POST /flows/import``."""

    format_version: Literal[1]
    flow: ExportedFlow


class CatalogStep(WireModel):
    """One entry of ``GET /catalog/steps``."""

    type: str
    title: str
    description: str
    handles: list[str]
    data_schema: dict[str, Any]


class StepCatalog(WireModel):
    """``GET /catalog/steps``: every step type a canvas can offer."""

    items: list[CatalogStep]


class TriggerList(WireModel):
    """``GET /flows/{id}/triggers``: a flow's triggers (webhook URLs and secrets are never shown again)."""

    items: list[Trigger]


class ImportedFlow(Flow):
    """``POST /flows/import``: the new draft and its triggers (webhook URLs and secrets shown here only)."""

    triggers: list[Trigger] = Field(default_factory=list)


class FlowEvent(WireModel):
    """An announcement on ``fm.flows.{t}.<event>`` for the scheduler and the runner."""

    id: str
    type: str
    ts: Timestamp
    tenant_id: str
    flow_id: str
    active: bool
    active_version: int | None = None
    trigger: Trigger | None = None
    trigger_deleted: bool = False
