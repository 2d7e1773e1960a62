"""The runner's spans: one per step attempt a worker executes, one per transaction on a run.

Kept apart from the shell so that what a span records is read in one place. Every span here is
parented on the run's own trace (:func:`flowmesh.runtime.tracing.for_run`): a step executed after a
wait, a timer, a retry or a restart joins the trace of the request that started its run. Pure
steps run inline in the run's transaction and have no span of their own (their events say when
they ran); a span each would cost more than the step.
"""

from __future__ import annotations

import logging

from flowmesh.runner.engine import RunRecord
from flowmesh.runner.graph import Step
from flowmesh.runner.outcome import Outcome
from flowmesh.runtime import tracing

log = logging.getLogger(__name__)

RUN_ID = "flowmesh.run_id"
TENANT = "flowmesh.tenant"


def attempt_span(run: RunRecord, step: Step, attempt: int) -> tracing.Block:
    """The span of one attempt of ``step`` (name ``step <type>``), in the run's trace."""
    attributes: dict[str, tracing.Value] | None = None
    if tracing.enabled():
        attributes = {
            RUN_ID: run.id,
            TENANT: run.tenant_id,
            "flowmesh.flow_id": run.flow_id,
            "flowmesh.step.id": step.id,
            "flowmesh.step.type": step.type,
            "flowmesh.step.attempt": attempt,
        }
    return tracing.span(f"step {step.type}", parent=tracing.for_run(run.traceparent), attributes=attributes)


def record_outcome(span: tracing.Block, step: Step, attempt: int, outcome: Outcome) -> None:
    """How the attempt ended: ``succeeded``, ``waiting`` or ``failed`` (with its error type, also logged:
    the log line carries the run, the tenant and the trace)."""
    if outcome.wait:
        span.set_attribute("flowmesh.step.outcome", "waiting")
    elif outcome.ok:
        span.set_attribute("flowmesh.step.outcome", "succeeded")
    else:
        span.set_attribute("flowmesh.step.outcome", "failed")
        span.set_attribute("flowmesh.step.error_type", outcome.error_type)
        span.set_attribute("flowmesh.step.retryable", outcome.retryable)
        span.set_error(outcome.message)
        log.info("attempt %d of step %r failed (%s): %s", attempt, step.id, outcome.error_type, outcome.message)


def db_span(operation: str, run_id: str | None = None) -> tracing.Block:
    """The span of one transaction of the runner (``db <operation>``); nothing with tracing off."""
    if not tracing.enabled():
        return tracing.NOTHING
    attributes: dict[str, tracing.Value] = {"db.system.name": "postgresql", "db.operation.name": operation}
    if run_id is not None:
        attributes[RUN_ID] = run_id
    return tracing.span(f"db {operation}", attributes=attributes)
