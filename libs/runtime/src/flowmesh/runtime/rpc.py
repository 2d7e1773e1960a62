"""Request/reply over core NATS (``fm.rpc.<service>.<op>``) with the shared error vocabulary.

A service declares its operations on an :class:`RpcRouter` as module-level functions typed by their
contract (``async def create(req: FlowCreate, ctx: RpcContext, deps: FlowsDeps) -> Flow``) and
includes the router in its :class:`RpcServer` with its dependencies object. A handler returns
JSON-able data or raises a :class:`FlowmeshError`; the reply is ``{"data": ...}`` or
``{"error": <problem>}``. Clients call :meth:`RpcClient.call`, which raises the same error again.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar, get_type_hints

import nats.errors
import orjson
from faststream.nats import NatsBroker
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import BaseModel, TypeAdapter, ValidationError

from flowmesh.contracts import headers
from flowmesh.contracts.errors import (
    FlowmeshError,
    GatewayTimeout,
    InvalidInput,
    ReplyTooLarge,
    ServiceUnavailable,
    from_problem,
)
from flowmesh.contracts.models.problem import Problem
from flowmesh.contracts.strict import field_errors
from flowmesh.runtime.db_errors import database_unavailable
from flowmesh.runtime.logs import log_context
from flowmesh.runtime.metrics import RPC_CALLS, RPC_SECONDS, RPC_SERVED
from flowmesh.runtime.tracing import enabled as tracing_enabled
from flowmesh.runtime.tracing import inject, span

log = logging.getLogger(__name__)

DEFAULT_REPLY_LIMIT = 1024 * 1024
"""NATS's default ``max_payload``: the reply limit of a context built without a connection."""


@dataclass(frozen=True, slots=True)
class RpcContext:
    """Who is calling: taken from message headers set by the gateway from a verified token."""

    tenant: str
    role: str
    subject: str
    traceparent: str | None
    reply_limit: int = DEFAULT_REPLY_LIMIT
    """The largest reply the connection can send (the server's ``max_payload``)."""

    @property
    def reply_budget(self) -> int:
        """What a reply that may grow with what runs hold (pages, a run) should stay within.

        Well under :attr:`reply_limit`: the reply is re-encoded on its way (the gateway's HTTP
        answer), and a handler's measure need not be exact.
        """
        return self.reply_limit * 3 // 4


Handler = Callable[[RpcContext, Any], Awaitable[Any]]
"""A raw handler: the caller's context and the decoded JSON body (see :class:`RpcRouter` for typed ones)."""

DepsT = TypeVar("DepsT")
TypedHandler = TypeVar("TypedHandler", bound=Callable[..., Awaitable[Any]])


def _dump(data: Any, *, exclude_unset: bool = False) -> Any:
    if isinstance(data, BaseModel):
        return data.model_dump(mode="json", by_alias=True, exclude_unset=exclude_unset)
    if isinstance(data, list):
        return [_dump(d, exclude_unset=exclude_unset) for d in data]
    return data


def request_parser(fn: Callable[..., Any]) -> Callable[[Any], Any]:
    """How to turn a decoded body into the request of ``fn``, read once from its first parameter's annotation.

    A pydantic model is validated with ``model_validate``, any other type through a ``TypeAdapter``;
    ``Any`` (or ``object``) hands the decoded body over as it is, for operations that take no body.
    Built at registration, so serving a request inspects nothing.

    Raises:
        TypeError: ``fn`` has no parameters, or its first one is not annotated.
    """
    params = list(inspect.signature(fn).parameters)
    if not params:
        raise TypeError(f"{fn.__qualname__}: an RPC handler takes the request as its first parameter")
    hints = get_type_hints(fn)
    if params[0] not in hints:
        raise TypeError(f"{fn.__qualname__}: annotate the request parameter {params[0]!r} with its contract model")
    wanted = hints[params[0]]
    if wanted is Any or wanted is object:
        return _as_is
    if isinstance(wanted, type) and issubclass(wanted, BaseModel):
        return wanted.model_validate
    return TypeAdapter(wanted).validate_python


def _as_is(body: Any) -> Any:
    return body


@dataclass(frozen=True, slots=True)
class Route(Generic[DepsT]):
    """One operation of a router: its subject, its handler and how its request is parsed."""

    subject: str
    handler: Callable[[Any, RpcContext, DepsT], Awaitable[Any]]
    parse: Callable[[Any], Any]
    tenant_required: bool
    guard: Callable[[RpcContext], None] | None = None

    def bind(self, deps: DepsT) -> Handler:
        """The raw handler that parses the body and calls this route's handler with ``deps``."""
        handler, parse, guard = self.handler, self.parse, self.guard
        if guard is None:

            async def call(ctx: RpcContext, body: Any) -> Any:
                return await handler(parse(body), ctx, deps)

            return call

        async def guarded(ctx: RpcContext, body: Any) -> Any:
            guard(ctx)  # who may call is answered before what was asked is read
            return await handler(parse(body), ctx, deps)

        return guarded


class RpcRouter(Generic[DepsT]):
    """A service's operations as module-level functions, typed by their contract.

    ``@router.handler(FlowsOp.CREATE) async def create(req: FlowCreate, ctx: RpcContext, deps: FlowsDeps)``:
    the request is validated from the annotation of the first parameter (a validation error answers
    ``InvalidInput`` with the field errors), the reply is the returned value (a model is dumped by
    alias). The collaborators come as one dependencies object, given when the router is included
    in a server (:meth:`RpcServer.include`), so a handler can be called, and tested, on its own.
    """

    def __init__(self) -> None:
        self.routes: list[Route[DepsT]] = []

    def handler(
        self, subject: str, *, tenant_required: bool = True, guard: Callable[[RpcContext], None] | None = None
    ) -> Callable[[TypedHandler], TypedHandler]:
        """Decorator: serve ``subject`` with the decorated ``async def op(req, ctx, deps)``.

        Args:
            subject: The request subject (``fm.rpc.<service>.<op>``).
            tenant_required: Refuse a request without the tenant header (lookups by other services say False).
            guard: Called with the caller's context before the request is parsed; raises to refuse
                (a caller without the role gets Forbidden whatever it sent).
        """

        def register(fn: TypedHandler) -> TypedHandler:
            self.routes.append(Route(subject, fn, request_parser(fn), tenant_required, guard))
            return fn

        return register


class RpcServer:
    """Serves request/reply handlers of one service in its queue group, on nats-py directly.

    Requests are served concurrently (``concurrency`` at a time per process): one slow request (a
    transaction) never queues the others. Start after the connection is up, stop before it closes:
    stopping drains the subscriptions and waits for the requests in flight, so they are answered.
    FastStream is not used here: its per-message machinery (middlewares, dependency injection,
    decoding) cost more CPU than most of our handlers on the hottest path, a run's start.
    """

    def __init__(self, broker: NatsBroker, service: str, *, concurrency: int = 64) -> None:
        self.broker = broker
        self.service = service
        self.concurrency = concurrency
        self._routes: list[tuple[str, Callable[[Msg], Coroutine[Any, Any, None]]]] = []
        self._subs: list[Subscription] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots: asyncio.Semaphore | None = None

    def handler(self, subject: str, *, tenant_required: bool = True) -> Callable[[Handler], Handler]:
        """Decorator: serve ``subject`` with the decorated ``async def op(ctx, body)`` (body: decoded JSON)."""

        def register(fn: Handler) -> Handler:
            self.add(subject, fn, tenant_required=tenant_required)
            return fn

        return register

    def include(self, router: RpcRouter[DepsT], deps: DepsT) -> None:
        """Serve every operation of ``router``, its handlers given ``deps``."""
        for route in router.routes:
            self.add(route.subject, route.bind(deps), tenant_required=route.tenant_required)

    def add(self, subject: str, fn: Handler, *, tenant_required: bool = True) -> None:
        """Serve ``subject`` with the raw handler ``fn``."""
        op = subject.rsplit(".", 1)[-1]

        async def serve(msg: Msg) -> None:
            started = time.perf_counter()
            limit = self.broker.connection.max_payload
            h = msg.headers or {}
            with (
                span(
                    subject, kind="server", parent=h.get(headers.TRACEPARENT), attributes=_rpc_attributes(subject)
                ) as s,
                log_context(tenant=h.get(headers.TENANT)),
            ):
                reply, outcome = await _answer(subject, fn, msg, tenant_required, limit)
                if msg.reply:
                    outcome = await self._respond(subject, msg.reply, reply, outcome)
                s.set_attribute("flowmesh.rpc.outcome", outcome)
                if outcome in _FAILED:
                    s.set_error(outcome)
            RPC_SERVED.labels(self.service, op, outcome).inc()
            RPC_SECONDS.labels(self.service, op).observe(time.perf_counter() - started)

        self._routes.append((subject, serve))

    async def _respond(self, subject: str, inbox: str, reply: bytes, outcome: str) -> str:
        """Send ``reply`` to ``inbox``; a reply that cannot be sent becomes an error answer, never silence.

        The caller would otherwise wait out its timeout and see a 504, every time it asks again.
        Replies carry no headers (the client reads only the body), so the body alone is held to the
        connection's ``max_payload``, which the server enforces on headers and body together.
        """
        nc = self.broker.connection
        if len(reply) > nc.max_payload:
            log.warning("rpc %s: the reply is %d bytes, over max_payload %d", subject, len(reply), nc.max_payload)
            detail = (
                f"the answer is {len(reply)} bytes, over the messaging limit of {nc.max_payload} bytes; "
                "ask for a smaller page"
            )
            reply, outcome = _error_reply(ReplyTooLarge(detail)), ReplyTooLarge.code
        try:
            await nc.publish(inbox, reply)
        except nats.errors.Error as exc:
            log.warning("rpc %s: the reply could not be sent: %r", subject, exc)
            with contextlib.suppress(nats.errors.Error):  # the connection itself is gone: nothing more to do
                failed = ServiceUnavailable(f"the answer could not be sent ({type(exc).__name__}); retry shortly")
                await nc.publish(inbox, _error_reply(failed))
            return "unsent"
        return outcome

    async def start(self) -> None:
        """Subscribe every handler (in the service's queue group) on the broker's connection."""
        nc = self.broker.connection
        self._slots = asyncio.Semaphore(self.concurrency)
        for subject, serve in self._routes:
            self._subs.append(await nc.subscribe(subject, queue=self.service, cb=self._dispatcher(serve)))

    def _dispatcher(self, serve: Callable[[Msg], Coroutine[Any, Any, None]]) -> Callable[[Msg], Awaitable[None]]:
        async def dispatch(msg: Msg) -> None:
            assert self._slots is not None
            await self._slots.acquire()  # full: the subscription waits, NATS buffers for us
            task = asyncio.create_task(serve(msg))
            self._tasks.add(task)
            task.add_done_callback(self._done)

        return dispatch

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._slots is not None:
            self._slots.release()

    async def stop(self, *, timeout: float = 10.0) -> None:
        """Take no more requests, and answer the ones in flight (bounded)."""
        subs, self._subs = self._subs, []
        for sub in subs:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sub.drain(), timeout)  # type: ignore[no-untyped-call]
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)


_FAILED: Final = frozenset({"internal-error", "unavailable", "unsent"})
"""RPC outcomes that are the service's failure (a span marked as failed), not the caller's."""


def _rpc_attributes(subject: str) -> dict[str, str] | None:
    """An RPC span's attributes (none built with tracing off)."""
    if not tracing_enabled():
        return None
    parts = subject.split(".")
    return {
        "rpc.system": "nats",
        "rpc.service": parts[2] if len(parts) > 3 else subject,
        "rpc.method": parts[-1],
        "messaging.destination.name": subject,
    }


def _context(msg: Msg, *, tenant_required: bool, reply_limit: int = DEFAULT_REPLY_LIMIT) -> RpcContext:
    h = msg.headers or {}
    tenant = h.get(headers.TENANT, "")
    if tenant_required and not tenant:
        raise InvalidInput(f"missing {headers.TENANT} header")
    return RpcContext(
        tenant=tenant,
        role=h.get(headers.ROLE, "member"),
        subject=h.get(headers.SUBJECT, ""),
        traceparent=h.get(headers.TRACEPARENT),
        reply_limit=reply_limit,
    )


async def _answer(
    subject: str, fn: Handler, msg: Msg, tenant_required: bool, reply_limit: int = DEFAULT_REPLY_LIMIT
) -> tuple[bytes, str]:
    """The reply to ``msg`` and the outcome label of the metrics: data, or the error it came to."""
    try:
        ctx = _context(msg, tenant_required=tenant_required, reply_limit=reply_limit)
        return _data_reply(await fn(ctx, _decode(msg.data))), "ok"
    except FlowmeshError as exc:
        return _error_reply(exc), exc.code
    except ValidationError as exc:
        return _error_reply(InvalidInput("the request is not valid", errors=field_errors(exc))), "validation-error"
    except Exception as exc:
        if database_unavailable(exc):
            # PostgreSQL down or restarting is not a bug of the request: a 503 the client
            # may retry (with the same Idempotency-Key), not a 500 with a traceback
            log.warning("rpc %s: the database is unavailable: %s", subject, exc)
            return _error_reply(
                ServiceUnavailable("the database is unavailable right now; retry shortly")
            ), "unavailable"
        log.exception("rpc %s failed", subject)
        return _error_reply(FlowmeshError()), "internal-error"


def _decode(data: bytes) -> Any:
    if not data:
        return {}
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput("the request body is not JSON") from exc


def _data_reply(data: Any) -> bytes:
    if isinstance(data, BaseModel):
        return b'{"data":' + data.model_dump_json(by_alias=True).encode() + b"}"
    return orjson.dumps({"data": _dump(data)})


def _error_reply(exc: FlowmeshError) -> bytes:
    return orjson.dumps({"error": exc.to_problem().wire(exclude_none=True)})


class RpcClient:
    """Calls other services' request/reply operations (nats-py's request, one shared reply inbox)."""

    def __init__(self, broker: NatsBroker, *, timeout: float = 5.0) -> None:
        self.broker = broker
        self.timeout = timeout

    async def call(
        self,
        subject: str,
        body: BaseModel | dict[str, Any] | None = None,
        *,
        tenant: str,
        role: str = "member",
        sub: str = "",
        traceparent: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Send a request and return the reply's data.

        Raises:
            FlowmeshError: the error the service answered with; :class:`ServiceUnavailable` when no
                replica is listening, :class:`GatewayTimeout` when none answered in time.
        """
        hdrs = {
            headers.TENANT: tenant,
            headers.SCHEMA: headers.SCHEMA_VERSION,
            headers.ROLE: role,
            headers.SUBJECT: sub,
        }
        with span(subject, kind="client", parent=traceparent, attributes=_rpc_attributes(subject)):
            inject(hdrs)
            return await self._request(subject, body, hdrs, timeout)

    async def _request(
        self, subject: str, body: BaseModel | dict[str, Any] | None, hdrs: dict[str, str], timeout: float | None
    ) -> Any:
        # a request carries what the caller gave, so defaults are applied once, by the receiver
        if isinstance(body, BaseModel):
            payload = body.model_dump_json(by_alias=True, exclude_unset=True).encode()
        else:
            payload = orjson.dumps(body if body is not None else {})
        service = subject.split(".")[2] if subject.count(".") >= 3 else subject
        try:
            nc = self.broker.connection
            if nc is None:
                raise nats.errors.ConnectionClosedError
            msg = await nc.request(subject, payload, timeout=timeout or self.timeout, headers=hdrs)
        except nats.errors.NoRespondersError as exc:
            RPC_CALLS.labels(subject, "unavailable").inc()
            raise ServiceUnavailable(f"the {service} service is not available right now; retry shortly") from exc
        except (TimeoutError, nats.errors.TimeoutError) as exc:
            RPC_CALLS.labels(subject, "timeout").inc()
            raise GatewayTimeout(f"the {service} service did not answer in time; retry shortly") from exc
        except nats.errors.Error as exc:
            RPC_CALLS.labels(subject, "unavailable").inc()
            raise ServiceUnavailable(f"messaging is not available right now ({exc}); retry shortly") from exc
        reply = orjson.loads(msg.data)
        error = reply.get("error")
        if error is not None:
            problem = Problem.model_validate(error)
            RPC_CALLS.labels(subject, problem.type).inc()
            raise from_problem(problem)
        RPC_CALLS.labels(subject, "ok").inc()
        return reply.get("data")
