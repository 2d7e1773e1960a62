"""CEL macros through the real stack: a transform and a branch that use them, and the cost limit."""

from __future__ import annotations

from typing import Any

import httpx

from stack import publish_flow, wait_run

T = {"id": "start", "type": "trigger", "data": {}}


def edge(source: str, target: str, handle: str | None = None) -> dict[str, Any]:
    e: dict[str, Any] = {"id": f"{source}-{target}-{handle}", "source": source, "target": target}
    if handle:
        e["sourceHandle"] = handle
    return e


def run_of(c: httpx.Client, flow_id: str, inp: Any) -> dict[str, Any]:
    r = c.post(f"/flows/{flow_id}/runs", json={"input": inp})
    assert r.status_code == 201, r.text
    return wait_run(c, r.json()["id"])


MACROS_FLOW = {
    "nodes": [
        T,
        {
            "id": "paid",
            "type": "transform",
            "data": {
                "output": {
                    "ids": "{{ input.orders.filter(o, o.paid).map(o, o.id) }}",
                    "pairs": "{{ input.orders.map(o, input.orders.exists(p, p.id != o.id && p.total == o.total)) }}",
                }
            },
        },
        {"id": "big", "type": "condition", "data": {"expression": "input.orders.exists(o, o.total > 100)"}},
        {"id": "yes", "type": "transform", "data": {"output": "{{ steps.paid.output.ids }}"}},
        {"id": "no", "type": "transform", "data": {"output": "small"}},
    ],
    "edges": [edge("start", "paid"), edge("paid", "big"), edge("big", "yes", "true"), edge("big", "no", "false")],
}


def test_macros_in_a_transform_and_a_branch(alice: httpx.Client) -> None:
    flow_id = publish_flow(alice, MACROS_FLOW)
    orders = [
        {"id": 1, "paid": True, "total": 150},
        {"id": 2, "paid": False, "total": 20},
        {"id": 3, "paid": True, "total": 20},
    ]
    run = run_of(alice, flow_id, {"orders": orders})
    assert run["status"] == "succeeded", run
    assert run["output"] == [1, 3]
    steps = {s["stepId"]: s for s in alice.get(f"/runs/{run['id']}/steps").json()["items"]}
    assert steps["paid"]["output"] == {"ids": [1, 3], "pairs": [False, True, True]}
    small = run_of(alice, flow_id, {"orders": [{"id": 9, "paid": True, "total": 5}]})
    assert small["status"] == "succeeded" and small["output"] == "small"


def test_a_run_over_the_cost_limit_fails_with_a_clear_error(alice: httpx.Client) -> None:
    flow_id = publish_flow(alice, MACROS_FLOW)
    orders = [{"id": i, "paid": True, "total": i} for i in range(3000)]
    run = run_of(alice, flow_id, {"orders": orders})
    assert run["status"] == "failed", run
    error = run["error"]
    assert error["type"] == "expression-too-costly" and error["stepId"] == "paid"
    assert "too costly: it could cost" in error["message"] and "input.orders" in error["message"]


def test_an_expression_too_costly_whatever_its_input_is_a_422_naming_it(alice: httpx.Client) -> None:
    nested = "input.a.map(x, x.b.map(y, y.c.map(z, z.d.exists(w, w == 1))))"
    definition = {
        "nodes": [T, {"id": "c", "type": "condition", "data": {"expression": nested}}],
        "edges": [edge("start", "c")],
    }
    r = alice.post("/flows", json={"name": "f", "definition": definition})
    assert r.status_code == 201, r.text
    r = alice.post(f"/flows/{r.json()['id']}/publish")
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    errors = r.json()["errors"]
    assert errors == [
        {
            "path": "/nodes/1/data/expression",
            "message": f"node 'c': expression {nested!r} is too costly: nests macros more than 3 deep",
        }
    ]
