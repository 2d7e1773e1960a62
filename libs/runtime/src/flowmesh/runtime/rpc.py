"""Request/reply over core NATS (``fm.rpc.<service>.<op>``) with the shared error vocabulary.

Servers register handlers with :class:`RpcServer`: each gets the caller's context and the decoded
body, returns JSON-able data or raises a :class:`FlowmeshError`; the reply is ``{"data": ...}`` or
``{"error": <problem>}``. Clients call :meth:`RpcClient.call`, which raises the same error again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import nats.errors
from faststream.nats import NatsBroker
from pydantic import BaseModel, ValidationError

from flowmesh.contracts import headers
from flowmesh.contracts.errors import (
    FlowmeshError,
    GatewayTimeout,
    InvalidInput,
    ServiceUnavailable,
    from_problem,
)
from flowmesh.contracts.models.rpc import RpcReply
from flowmesh.contracts.strict import field_errors
from flowmesh.runtime.metrics import RPC_CALLS, RPC_SECONDS, RPC_SERVED
from flowmesh.runtime.nats import Message

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
    """Registers request/reply handlers of one service in its queue group."""

    def __init__(self, broker: NatsBroker, service: str, *, concurrency: int = 64) -> None:
        self.broker = broker
        self.service = service
        # requests are served concurrently: one slow request (a transaction) never queues the others
        self.concurrency = concurrency

    def handler(self, subject: str, *, tenant_required: bool = True) -> Callable[[Handler], Handler]:
        """Decorator: serve ``subject`` with the decorated coroutine."""

        def register(fn: Handler) -> Handler:
            op = subject.rsplit(".", 1)[-1]

            async def serve(body: Any, msg: Message) -> dict[str, Any]:
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
                    reply = {"data": _dump(await fn(ctx, body))}
                except FlowmeshError as exc:
                    outcome = exc.code
                    reply = {"error": exc.to_problem().wire(exclude_none=True)}
                except ValidationError as exc:
                    outcome = "validation-error"
                    err = InvalidInput("the request is not valid", errors=field_errors(exc))
                    reply = {"error": err.to_problem().wire(exclude_none=True)}
                except Exception:
                    outcome = "internal-error"
                    log.exception("rpc %s failed", subject)
                    reply = {"error": FlowmeshError().to_problem().wire(exclude_none=True)}
                RPC_SERVED.labels(self.service, op, outcome).inc()
                RPC_SECONDS.labels(self.service, op).observe(time.perf_counter() - started)
                return reply

            serve.__name__ = f"{self.service}_{op}"
            self.broker.subscriber(subject, queue=self.service, max_workers=self.concurrency)(serve)
            return fn

        return register


class RpcClient:
    """Calls other services' request/reply operations."""

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
        payload = _dump(body, exclude_unset=True) if body is not None else {}
        service = subject.split(".")[2] if subject.count(".") >= 3 else subject
        try:
            msg = await self.broker.request(payload, subject, headers=hdrs, timeout=timeout or self.timeout)
        except nats.errors.NoRespondersError as exc:
            RPC_CALLS.labels(subject, "unavailable").inc()
            raise ServiceUnavailable(f"the {service} service is not available right now; retry shortly") from exc
        except (TimeoutError, nats.errors.TimeoutError) as exc:
            RPC_CALLS.labels(subject, "timeout").inc()
            raise GatewayTimeout(f"the {service} service did not answer in time; retry shortly") from exc
        except nats.errors.Error as exc:
            RPC_CALLS.labels(subject, "unavailable").inc()
            raise ServiceUnavailable(f"messaging is not available right now ({exc}); retry shortly") from exc
        reply = RpcReply.model_validate(await msg.decode())
        if reply.error is not None:
            RPC_CALLS.labels(subject, reply.error.type).inc()
            raise from_problem(reply.error)
        RPC_CALLS.labels(subject, "ok").inc()
        return reply.data
