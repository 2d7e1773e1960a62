"""W3C trace context and OpenTelemetry spans: one trace per request, carried on every message it causes.

The current trace context is one ``traceparent`` string in a context variable, whether spans are
exported or not: a request, a message and a step attempt set it, log lines read its trace id
(:mod:`flowmesh.runtime.logs`), and every NATS message and outbound HTTP request sent meanwhile
carries it (:func:`inject`). With tracing off that is all: no span objects, no OpenTelemetry
context, a context-variable set and reset per request or message (the run path stays as fast).

Spans are exported over OTLP/HTTP when the standard ``OTEL_*`` variables ask for it
(:func:`configure_tracing`): then :func:`span` starts a span whose parent is the current
``traceparent`` (so one parse of a string is the whole propagation, in and across processes) and
makes that span's ``traceparent`` the current one for its block. A span is a small record made
into the SDK's ``ReadableSpan`` when it ends and handed to the SDK's batch processor and OTLP
exporter; the SDK's tracer (locks, bounded collections and attribute checks per span) cost the
gateway a seventh of its CPU. OpenTelemetry's own context and its auto-instrumentation are not
used: see ``docs/decisions.md``.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import re
import time
import traceback
from collections.abc import Mapping, MutableMapping
from contextvars import ContextVar, Token
from types import SimpleNamespace, TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar

from aiohttp import TraceConfig, TraceRequestEndParams, TraceRequestExceptionParams, TraceRequestStartParams

from flowmesh.contracts import headers

if TYPE_CHECKING:
    from aiohttp import ClientSession
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.sampling import Sampler
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

log = logging.getLogger(__name__)

_TRACEPARENT = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
_ZERO_TRACE: Final = "0" * 32
_ZERO_SPAN: Final = "0" * 16

Kind = Literal["server", "client", "consumer", "producer", "internal"]
Value = str | int | float | bool

_C = TypeVar("_C", bound=MutableMapping[str, str])
_current: ContextVar[str | None] = ContextVar("flowmesh_traceparent", default=None)
_recorder: _Recorder | None = None
_provider: TracerProvider | None = None
_DEFAULT_SAMPLERS = ("", "parentbased_always_on")


def new_traceparent() -> str:
    """A fresh, sampled trace context.

    Ids from :mod:`random`, as OpenTelemetry's own generator makes them: they must be unique, not
    secret, and ``secrets`` costs a system call each (a tenth of a request's time in the gateway).
    """
    return f"00-{random.getrandbits(128) or 1:032x}-{random.getrandbits(64) or 1:016x}-01"


def valid_traceparent(value: str | None) -> bool:
    """Whether a client-given ``traceparent`` is well-formed (else we start a new trace)."""
    return (
        value is not None
        and _TRACEPARENT.fullmatch(value) is not None
        and value[3:35] != _ZERO_TRACE
        and value[36:52] != _ZERO_SPAN
    )


def trace_id_of(traceparent: str | None) -> str | None:
    """The 32-hex trace id of a ``traceparent``."""
    return traceparent[3:35] if traceparent else None


# --- configuration --------------------------------------------------------------------------------


def exporting(env: Mapping[str, str]) -> bool:
    """Whether the ``OTEL_*`` variables ask for spans to be exported (an OTLP endpoint is set, the SDK on)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() in ("none", ""):
        return False
    return bool(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def configure_tracing(service: str, env: Mapping[str, str] | None = None) -> bool:
    """Export spans over OTLP/HTTP, batched, when the ``OTEL_*`` variables ask for it; True if so.

    The exporter and the batch processor read their own settings from the environment
    (``OTEL_EXPORTER_OTLP_*``, ``OTEL_BSP_*``), the sampler ``OTEL_TRACES_SAMPLER``; the service
    name is ``OTEL_SERVICE_NAME``, else ``flowmesh-<service>``. Nothing is imported from the SDK
    unless it is used.
    """
    global _recorder, _provider
    env = os.environ if env is None else env
    if not exporting(env):
        return False
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    name = env.get("OTEL_SERVICE_NAME") or f"flowmesh-{service}"
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    # read from ``env`` (the process's environment, or a test's), the rest by the SDK from the process's
    endpoint = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env["OTEL_EXPORTER_OTLP_ENDPOINT"].rstrip("/") + "/v1/traces"
    )
    delay = env.get("OTEL_BSP_SCHEDULE_DELAY")
    batch = BatchSpanProcessor(
        OTLPSpanExporter(endpoint=endpoint), schedule_delay_millis=float(delay) if delay else None
    )
    provider.add_span_processor(batch)  # so the provider's shutdown flushes it
    # the default sampler (parent-based, always on) is a flag test, not a call
    default = env.get("OTEL_TRACES_SAMPLER", "").strip().lower() in _DEFAULT_SAMPLERS
    _provider, _recorder = provider, _Recorder(provider, batch, None if default else provider.sampler)
    log.info("tracing: exporting spans of %s over OTLP/HTTP", name)
    return True


def shutdown_tracing() -> None:
    """Export the spans still batched and stop exporting (at the end of the process)."""
    global _recorder, _provider
    provider, _provider, _recorder = _provider, None, None
    if provider is not None:
        provider.shutdown()


def enabled() -> bool:
    """Whether spans are being exported."""
    return _recorder is not None


# --- the current context ----------------------------------------------------------------------------


def current_traceparent() -> str | None:
    """The ``traceparent`` of what this task is doing now (a request, a message, a step attempt)."""
    return _current.get()


def inject(carrier: _C) -> _C:
    """Add the current ``traceparent`` to message or request headers (when there is one)."""
    tp = _current.get()
    if tp is not None:
        carrier[headers.TRACEPARENT] = tp
    return carrier


def for_run(stored: str | None) -> str | None:
    """The parent for work on a run whose trace is ``stored``: the current context when it is already
    in that trace (more precise), else the run's own (a timer, the sweep, a retry came from elsewhere)."""
    current = _current.get()
    if stored is None or (current is not None and current[3:35] == stored[3:35]):
        return current
    return stored


class _Joined:
    """Makes a ``traceparent`` current for a block (tracing off, or a context with no span of its own)."""

    __slots__ = ("_token", "_tp")

    def __init__(self, tp: str) -> None:
        self._tp = tp
        self._token: Token[str | None] | None = None

    def __enter__(self) -> _Joined:
        self._token = _current.set(self._tp)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._token is not None:
            _current.reset(self._token)

    def set_attribute(self, key: str, value: Value) -> None:
        """Nothing is recorded with tracing off."""

    def set_error(self, message: str) -> None:
        """Nothing is recorded with tracing off."""

    def fail(self, exc: BaseException) -> None:
        """Nothing is recorded with tracing off."""

    def end(self) -> None:
        """Nothing to end with tracing off."""


class _Nothing(_Joined):
    """No context to enter: the one shared do-nothing block."""

    __slots__ = ()

    def __enter__(self) -> _Joined:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None


NOTHING: Final = _Nothing("")
"""The block that does nothing (tracing off, nothing to continue)."""

Block = _Joined
"""What :func:`span` and :func:`joined` return: a block with ``set_attribute`` and ``set_error``."""


def joined(traceparent: str | None) -> _Joined:
    """A block in the trace of ``traceparent`` (no span of its own); a valid one only."""
    if traceparent is None or not valid_traceparent(traceparent):
        return NOTHING
    return _Joined(traceparent)


class _Recorder:
    """What a span needs from the SDK: its processor, resource and scope, and a sampler if not the default."""

    def __init__(self, provider: TracerProvider, processor: SpanProcessor, sampler: Sampler | None) -> None:
        from opentelemetry.sdk.trace import Event, ReadableSpan
        from opentelemetry.sdk.trace.sampling import Decision
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

        self.processor = processor
        self.sampler = sampler
        self.resource: Resource = provider.resource
        self.scope: InstrumentationScope = InstrumentationScope("flowmesh")
        self.kinds = {
            "server": SpanKind.SERVER,
            "client": SpanKind.CLIENT,
            "consumer": SpanKind.CONSUMER,
            "producer": SpanKind.PRODUCER,
            "internal": SpanKind.INTERNAL,
        }
        self.sampled = TraceFlags(TraceFlags.SAMPLED)
        self.record_and_sample = Decision.RECORD_AND_SAMPLE
        self.unset, self.error = Status(StatusCode.UNSET), StatusCode.ERROR
        self.SpanContext, self.ReadableSpan, self.Event, self.Status = SpanContext, ReadableSpan, Event, Status

    def start(self, name: str, kind: Kind, parent: str | None, attributes: Mapping[str, Value] | None) -> _Joined:
        """A recording span, or (sampled out) a block passing an unsampled context on."""
        span_id = random.getrandbits(64) or 1
        if parent is None:
            trace_id, parent_context, flags = random.getrandbits(128) or 1, None, 1
        else:
            trace_id, parent_context, flags = int(parent[3:35], 16), _parent_context(parent), int(parent[53:55], 16)
        if self.sampler is not None:
            result = self.sampler.should_sample(
                _otel_context(parent) if parent is not None else None, trace_id, name, self.kinds[kind], attributes
            )
            flags = 1 if result.decision is self.record_and_sample else 0
        elif parent is None:
            flags = 1
        if not flags & 1:
            return _Joined(f"00-{trace_id:032x}-{span_id:016x}-00")
        return _Span(self, name, kind, trace_id, span_id, parent_context, attributes)


class _Span(_Joined):
    """A recording span (tracing on) and its ``traceparent`` made current for the block."""

    __slots__ = ("_attributes", "_events", "_kind", "_name", "_parent", "_recorder", "_span_id", "_start", "_status")

    def __init__(
        self,
        recorder: _Recorder,
        name: str,
        kind: Kind,
        trace_id: int,
        span_id: int,
        parent: Any,
        attributes: Mapping[str, Value] | None,
    ) -> None:
        super().__init__(f"00-{trace_id:032x}-{span_id:016x}-01")
        self._recorder, self._name, self._kind, self._span_id, self._parent = recorder, name, kind, span_id, parent
        self._attributes: dict[str, Value] = dict(attributes) if attributes else {}
        self._events: list[Any] = []
        self._status: Any = recorder.unset
        self._start = time.time_ns()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        super().__exit__(exc_type, exc, tb)
        # an error answer the caller caused (a 4xx) is the request's outcome, not a failure here
        if exc is not None and getattr(exc, "status", 500) >= 500 and not isinstance(exc, GeneratorExit):
            self.fail(exc)
        self.end()

    def fail(self, exc: BaseException) -> None:
        """Record ``exc`` on the span (an ``exception`` event, as the SDK records one) and mark it failed."""
        stack = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        attributes = {
            "exception.type": type(exc).__name__,
            "exception.message": str(exc),
            "exception.stacktrace": stack,
        }
        self._events.append(self._recorder.Event("exception", attributes))
        self.set_error(f"{type(exc).__name__}: {exc}")

    def end(self) -> None:
        """End the span (when not used as a block): hand it to the exporter's batch."""
        r = self._recorder
        tp = self._tp
        context = r.SpanContext(int(tp[3:35], 16), self._span_id, is_remote=False, trace_flags=r.sampled)
        r.processor.on_end(
            r.ReadableSpan(
                self._name,
                context,
                self._parent,
                r.resource,
                self._attributes,
                self._events,
                (),
                r.kinds[self._kind],
                None,
                self._status,
                self._start,
                time.time_ns(),
                r.scope,
            )
        )

    def set_attribute(self, key: str, value: Value) -> None:
        """Record an attribute on the span."""
        self._attributes[key] = value

    def set_error(self, message: str) -> None:
        """Mark the span as failed."""
        self._status = self._recorder.Status(self._recorder.error, message)


def span(
    name: str, *, kind: Kind = "internal", parent: str | None = None, attributes: Mapping[str, Value] | None = None
) -> _Joined:
    """A span for the block, child of ``parent`` (a ``traceparent``) or else of the current context.

    With tracing off, only ``parent`` is made current (when given), so what the block sends and
    logs still carries the trace. Use as ``with span(...) as s: s.set_attribute(...)``.
    """
    recorder = _recorder
    if recorder is None:
        return NOTHING if parent is None else joined(parent)
    tp = parent if parent is not None and valid_traceparent(parent) else _current.get()
    return recorder.start(name, kind, tp, attributes)


@functools.lru_cache(maxsize=1024)
def _parent_context(tp: str) -> Any:
    """The span context of a ``traceparent``, as a span's parent (immutable, so shared: a request,
    a message and the spans under them name the same parent several times)."""
    from opentelemetry.trace import SpanContext, TraceFlags

    flags = TraceFlags(int(tp[53:55], 16))
    return SpanContext(int(tp[3:35], 16), int(tp[36:52], 16), is_remote=True, trace_flags=flags)


def _otel_context(tp: str) -> Any:
    """An OpenTelemetry context holding a ``traceparent``'s span (what a configured sampler reads)."""
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan

    return trace.set_span_in_context(NonRecordingSpan(_parent_context(tp)))


# --- outbound HTTP ------------------------------------------------------------------------------------


def client_trace_config() -> TraceConfig:
    """aiohttp client hooks: every request a client span (tracing on) and a ``traceparent`` header.

    Given to a ``ClientSession(trace_configs=[...])``; each redirect hop is a request of its own.
    """
    config = TraceConfig()
    config.on_request_start.append(_request_start)
    config.on_request_end.append(_request_end)
    config.on_request_exception.append(_request_exception)
    return config


async def _request_start(_: ClientSession, ctx: SimpleNamespace, params: TraceRequestStartParams) -> None:
    recorder = _recorder
    if recorder is None:
        inject(params.headers)
        return
    url = params.url
    attributes: dict[str, Value] = {
        "http.request.method": params.method,
        "server.address": url.host or "",
        "url.path": url.path,  # no query: it may hold a credential
    }
    if url.port is not None:
        attributes["server.port"] = url.port
    block = recorder.start(params.method, "client", _current.get(), attributes)
    ctx.flowmesh_span = block
    params.headers[headers.TRACEPARENT] = block._tp


async def _request_end(_: ClientSession, ctx: SimpleNamespace, params: TraceRequestEndParams) -> None:
    block: _Joined | None = getattr(ctx, "flowmesh_span", None)
    if block is not None:
        status = params.response.status
        block.set_attribute("http.response.status_code", status)
        if status >= 500:
            block.set_error(f"HTTP {status}")
        block.end()


async def _request_exception(_: ClientSession, ctx: SimpleNamespace, params: TraceRequestExceptionParams) -> None:
    block: _Joined | None = getattr(ctx, "flowmesh_span", None)
    if block is not None:
        block.fail(params.exception)
        block.end()
