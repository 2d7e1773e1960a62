"""The runner's replies made to fit one NATS message, whatever a run holds.

A run's ``input``/``output`` and a step's ``input``/``output`` are what the flow received and made,
and may be as large as a message. A reply that holds them is shaped here: the largest of those
values are replaced by an ``$omitted`` marker (:mod:`flowmesh.runtime.sizes`) until the reply is
within the caller's budget, so no run, however large, makes a page or a snapshot unreadable. The
marker's ``fetch`` names a read of that one item that returns the value whole, when there is one.
"""

from __future__ import annotations

from typing import Any, Final

from flowmesh.contracts.models import Page, Run, StepRun
from flowmesh.contracts.models.rpc import StartRunResult
from flowmesh.contracts.models.ws import WsSnapshot
from flowmesh.runtime.sizes import Slot, encoded_size, fit, is_omitted

LARGE: Final = ("input", "output")
"""The fields of a run or a step that grow with the data a flow handles."""


def _whole_alone(item: dict[str, Any], budget: int) -> set[str]:
    """Which large fields of ``item`` a read of the item alone returns whole (within ``budget``)."""
    alone = dict(item)
    fit(alone, [Slot(alone, key) for key in LARGE], budget)
    return {key for key in LARGE if not is_omitted(alone.get(key))}


def _slots(item: dict[str, Any], fetch: str, budget: int) -> list[Slot]:
    whole = _whole_alone(item, budget)
    return [Slot(item, key, fetch if key in whole else None) for key in LARGE]


def run_reply(run: Run, budget: int) -> dict[str, Any]:
    """One run, as ``fm.rpc.runs.get`` (and the control operations) answer it."""
    wire = run.wire()
    fit(wire, [Slot(wire, key) for key in LARGE], budget)
    return wire


def start_reply(result: StartRunResult, budget: int) -> dict[str, Any]:
    """A start's or a retry's answer: the run and whether it is new."""
    wire = result.wire()
    fit(wire, [Slot(wire["run"], key) for key in LARGE], budget)
    return wire


def runs_page(page: Page[Run], budget: int) -> dict[str, Any]:
    """A page of runs; a run left out in part says to read it alone (``/api/v1/runs/{id}``)."""
    wire = page.wire()
    if encoded_size(wire) > budget:
        slots = [s for item in wire["items"] for s in _slots(item, f"/api/v1/runs/{item['id']}", budget)]
        fit(wire, slots, budget)
    return wire


def steps_page(page: Page[StepRun], run_id: str, offset: int, budget: int) -> dict[str, Any]:
    """A page of a run's steps; a step left out in part says which one-step page holds it whole."""
    wire = page.wire()
    if encoded_size(wire) > budget:
        slots = [
            s
            for i, item in enumerate(wire["items"], start=offset + 1)
            for s in _slots(item, f"/api/v1/runs/{run_id}/steps?page={i}&pageSize=1", budget)
        ]
        fit(wire, slots, budget)
    return wire


def snapshot_reply(snap: WsSnapshot, budget: int) -> dict[str, Any]:
    """A WebSocket's first frame: the run and its steps, each large value read alone where it fits."""
    wire = snap.wire()
    if encoded_size(wire) > budget:
        run = wire["run"]
        slots = _slots(run, f"/api/v1/runs/{run['id']}", budget)
        for step in wire["steps"].values():
            slots += _slots(step, f"/api/v1/runs/{run['id']}/steps", budget)
        fit(wire, slots, budget)
    return wire
