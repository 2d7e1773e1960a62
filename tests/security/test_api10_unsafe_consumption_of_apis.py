"""OWASP API10:2023 Unsafe Consumption of APIs.

The risk for Flowmesh: ``http`` and ``llm`` steps call servers the platform does not control, and
their answers flow into runs, storage and later steps. A hostile or broken upstream can answer
without end, drip its body, lie about its content type, loop its redirects, send the call (and its
credentials) to another origin, or plant template expressions hoping the platform evaluates them
with the tenant's secrets.

What these tests prove, against a local upstream that misbehaves on purpose: an endless or huge
body stops at the response cap (``response-too-large``), a dripping body at the step's time limit
(``timeout``), a redirect loop after 5 hops, each recorded as the step's error while the platform
goes on serving; a body that is not what its content type says is kept as text, never parsed into
something else; a redirect to another origin drops the ``Authorization`` header; and expressions in
an upstream's answer stay text in every later step: neither a secret nor the run's input is put into
them. Deeper tests: the runner's ``test_http_step.py`` and ``test_http_urls_and_redirects.py``,
``services/runner/tests/test_llm.py`` (provider answers that are not JSON, too large, without
choices), ``tests/e2e/test_secrets.py`` (secrets dropped on cross-origin redirects, redaction).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx

from flowmesh.contracts.testing import linear, node
from stack import ProcessStack, publish_flow, wait_run
from upstream import Upstream


def fetch(c: httpx.Client, url: str, **data: Any) -> tuple[dict[str, Any], dict[str, Any], float]:
    """Publish a flow whose ``call`` step GETs ``url`` and run it: the run, the step, and how long it took."""
    flow_id = publish_flow(c, linear(node("call", "http", url=url, **data)))
    started = time.monotonic()
    r = c.post(f"/flows/{flow_id}/runs", json={"input": {"v": "from-the-input"}})
    assert r.status_code == 201, r.text
    run = wait_run(c, r.json()["id"], timeout=60)
    took = time.monotonic() - started
    steps = {s["stepId"]: s for s in c.get(f"/runs/{run['id']}/steps").json()["items"]}
    return run, steps["call"], took


def still_healthy(stack: ProcessStack, c: httpx.Client) -> None:
    assert httpx.get(stack.base + "/readyz", timeout=5).status_code == 200
    flow_id = publish_flow(c, linear(node("ok")))
    run = wait_run(c, c.post(f"/flows/{flow_id}/runs", json={"input": {}}).json()["id"])
    assert run["status"] == "succeeded"


def test_endless_and_huge_bodies_stop_at_the_cap(stack: ProcessStack, victim: httpx.Client, upstream: Upstream) -> None:
    for path in ("/endless", "/big"):
        run, step, took = fetch(victim, upstream.base + path)
        assert run["status"] == "failed", step
        assert step["error"]["type"] == "response-too-large", step["error"]
        assert step["output"] is None and took < 20, (path, took)
    still_healthy(stack, victim)


def test_a_dripping_body_stops_at_the_steps_time_limit(
    stack: ProcessStack, victim: httpx.Client, upstream: Upstream
) -> None:
    run, step, took = fetch(victim, upstream.base + "/trickle", timeoutMs=1000)
    assert run["status"] == "failed" and step["error"]["type"] == "timeout", step["error"]
    assert took < 10, took  # the upstream would have dripped for 30 s
    still_healthy(stack, victim)


def test_a_redirect_loop_ends_after_five_hops(stack: ProcessStack, victim: httpx.Client, upstream: Upstream) -> None:
    first = f"/loop/{uuid.uuid4().int % 10**9}"
    n = int(first.rsplit("/", 1)[1])
    run, step, _ = fetch(victim, upstream.base + first)
    assert run["status"] == "failed" and step["error"]["type"] == "too-many-redirects", step["error"]
    hops = [r for r in upstream.requests if r["path"] in {f"/loop/{n + i}" for i in range(20)}]
    assert len(hops) == 6, hops  # the request and five redirects, then no more
    still_healthy(stack, victim)


def test_bodies_are_not_what_their_content_type_says_stay_text(victim: httpx.Client, upstream: Upstream) -> None:
    run, step, _ = fetch(victim, upstream.base + "/badjson")
    assert run["status"] == "succeeded", step
    assert step["output"]["body"] == '{"truncated": [1, 2'
    run, step, _ = fetch(victim, upstream.base + "/html")
    assert run["status"] == "succeeded", step
    assert step["output"]["body"] == "<html><body>not an API</body></html>"
    assert step["output"]["headers"]["content-type"].startswith("text/html")


def test_a_redirect_to_another_origin_leaves_the_credentials_behind(victim: httpx.Client, upstream: Upstream) -> None:
    port = upstream.base.rsplit(":", 1)[1]
    landing = f"/landing/{uuid.uuid4().hex}"
    # localhost is another origin than 127.0.0.1, though the same server
    to = f"http://localhost:{port}{landing}"
    run, step, _ = fetch(victim, f"{upstream.base}/redirect?to={to}", headers={"Authorization": "Bearer tok-123456789"})
    assert run["status"] == "succeeded", step
    first = next(r for r in upstream.requests if r["path"].startswith("/redirect") and landing in r["path"])
    second = next(r for r in upstream.requests if r["path"] == landing)
    assert first["authorization"] == "Bearer tok-123456789" and second["authorization"] is None


def test_expressions_in_an_upstream_answer_are_never_evaluated(victim: httpx.Client, upstream: Upstream) -> None:
    value = "never-" + uuid.uuid4().hex
    assert victim.post("/secrets", json={"name": "DB_PASSWORD", "value": value}).status_code == 201
    definition = linear(
        node("call", "http", url=upstream.base + "/template", headers={"X-Db": "{{ secrets.DB_PASSWORD }}"}),
        node("use", output={"again": "{{ steps.call.output.body.text }}", "whole": "{{ steps.call.output.body }}"}),
    )
    flow_id = publish_flow(victim, definition)
    r = victim.post(f"/flows/{flow_id}/runs", json={"input": {"v": "from-the-input"}})
    run = wait_run(victim, r.json()["id"])
    assert run["status"] == "succeeded", run
    steps = {s["stepId"]: s for s in victim.get(f"/runs/{run['id']}/steps").json()["items"]}
    planted = "{{ secrets.DB_PASSWORD }} {{ input.v }} {{ 6 * 7 }}"
    assert steps["call"]["output"]["body"]["text"] == planted
    assert steps["use"]["output"] == {"again": planted, "whole": {"text": planted}}
    everything = victim.get(f"/runs/{run['id']}/steps").text + victim.get(f"/runs/{run['id']}").text
    assert value not in everything and "from-the-input" not in everything.replace('"v":"from-the-input"', "")
    assert "42" not in steps["use"]["output"]["again"]
