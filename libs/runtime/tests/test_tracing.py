"""Tracing: off (no ``OTEL_*``) it sends nothing and allocates nothing; on, spans reach a real OTLP/HTTP
receiver, the trace context carries over headers, outbound HTTP and log lines."""

from __future__ import annotations

import io
import json
import logging
import secrets
from collections.abc import Iterator

import aiohttp
import pytest
from aiohttp import web

from flowmesh.runtime import tracing
from flowmesh.runtime.logs import ContextFilter, log_context
from otlp import OtlpReceiver


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver()
    yield r
    r.close()


@pytest.fixture
def exporting(receiver: OtlpReceiver) -> Iterator[OtlpReceiver]:
    assert tracing.configure_tracing("unit", env=receiver.env())
    try:
        yield receiver
    finally:
        tracing.shutdown_tracing()


def a_traceparent() -> str:
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "x"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "TRUE"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "false"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_TRACES_EXPORTER": "none"}, False),
    ],
)
def test_spans_are_exported_only_when_the_otel_variables_ask(env: dict[str, str], expected: bool) -> None:
    assert tracing.exporting(env) is expected


def test_without_otel_variables_there_is_no_exporter_and_nothing_is_sent(receiver: OtlpReceiver) -> None:
    assert not tracing.configure_tracing("unit", env={"OTEL_SERVICE_NAME": "unit"})
    assert not tracing.enabled()
    # no span object, no allocation: the one shared do-nothing block
    assert tracing.span("x", kind="server") is tracing.NOTHING
    tp = a_traceparent()
    with tracing.span("x", parent=tp) as s:
        s.set_attribute("a", 1)
        s.set_error("ignored")
        assert tracing.current_traceparent() == tp  # the trace is still carried
        assert tracing.inject({}) == {"traceparent": tp}
    assert tracing.current_traceparent() is None
    tracing.shutdown_tracing()
    assert receiver.requests == 0


def test_a_malformed_or_zero_parent_is_not_continued() -> None:
    assert tracing.joined("00-zz-yy-01") is tracing.NOTHING
    assert tracing.joined("00-" + "0" * 32 + "-" + "1" * 16 + "-01") is tracing.NOTHING
    assert tracing.span("x", parent="garbage") is tracing.NOTHING


def test_a_run_keeps_its_trace_unless_the_current_context_is_already_in_it() -> None:
    stored = a_traceparent()
    assert tracing.for_run(stored) == stored  # a timer, the sweep: nothing current
    with tracing.joined(a_traceparent()):
        assert tracing.for_run(stored) == stored  # another trace is current: the run's wins
    same_trace = f"00-{stored[3:35]}-{secrets.token_hex(8)}-01"
    with tracing.joined(same_trace):
        assert tracing.for_run(stored) == same_trace  # already in the run's trace: the closer parent
    assert tracing.for_run(None) is None


def test_spans_reach_the_receiver_as_children_of_their_parent(exporting: OtlpReceiver) -> None:
    tp = a_traceparent()
    with tracing.span("outer", kind="server", parent=tp, attributes={"k": "v"}):
        outer_tp = tracing.current_traceparent()
        assert outer_tp is not None and outer_tp[3:35] == tp[3:35] and outer_tp != tp
        with tracing.span("inner"):
            pass
    with pytest.raises(RuntimeError), tracing.span("broken"):
        raise RuntimeError("boom")
    tracing.shutdown_tracing()  # flushes the batch
    spans = {s.name: s for s in exporting.spans}
    assert spans["outer"].trace_id == tp[3:35] and spans["outer"].parent_span_id == tp[36:52]
    assert spans["outer"].kind == "server" and spans["outer"].attributes == {"k": "v"}
    assert spans["outer"].service == "flowmesh-unit"
    assert spans["inner"].parent_span_id == spans["outer"].span_id
    assert spans["broken"].error and not spans["outer"].error


def test_a_span_without_a_parent_starts_a_trace_and_a_failure_is_an_exception_event(exporting: OtlpReceiver) -> None:
    with tracing.span("root") as root:
        tp = tracing.current_traceparent()
        assert tp is not None and tp.endswith("-01")
        root.set_attribute("n", 3)
    with pytest.raises(OSError, match="refused"), tracing.span("refused"):
        raise OSError("connection refused")
    tracing.shutdown_tracing()
    spans = {s.name: s for s in exporting.spans}
    assert spans["root"].parent_span_id == "" and spans["root"].trace_id == tp[3:35]
    assert spans["root"].span_id == tp[36:52] and spans["root"].attributes == {"n": 3}
    assert spans["refused"].error and spans["refused"].trace_id != spans["root"].trace_id


@pytest.mark.parametrize(
    ("sampler", "parent_flags", "exported"),
    [
        ("parentbased_always_on", "00", False),  # the default: an unsampled parent's children are not sampled
        ("parentbased_always_on", "01", True),
        ("always_off", "01", False),
        ("always_on", "00", True),
        ("parentbased_traceidratio", "00", False),
    ],
)
def test_the_otel_sampler_decides_and_an_unsampled_context_is_passed_on(
    receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch, sampler: str, parent_flags: str, exported: bool
) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", sampler)  # the SDK reads its sampler from the process
    assert tracing.configure_tracing("unit", env=receiver.env(OTEL_TRACES_SAMPLER=sampler))
    parent = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-{parent_flags}"
    try:
        with tracing.span("maybe", parent=parent):
            tp = tracing.current_traceparent()
            assert tp is not None and tp[3:35] == parent[3:35]
            assert tracing.inject({}) == {"traceparent": tp}
    finally:
        tracing.shutdown_tracing()
    assert tp.endswith("-01") is exported
    assert [s.name for s in receiver.spans] == (["maybe"] if exported else [])


def test_the_service_name_follows_otel_service_name(receiver: OtlpReceiver) -> None:
    assert tracing.configure_tracing("unit", env=receiver.env(OTEL_SERVICE_NAME="custom"))
    try:
        with tracing.span("named"):
            pass
    finally:
        tracing.shutdown_tracing()
    assert [s.service for s in receiver.spans] == ["custom"]


async def _echo_server() -> tuple[web.AppRunner, str, list[str | None]]:
    seen: list[str | None] = []

    async def echo(request: web.Request) -> web.Response:
        seen.append(request.headers.get("traceparent"))
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/echo", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}/echo", seen


async def test_outbound_requests_carry_the_trace_with_tracing_off() -> None:
    runner, url, seen = await _echo_server()
    try:
        async with aiohttp.ClientSession(trace_configs=[tracing.client_trace_config()]) as session:
            tp = a_traceparent()
            with tracing.joined(tp):
                async with session.get(url) as resp:
                    assert resp.status == 200
            async with session.get(url) as resp:  # no trace: no header
                assert resp.status == 200
    finally:
        await runner.cleanup()
    assert seen == [tp, None]


async def test_outbound_requests_are_client_spans_with_tracing_on(exporting: OtlpReceiver) -> None:
    runner, url, seen = await _echo_server()
    tp = a_traceparent()
    try:
        async with aiohttp.ClientSession(trace_configs=[tracing.client_trace_config()]) as session:
            with tracing.span("step", parent=tp):
                async with session.get(url + "?token=secret") as resp:
                    assert resp.status == 200
    finally:
        await runner.cleanup()
    tracing.shutdown_tracing()
    client = next(s for s in exporting.spans if s.kind == "client")
    assert seen[0] is not None and seen[0][3:35] == tp[3:35] and seen[0][36:52] == client.span_id
    assert client.attributes["http.response.status_code"] == 200
    assert client.attributes["url.path"] == "/echo"  # never the query: it may hold a credential
    assert "secret" not in json.dumps(client.attributes)


def test_log_lines_carry_the_trace_id_the_run_and_the_tenant() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(ContextFilter())
    handler.setFormatter(logging.Formatter("%(message)s %(traceId)s %(runId)s %(tenant)s", defaults={}))
    logger = logging.getLogger("flowmesh.test.tracing")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        tp = a_traceparent()
        with tracing.joined(tp), log_context(run_id="r-1", tenant="acme"):
            logger.warning("inside")
        with log_context(tenant="acme"):
            logger.warning("outside %s", "trace", extra={"traceId": "-", "runId": "-"})
    finally:
        logger.removeHandler(handler)
    first, second = out.getvalue().splitlines()
    assert first == f"inside {tp[3:35]} r-1 acme"
    assert second == "outside trace - - acme"
