"""Typed RPC handlers on a router: the request parsed from the annotation, the reply encoded, errors as before."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from nats.aio.msg import Msg
from pydantic import BaseModel

from flowmesh.contracts import headers
from flowmesh.contracts.errors import Conflict, InvalidInput
from flowmesh.contracts.models.base import WireModel
from flowmesh.runtime.nats import create_broker
from flowmesh.runtime.rpc import RpcClient, RpcContext, RpcRouter, RpcServer, _answer, request_parser
from flowmesh.runtime.service import ServiceRuntime
from flowmesh.runtime.settings import BaseServiceSettings


class Greeting(WireModel):
    """A request with a required field and a camelCase alias."""

    who_is_it: str
    times: int = 1


class Echo(WireModel):
    """A reply model."""

    text: str


@dataclass(frozen=True)
class Deps:
    """What the test handlers need."""

    suffix: str


router: RpcRouter[Deps] = RpcRouter()


@router.handler("fm.rpc.test.greet")
async def greet(req: Greeting, ctx: RpcContext, deps: Deps) -> Echo:
    if req.who_is_it == "nobody":
        raise Conflict("nobody to greet")
    return Echo(text=f"{req.who_is_it}@{ctx.tenant}{deps.suffix}" * req.times)


@router.handler("fm.rpc.test.numbers", tenant_required=False)
async def numbers(req: list[int], ctx: RpcContext, deps: Deps) -> dict[str, Any]:
    return {"sum": sum(req), "tenant": ctx.tenant}


@router.handler("fm.rpc.test.raw")
async def raw(_: Any, ctx: RpcContext, deps: Deps) -> list[Echo]:
    return [Echo(text=str(_))]


def _msg(body: Any, *, tenant: str | None = "t1", raw_data: bytes | None = None) -> Msg:
    hdrs = {headers.TENANT: tenant} if tenant is not None else {}
    data = raw_data if raw_data is not None else orjson.dumps(body)
    return Msg(_client=None, subject="fm.rpc.test.x", data=data, headers=hdrs)  # type: ignore[arg-type]


async def _call(route_index: int, msg: Msg, deps: Deps = Deps("!")) -> tuple[Any, str]:
    route = router.routes[route_index]
    reply, outcome = await _answer(route.subject, route.bind(deps), msg, route.tenant_required)
    return orjson.loads(reply), outcome


async def test_the_request_is_parsed_from_the_first_parameters_model_and_the_reply_dumped_by_alias() -> None:
    reply, outcome = await _call(0, _msg({"whoIsIt": "ada", "times": 2}))
    assert outcome == "ok"
    assert reply == {"data": {"text": "ada@t1!ada@t1!"}}


async def test_an_invalid_request_answers_invalid_input_with_the_field_errors() -> None:
    reply, outcome = await _call(0, _msg({"times": "many"}))
    assert outcome == "validation-error"
    problem = reply["error"]
    assert problem["status"] == InvalidInput.status
    assert {e["path"] for e in problem["errors"]} == {"/whoIsIt", "/times"}


async def test_a_body_that_is_not_json_and_a_missing_tenant_answer_as_before() -> None:
    reply, outcome = await _call(0, _msg(None, raw_data=b"{nope"))
    assert outcome == InvalidInput.code and reply["error"]["detail"] == "the request body is not JSON"
    reply, outcome = await _call(0, _msg({"whoIsIt": "ada"}, tenant=None))
    assert outcome == InvalidInput.code and reply["error"]["detail"] == f"missing {headers.TENANT} header"


async def test_errors_raised_by_a_handler_travel_as_problems() -> None:
    reply, outcome = await _call(0, _msg({"whoIsIt": "nobody"}))
    assert outcome == Conflict.code and reply["error"]["detail"] == "nobody to greet"


async def test_other_types_go_through_a_type_adapter_and_any_takes_the_body_as_it_is() -> None:
    reply, _ = await _call(1, _msg([1, 2, "3"], tenant=None))
    assert reply == {"data": {"sum": 6, "tenant": ""}}
    reply, outcome = await _call(1, _msg(["x"], tenant=None))
    assert outcome == "validation-error" and reply["error"]["errors"][0]["path"] == "/0"
    reply, _ = await _call(2, _msg(None, raw_data=b""))
    assert reply == {"data": [{"text": "{}"}]}


def test_a_handler_without_an_annotated_request_is_refused_at_registration() -> None:
    async def untyped(req, ctx, deps):  # type: ignore[no-untyped-def]
        return None

    async def nothing() -> None:
        return None

    with pytest.raises(TypeError, match="annotate"):
        request_parser(untyped)
    with pytest.raises(TypeError, match="first parameter"):
        request_parser(nothing)


def test_a_model_request_is_parsed_with_its_own_validator() -> None:
    assert request_parser(greet) == Greeting.model_validate
    assert isinstance(request_parser(greet)({"whoIsIt": "x"}), BaseModel)


async def test_an_included_router_is_served_over_nats_with_its_deps(infra: Any) -> None:
    name = f"svc{uuid.uuid4().hex[:8]}"
    settings = BaseServiceSettings(
        env="test", nats_url=infra.nats_url, shared_database_url=infra.database_url, health_port=0
    )
    service = ServiceRuntime(name, settings, migrations=None)
    local: RpcRouter[Deps] = RpcRouter()
    subject = f"fm.rpc.test.{name}.greet"
    local.handler(subject)(greet)
    service.rpc.include(local, Deps("?"))
    assert isinstance(service.rpc, RpcServer)
    client_broker = create_broker(infra.nats_url, name="client")
    await client_broker.start()
    client = RpcClient(client_broker, timeout=2)
    try:
        async with service.running(health=False):
            assert await client.call(subject, Greeting(who_is_it="bo"), tenant="t") == {"text": "bo@t?"}
            with pytest.raises(InvalidInput) as err:
                await client.call(subject, {"times": 0}, tenant="t")
            assert err.value.errors and err.value.errors[0].path == "/whoIsIt"
    finally:
        await client_broker.stop()
