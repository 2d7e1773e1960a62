"""Flow definitions for tests: small builders of the ``{nodes, edges}`` a canvas saves.

Every service's tests need definitions (the flows service validates and stores them, the runner
executes them, the scheduler fires them); building them here keeps one spelling of the wire shape
instead of a copy per test module. The builders return plain JSON-able dicts, as a client sends them,
so a test can still change or break one on purpose.
"""

from __future__ import annotations

from datetime import datetime
from itertools import pairwise
from typing import Any, Final

from flowmesh.contracts.ids import utcnow
from flowmesh.contracts.models.flows import FlowVersion
from flowmesh.contracts.models.rpc import RunnableFlow

Definition = dict[str, Any]
"""A flow definition in its wire form: ``{"nodes": [...], "edges": [...]}``."""

START: Final = "start"
"""The id the builders give the trigger node."""


def trigger(node_id: str = START) -> dict[str, Any]:
    """The entry node."""
    return {"id": node_id, "type": "trigger", "data": {}}


def node(node_id: str, type_: str = "transform", **data: Any) -> dict[str, Any]:
    """A node of ``type_`` whose ``data`` is ``data`` (camelCase keys, as on the wire).

    A transform given no ``output`` outputs ``{"from": node_id}``, so every step has a valid config.
    """
    if type_ == "transform" and "output" not in data:
        data["output"] = {"from": node_id}
    return {"id": node_id, "type": type_, "data": data}


def edge(source: str, target: str, handle: str | None = None, *, edge_id: str | None = None) -> dict[str, Any]:
    """An edge; ``handle`` is the branch of a branching source (``sourceHandle``)."""
    default_id = f"{source}>{target}" if handle is None else f"{source}>{target}>{handle}"
    out: dict[str, Any] = {"id": edge_id or default_id, "source": source, "target": target}
    if handle is not None:
        out["sourceHandle"] = handle
    return out


def definition(*nodes: dict[str, Any], edges: list[dict[str, Any]] | None = None) -> Definition:
    """A trigger (``start``) followed by ``nodes``, joined only by ``edges``."""
    return {"nodes": [trigger(), *nodes], "edges": list(edges or [])}


def linear(*nodes: dict[str, Any]) -> Definition:
    """``start -> nodes[0] -> nodes[1] -> ...``: the nodes one after the other."""
    ids = [START, *(n["id"] for n in nodes)]
    return definition(*nodes, edges=[edge(a, b) for a, b in pairwise(ids)])


def chain(n: int) -> Definition:
    """``start`` then ``n`` transforms ``s0 .. s{n-1}``, each adding 1 to ``v`` (input ``{"v": x}``)."""
    steps = [
        node(f"s{i}", output={"v": "{{ input.v + 1 }}" if i == 0 else "{{ steps.s" + str(i - 1) + ".output.v + 1 }}"})
        for i in range(n)
    ]
    return linear(*steps)


def echo() -> Definition:
    """``start -> echo``: a flow whose output is its input."""
    return linear(node("echo", output="{{ input }}"))


def http_step(node_id: str, url: str, method: str = "GET", **data: Any) -> dict[str, Any]:
    """An ``http`` step calling ``url``."""
    return node(node_id, "http", method=method, url=url, **data)


def subflow(node_id: str, flow_id: str, input_: Any = None, **data: Any) -> dict[str, Any]:
    """A ``subflow`` step running the published flow ``flow_id`` with ``input_``."""
    if input_ is not None:
        data["input"] = input_
    return node(node_id, "subflow", flowId=flow_id, **data)


def foreach(node_id: str, flow_id: str, items: str, input_: Any = None, **data: Any) -> dict[str, Any]:
    """A ``foreach`` step running ``flow_id`` once per element of the expression ``items``."""
    if input_ is not None:
        data["input"] = input_
    return node(node_id, "foreach", flowId=flow_id, items=items, **data)


def runnable(
    tenant_id: str,
    flow_id: str,
    definition_: Definition,
    *,
    version: int = 1,
    active: bool = True,
    input_schema: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    created_at: datetime | None = None,
) -> RunnableFlow:
    """What the flows service answers the runner for a published flow (``fm.rpc.flows.runnable``)."""
    frozen = FlowVersion(
        flow_id=flow_id,
        version=version,
        definition=definition_,
        input_schema=input_schema,
        settings=settings or {},
        created_at=created_at or utcnow(),
    )
    return RunnableFlow(flow_id=flow_id, tenant_id=tenant_id, active=active, version=frozen)
