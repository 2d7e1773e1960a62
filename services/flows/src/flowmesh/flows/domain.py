"""Pure rules of flows: status, ETags and what a PATCH changes. No I/O."""

from __future__ import annotations

from typing import Any

from pydantic.alias_generators import to_camel

from flowmesh.contracts.errors import PreconditionFailed
from flowmesh.contracts.models import (
    Flow,
    FlowCreate,
    FlowDefinition,
    FlowSettings,
    FlowStatus,
    FlowUpdate,
    FlowVersion,
    Trigger,
)
from flowmesh.contracts.models.flows import ExportedFlow, ExportedTrigger, FlowExport


def status_of(latest_version: int | None) -> FlowStatus:
    """A flow is ``published`` once it has a version, else a ``draft``."""
    return "draft" if latest_version is None else "published"


def etag(revision: int) -> str:
    """The strong ETag of a flow revision."""
    return f'"{revision}"'


def check_if_match(if_match: str | None, revision: int) -> None:
    """Honour ``If-Match`` (RFC 9110): ``*`` or a list of strong ETags, compared exactly.

    Raises:
        PreconditionFailed: the flow changed since the client read it.
    """
    if if_match is None:
        return
    tags = [t.strip() for t in if_match.split(",")]
    if "*" in tags or etag(revision) in tags:
        return
    raise PreconditionFailed(
        f"the flow changed since you read it (current ETag {etag(revision)}); read it again and retry"
    )


def draft_values(flow: FlowCreate) -> dict[str, Any]:
    """Column values of a whole draft (create or PUT)."""
    return {
        "name": flow.name,
        "description": flow.description,
        "definition": flow.definition.dump(),
        "input_schema": flow.input_schema,
        "settings": flow.settings.wire(exclude_unset=True),
    }


def patch_values(update: FlowUpdate) -> dict[str, Any]:
    """Column values of the fields a PATCH gave (others stay as they are)."""
    given = update.model_fields_set
    values: dict[str, Any] = {}
    if "name" in given:
        values["name"] = update.name
    if "description" in given:
        values["description"] = update.description
    if "definition" in given and update.definition is not None:
        values["definition"] = update.definition.dump()
    if "input_schema" in given:
        values["input_schema"] = update.input_schema
    if "settings" in given and update.settings is not None:
        values["settings"] = update.settings.wire(exclude_unset=True)
    return values


def same_content(flow: Flow, version: FlowVersion | None) -> bool:
    """Whether the draft is exactly what a version froze (publishing it again would add nothing)."""
    return (
        version is not None
        and flow.definition == version.definition
        and flow.input_schema == version.input_schema
        and flow.settings == version.settings
    )


DRAFT_FIELDS = ("name", "description", "definition", "input_schema", "settings")
"""What a draft's edit may change; its audit entry names those that did."""


def changed_fields(before: Flow, after: Flow) -> list[str]:
    """The draft fields an edit changed, by their wire (camelCase) names: an audit entry's ``fields``."""
    return [to_camel(name) for name in DRAFT_FIELDS if getattr(before, name) != getattr(after, name)]


def copy_name(name: str) -> str:
    """The name of a duplicate, within the 100-character limit."""
    suffix = " (copy)"
    return name[: 100 - len(suffix)] + suffix


def export_document(flow: Flow, triggers: list[Trigger]) -> FlowExport:
    """A portable document of a flow: never webhook tokens or secrets."""
    return FlowExport(
        format_version=1,
        flow=ExportedFlow(
            name=flow.name,
            description=flow.description,
            definition=FlowDefinition.model_validate(flow.definition),
            input_schema=flow.input_schema,
            settings=FlowSettings.model_validate(flow.settings),
            triggers=[ExportedTrigger(type=t.type, name=t.name, config=t.config, enabled=t.enabled) for t in triggers],
        ),
    )
