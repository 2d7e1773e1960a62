"""The body of ``fm.work.steps``: one piece of work on a run for any runner replica.

``Nats-Msg-Id`` de-duplicates work (one message per run retry and step attempt, per child that
ended, per sweep), so the id is not part of the body; what the work *is* is its ``kind``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import SerializerFunctionWrapHandler, model_serializer, model_validator

from flowmesh.contracts.models.base import WireModel

WorkKind = Literal["advance", "attempt", "child"]
"""``advance``: move a new or reopened run on; ``attempt``: run the step's current attempt;
``child``: one of the step's child runs ended."""


class StepWork(WireModel):
    """Work on run ``runId``: on its step ``stepId`` unless the kind is ``advance``."""

    run_id: str
    step_id: str | None = None
    kind: WorkKind

    @model_validator(mode="before")
    @classmethod
    def _kind_of_older_senders(cls, value: Any) -> Any:
        """A runner of the release before named the kind by ``child: true`` or by no step id."""
        if isinstance(value, dict) and "kind" not in value:
            step_id = value.get("stepId", value.get("step_id"))
            kind = "child" if value.get("child") else "advance" if step_id is None else "attempt"
            value = {**value, "kind": kind}
        return value

    @model_serializer(mode="wrap")
    def _readable_by_older_runners(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Keep ``child: true`` on the wire while runners of the release before may read it."""
        out: dict[str, Any] = handler(self)
        if self.kind == "child":
            out["child"] = True
        return out
