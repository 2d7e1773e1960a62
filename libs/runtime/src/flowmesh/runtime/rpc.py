"""Request/reply over core NATS (``fm.rpc.<service>.<op>``) with the shared error vocabulary.

Servers register handlers with :class:`RpcServer`: each gets the caller's context and the decoded
body, returns JSON-able data or raises a :class:`FlowmeshError`; the reply is ``{"data": ...}`` or
``{"error": <problem>}``. Clients call :meth:`RpcClient.call`, which raises the same error again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import nats.errors
import orjson
from faststream.nats import NatsBroker
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import BaseModel, ValidationError

from flowmesh.contracts import headers
from flowmesh.contracts.errors import (
    FlowmeshError,
    GatewayTimeout,
    InvalidInput,
    ServiceUnavailable,
    from_problem,
)
from flowmesh.contracts.models.problem import Problem
from flowmesh.contracts.strict import field_errors
from flowmesh.runtime.db import database_unavailable
from flowmesh.runtime.metrics import RPC_CALLS, RPC_SECONDS, RPC_SERVED

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RpcContext:
    """Who is calling: taken from message headers set by the gateway from a verified token."""

    tenant: str
    role: str
    subject: str
    traceparent: str | None


Handler = Callable[[RpcContext, Any], Awaitable[Any]]


def _dump(data: Any, *, exclude_unset: bool = False) -> Any:
    if isinstance(data, BaseModel):
        return data.model_dump(mode="json", by_alias=True, exclude_unset=exclude_unset)
    if isinstance(data, list):
        return [_dump(d, exclude_unset=exclude_unset) for d in data]
    return data


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
        """Decorator: serve ``subject`` with the decorated coroutine."""

        def register(fn: Handler) -> Handler:
            op = subject.rsplit(".", 1)[-1]

            async def serve(msg: Msg) -> None:
                started = time.perf_counter()
                outcome = "ok"
                h = msg.headers or {}
                tenant = h.get(headers.TENANT, "")
                try:
                    if tenant_required and not tenant:
                        raise InvalidInput(f"missing {headers.TENANT} header")
                    ctx = RpcContext(
                        tenant=tenant,
                        role=h.get(headers.ROLE, "member"),
                        subject=h.get(headers.SUBJECT, ""),
                        traceparent=h.get(headers.TRACEPARENT),
                    )
                    reply = _data_reply(await fn(ctx, _decode(msg.data)))
                except FlowmeshError as exc:
                    outcome = exc.code
                    reply = _error_reply(exc)
                except ValidationError as exc:
                    outcome = "validation-error"
                    reply = _error_reply(InvalidInput("the request is not valid", errors=field_errors(exc)))
                except Exception as exc:
                    if database_unavailable(exc):
                        # PostgreSQL down or restarting is not a bug of the request: a 503 the client
                        # may retry (with the same Idempotency-Key), not a 500 with a traceback
                        outcome = "unavailable"
                        log.warning("rpc %s: the database is unavailable: %s", subject, exc)
                        reply = _error_reply(ServiceUnavailable("the database is unavailable right now; retry shortly"))
                    else:
                        outcome = "internal-error"
                        log.exception("rpc %s failed", subject)
                        reply = _error_reply(FlowmeshError())
                if msg.reply:
                    with contextlib.suppress(nats.errors.Error):
                        await msg.respond(reply)
                RPC_SERVED.labels(self.service, op, outcome).inc()
                RPC_SECONDS.labels(self.service, op).observe(time.perf_counter() - started)

            self._routes.append((subject, serve))
            return fn

        return register

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
        if traceparent:
            hdrs[headers.TRACEPARENT] = traceparent
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
