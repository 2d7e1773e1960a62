"""OpenTelemetry end to end: one trace from the HTTP request to the step's outbound call, exported
over OTLP/HTTP to a real receiver, and the run's trace kept across a timer and a retry."""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import nats
import pytest

from flowmesh.contracts.streams import RUN_EVENTS
from flowmesh.contracts.subjects import RunsOp, run_event
from otlp import OtlpReceiver, ReceivedSpan
from stack import ProcessStack, bearer, isolated_stack, publish_flow, wait_run
from upstream import Upstream

T = {"id": "start", "type": "trigger", "data": {}}


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def up() -> Iterator[Upstream]:
    u = Upstream()
    yield u
    u.close()


@pytest.fixture(scope="module")
def s(infra: Any, receiver: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessStack]:
    env = receiver.env(FLOWMESH_HTTP_STEP_ALLOW_PRIVATE="true")  # the upstream is on loopback
    with isolated_stack(infra.database_url, tmp_path_factory.mktemp("tracing"), env=env) as stack:
        yield stack


@pytest.fixture
def c(s: ProcessStack) -> Iterator[httpx.Client]:
    with s.client(f"trace-{uuid.uuid4().hex[:8]}") as client:
        yield client


def traceparent() -> tuple[str, str, str]:
    """A client's own trace context: the header, its trace id and its span id."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def edges(*ids: str) -> list[dict[str, str]]:
    return [{"id": f"{a}-{b}", "source": a, "target": b} for a, b in itertools.pairwise(ids)]


def step_spans(spans: list[ReceivedSpan], step_id: str) -> list[ReceivedSpan]:
    return [x for x in spans if x.name.startswith("step ") and x.attributes.get("flowmesh.step.id") == step_id]


def run_event_traceparent(stack: ProcessStack, tenant: str, flow_id: str, run_id: str) -> str | None:
    """The ``traceparent`` header of a run's ``run.succeeded`` event, as JetStream holds it."""

    async def read() -> str | None:
        nc = await nats.connect(stack.env["NATS_URL"])
        try:
            msg = await nc.jetstream().get_last_msg(
                RUN_EVENTS.name, run_event(tenant, flow_id, run_id, "run.succeeded")
            )
            return (msg.headers or {}).get("traceparent")
        finally:
            await nc.close()

    return asyncio.run(read())


def test_one_trace_covers_the_request_the_rpc_the_step_and_its_http_call(
    s: ProcessStack, c: httpx.Client, receiver: OtlpReceiver, up: Upstream
) -> None:
    path = f"/traced-{uuid.uuid4().hex[:6]}"
    d = {"nodes": [T, {"id": "call", "type": "http", "data": {"url": up.base + path}}], "edges": edges("start", "call")}
    flow_id = publish_flow(c, d)
    tp, trace_id, client_span = traceparent()
    r = c.post(f"/flows/{flow_id}/runs", json={"input": {}}, headers={"traceparent": tp})
    assert r.status_code == 201, r.text
    run = wait_run(c, r.json()["id"])
    assert run["status"] == "succeeded", run

    # the upstream server was called in the same trace
    sent = [x["traceparent"] for x in up.requests if x["path"] == path]
    assert len(sent) == 1 and sent[0] is not None and sent[0].split("-")[1] == trace_id

    def complete(spans: list[ReceivedSpan]) -> bool:
        # each process exports its own batches, whenever they fill or time out: wait for every part
        found = {(x.service, x.kind) for x in spans} | {(x.service, x.name) for x in spans}
        wanted = {
            ("flowmesh-gateway", "server"),
            ("flowmesh-gateway", RunsOp.START),
            ("flowmesh-runner", RunsOp.START),
            ("flowmesh-runner", "step http"),
            ("flowmesh-runner", "GET"),
        }
        return wanted <= found and any(x.name.startswith("db ") for x in spans)

    spans = receiver.wait_for(trace_id, complete)
    by_id = {x.span_id: x for x in spans}
    request = [x for x in spans if x.service == "flowmesh-gateway" and x.kind == "server"]
    assert [x.name for x in request] == ["POST /api/v1/flows/{flowId}/runs"]
    assert request[0].parent_span_id == client_span
    assert request[0].attributes["http.response.status_code"] == 201
    rpc_client = [x for x in spans if x.kind == "client" and x.name == RunsOp.START]
    rpc_server = [x for x in spans if x.kind == "server" and x.name == RunsOp.START]
    assert len(rpc_client) == 1 and len(rpc_server) == 1, sorted((x.service, x.kind, x.name) for x in spans)
    assert rpc_client[0].parent_span_id == request[0].span_id
    assert rpc_server[0].parent_span_id == rpc_client[0].span_id
    assert rpc_server[0].service == "flowmesh-runner"

    (step,) = step_spans(spans, "call")
    assert step.name == "step http" and step.service == "flowmesh-runner"
    assert step.attributes["flowmesh.run_id"] == run["id"]
    assert step.attributes["flowmesh.step.type"] == "http"
    assert step.attributes["flowmesh.step.attempt"] == 1
    assert step.attributes["flowmesh.step.outcome"] == "succeeded"
    (http_call,) = [x for x in spans if x.kind == "client" and x.name == "GET"]
    assert http_call.parent_span_id == step.span_id
    assert http_call.attributes["http.response.status_code"] == 200
    assert sent[0].split("-")[2] == http_call.span_id  # the upstream's parent is the client span
    # the step's span descends from the request (through the step-work message)
    ancestor = by_id.get(step.parent_span_id)
    while ancestor is not None and ancestor.span_id != request[0].span_id:
        ancestor = by_id.get(ancestor.parent_span_id)
    assert ancestor is not None, "the step span is not under the request span"
    assert any(x.name.startswith("db ") for x in spans)

    event_tp = run_event_traceparent(s, _tenant_of(c), flow_id, run["id"])
    assert event_tp is not None and event_tp.split("-")[1] == trace_id


def _tenant_of(c: httpx.Client) -> str:
    token = bearer(c)
    return str(jwt.decode(token, options={"verify_signature": False})["tenant"])


def test_steps_after_a_timer_and_a_retry_join_the_run_trace(
    c: httpx.Client, receiver: OtlpReceiver, up: Upstream
) -> None:
    path = f"/flaky-{uuid.uuid4().hex[:6]}"
    up.failures[path] = 1
    call = {
        "id": "call",
        "type": "http",
        "data": {"url": up.base + path, "retry": {"maxAttempts": 3, "backoff": "fixed", "initialDelayMs": 50}},
    }
    d = {
        "nodes": [T, {"id": "pause", "type": "delay", "data": {"durationMs": 300}}, call],
        "edges": edges("start", "pause", "call"),
    }
    flow_id = publish_flow(c, d)
    tp, trace_id, _ = traceparent()
    r = c.post(f"/flows/{flow_id}/runs", json={"input": {}}, headers={"traceparent": tp})
    assert r.status_code == 201, r.text
    run = wait_run(c, r.json()["id"])
    assert run["status"] == "succeeded", run

    sent = [x["traceparent"] for x in up.requests if x["path"] == path]
    assert len(sent) == 2  # the failure and the retry, both after the timer
    assert all(x is not None and x.split("-")[1] == trace_id for x in sent)
    spans = receiver.wait_for(trace_id, lambda found: len(step_spans(found, "call")) >= 2)
    attempts = sorted(step_spans(spans, "call"), key=lambda x: x.attributes["flowmesh.step.attempt"])
    assert [x.attributes["flowmesh.step.attempt"] for x in attempts] == [1, 2]
    assert [x.attributes["flowmesh.step.outcome"] for x in attempts] == ["failed", "succeeded"]
    assert attempts[0].error and attempts[0].attributes["flowmesh.step.error_type"] == "http-status"
    assert all(x.attributes["flowmesh.run_id"] == run["id"] for x in attempts)


def test_log_lines_carry_the_trace_the_run_and_the_tenant(s: ProcessStack, c: httpx.Client, up: Upstream) -> None:
    d = {
        "nodes": [T, {"id": "call", "type": "http", "data": {"url": up.base + "/status/404"}}],
        "edges": edges("start", "call"),
    }
    flow_id = publish_flow(c, d)
    tp, trace_id, _ = traceparent()
    r = c.post(f"/flows/{flow_id}/runs", json={"input": {}}, headers={"traceparent": tp})
    assert r.status_code == 201, r.text
    run = wait_run(c, r.json()["id"])
    assert run["status"] == "failed", run
    tenant = _tenant_of(c)

    def lines(name: str) -> list[dict[str, Any]]:
        found = []
        for line in Path(s.workdir / f"{name}.log").read_text(errors="replace").splitlines():
            if trace_id in line:
                found.append(json.loads(line))
        return found

    failed = [x for x in lines("runner") if "failed" in x["message"] and x.get("runId") == run["id"]]
    assert failed, "no runner log line of the failed attempt"
    assert failed[0]["traceId"] == trace_id and failed[0]["tenant"] == tenant
    access = [x for x in lines("gateway") if x.get("logger") == "flowmesh.gateway.access"]
    assert access and all(x["traceId"] == trace_id and x["tenant"] == tenant for x in access)


def test_a_request_without_a_trace_starts_one_at_the_gateway_span(
    s: ProcessStack, c: httpx.Client, receiver: OtlpReceiver
) -> None:
    flow_id = publish_flow(c, {"nodes": [T], "edges": []})
    r = c.post(f"/flows/{flow_id}/runs", json={"input": {}})
    assert r.status_code == 201, r.text
    run = wait_run(c, r.json()["id"])
    event_tp = run_event_traceparent(s, _tenant_of(c), flow_id, run["id"])
    assert event_tp is not None
    trace_id = event_tp.split("-")[1]

    def started(spans: list[ReceivedSpan]) -> bool:
        return any(x.service == "flowmesh-gateway" and x.kind == "server" for x in spans)

    request = [
        x for x in receiver.wait_for(trace_id, started) if x.service == "flowmesh-gateway" and x.kind == "server"
    ]
    # the root of the trace: no parent that no collector ever receives
    assert len(request) == 1 and request[0].parent_span_id == "", request
