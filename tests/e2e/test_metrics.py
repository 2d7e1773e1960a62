"""Every service's ``/metrics`` after real work: a run whose steps succeed, wait on a timer and fail,
and a live WebSocket. The families the dashboard (deploy/observability) plots are asserted here
with their labels and values, scraped from the processes as Prometheus would."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from flowmesh.contracts.testing import http_step, linear, node
from stack import ProcessStack, open_ws, publish_flow, wait_run
from upstream import Upstream

SERVICES = ("gateway", "flows", "runner", "scheduler", "usage")
RUNNER_CONSUMERS = {"runner-steps", "runner-starts", "runner-timers", "runner-events", "runner-flows"}

Families = dict[str, list[Sample]]


def scrape(stack: ProcessStack, service: str) -> Families:
    """The samples of a service's ``/metrics`` by family name (a family with no samples yet is present, empty)."""
    r = httpx.get(stack.metrics_url(service), timeout=5)
    assert r.status_code == 200, r.text
    return {f.name: list(f.samples) for f in text_string_to_metric_families(r.text)}


def value(families: Families, sample: str, **labels: str) -> float:
    """The sum of the samples named ``sample`` whose labels include ``labels`` (0 when none)."""
    family = sample.removesuffix("_total").removesuffix("_count").removesuffix("_sum").removesuffix("_bucket")
    return sum(
        s.value
        for s in families.get(family, [])
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    )


def eventually(stack: ProcessStack, service: str, check: Callable[[Families], bool], timeout: float = 20) -> Families:
    """Scrape ``service`` until ``check`` holds (bounded); the last scrape."""
    deadline = time.monotonic() + timeout
    while True:
        families = scrape(stack, service)
        if check(families):
            return families
        if time.monotonic() > deadline:
            raise AssertionError(f"{service}: condition not met within {timeout}s")
        time.sleep(0.1)


def flow_that_calls_waits_and_fails(upstream: Upstream) -> dict[str, Any]:
    return linear(
        http_step("call", upstream.base + "/metrics-e2e"),
        node("pause", "delay", durationMs=200),
        node("shape"),
        node("boom", "fail", message="failed on purpose"),
    )


def test_every_service_serves_metrics_with_the_families_the_dashboard_plots(stack: ProcessStack) -> None:
    for service in SERVICES:
        families = scrape(stack, service)
        assert {"flowmesh_rpc_calls", "flowmesh_rpc_seconds", "flowmesh_consumer_pending_messages"} <= set(families)
    assert {"flowmesh_http_requests", "flowmesh_http_request_seconds", "flowmesh_gateway_websocket_connections"} <= set(
        scrape(stack, "gateway")
    )
    assert "flowmesh_scheduler_lateness_seconds" in scrape(stack, "scheduler")
    assert "flowmesh_usage_metering_lag_seconds" in scrape(stack, "usage")


def test_a_run_counts_its_steps_by_type_and_outcome_and_the_websocket_gauge_follows_connections(
    stack: ProcessStack, alice: httpx.Client, upstream: Upstream
) -> None:
    flow_id = publish_flow(alice, flow_that_calls_waits_and_fails(upstream))
    runner0, gateway0, scheduler0, usage0 = (scrape(stack, s) for s in ("runner", "gateway", "scheduler", "usage"))
    ws0 = value(gateway0, "flowmesh_gateway_websocket_connections", kind="flow")

    with open_ws(stack, f"/ws/flows/{flow_id}", alice):
        eventually(stack, "gateway", lambda f: value(f, "flowmesh_gateway_websocket_connections", kind="flow") > ws0)
        r = alice.post(f"/flows/{flow_id}/runs", json={"input": {}})
        assert r.status_code == 201, r.text
        run = wait_run(alice, r.json()["id"])
    assert run["status"] == "failed" and run["error"]["stepId"] == "boom"

    def grew(before: Families, sample: str, **labels: str) -> Callable[[Families], bool]:
        return lambda now: value(now, sample, **labels) > value(before, sample, **labels)

    steps = "flowmesh_runner_steps_total"
    runner = eventually(stack, "runner", grew(runner0, steps, type="fail", outcome="failed"))
    for step_type in ("http", "delay", "transform"):
        assert value(runner, steps, type=step_type, outcome="succeeded") > value(
            runner0, steps, type=step_type, outcome="succeeded"
        ), step_type
    http_s = "flowmesh_runner_step_duration_seconds_count"
    assert value(runner, http_s, type="http") > value(runner0, http_s, type="http")
    # the delay's recorded duration covers its 200 ms wait
    assert (
        value(runner, "flowmesh_runner_step_duration_seconds_sum", type="delay")
        - value(runner0, "flowmesh_runner_step_duration_seconds_sum", type="delay")
        >= 0.2
    )
    assert value(runner, "flowmesh_runner_runs_started_total", trigger="manual") > value(
        runner0, "flowmesh_runner_runs_started_total", trigger="manual"
    )
    assert value(runner, "flowmesh_runner_runs_finished_total", outcome="failed") > value(
        runner0, "flowmesh_runner_runs_finished_total", outcome="failed"
    )
    assert value(runner, "flowmesh_runner_runs_in_flight") >= 0
    pending = {s.labels["consumer"]: s.value for s in runner["flowmesh_consumer_pending_messages"]}
    assert set(pending) == RUNNER_CONSUMERS and all(v >= 0 for v in pending.values())
    assert set(pending) == {s.labels["consumer"] for s in runner["flowmesh_consumer_ack_pending_messages"]}

    # the delay is a durable timer: the scheduler fired it, a little after it was due
    lateness = "flowmesh_scheduler_lateness_seconds_count"
    scheduler = eventually(stack, "scheduler", grew(scheduler0, lateness, kind="timer"))
    assert value(scheduler, "flowmesh_scheduler_lateness_seconds_sum", kind="timer") >= 0

    # the run's events were metered, and how long after they happened is measured
    usage = eventually(stack, "usage", grew(usage0, "flowmesh_usage_metering_lag_seconds_count"))
    assert value(usage, "flowmesh_usage_metering_lag_seconds_sum") >= value(
        usage0, "flowmesh_usage_metering_lag_seconds_sum"
    )
    assert "usage-meter" in {s.labels["consumer"] for s in usage["flowmesh_consumer_pending_messages"]}

    gateway = eventually(
        stack, "gateway", lambda f: value(f, "flowmesh_gateway_websocket_connections", kind="flow") == ws0
    )
    latency = [s for s in gateway["flowmesh_http_request_seconds"] if s.name.endswith("_count")]
    routes = {(s.labels["method"], s.labels["route"], s.labels["status_class"]) for s in latency}
    assert ("POST", "/api/v1/flows/{flowId}/runs", "2xx") in routes
    assert ("GET", "/api/v1/runs/{runId}", "2xx") in routes
    # route labels are templates: no id of any flow or run, and WebSocket sessions (101) are not latencies;
    # a refused upgrade (401, 404: other tests on this stack make some) is an answer like any other
    assert all(flow_id not in route and run["id"] not in route for _, route, _ in routes)
    assert not any(route.startswith("/ws/") and status_class == "1xx" for _, route, status_class in routes)
    requests = "flowmesh_http_requests_total"
    assert value(gateway, requests, method="GET", route="/ws/flows/{flowId}", status="101") > 0


def test_a_path_no_route_serves_is_labelled_unmatched_and_an_odd_method_other(stack: ProcessStack) -> None:
    junk = f"/nothing/{uuid.uuid4().hex}"
    assert httpx.get(stack.base + junk).status_code == 404
    assert httpx.request("PROPFIND", stack.base + "/api/v1/flows").status_code < 500
    gateway = scrape(stack, "gateway")
    routes = {s.labels["route"] for s in gateway["flowmesh_http_requests"]}
    methods = {s.labels["method"] for s in gateway["flowmesh_http_requests"]}
    assert "unmatched" in routes and not any(junk in r for r in routes)
    assert "PROPFIND" not in methods and "other" in methods
