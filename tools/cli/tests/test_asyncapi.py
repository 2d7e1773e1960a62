"""The AsyncAPI document of the public subjects: current, valid for the official parser, true to the contracts."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator

from flowmesh.cli import asyncapi
from flowmesh.cli.asyncapi import address, build_asyncapi, dumps, stream_of, subject_matches
from flowmesh.contracts import headers, permissions, streams, subjects
from flowmesh.contracts.ids import new_id
from flowmesh.contracts.models.run_events import (
    EVENT_DATA,
    RunFailure,
    RunQueuedData,
    RunSucceededData,
    StepSucceededData,
    TokenUsage,
)
from flowmesh.contracts.models.runs import RUN_EVENT_TYPES, RunEvent

ROOT = Path(__file__).resolve().parents[3]
COMMITTED = ROOT / "docs" / "api" / "asyncapi.yaml"
VALIDATOR = ROOT / "tools" / "cli" / "asyncapi" / "validate.mjs"
PARSER = ROOT / "node_modules" / "@asyncapi" / "parser" / "package.json"
HEADERS = (headers.TENANT, headers.SCHEMA, headers.TRACEPARENT, headers.MSG_ID)


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return build_asyncapi()


def _messages_of(document: dict[str, Any], channel: str) -> dict[str, Any]:
    return {name: document["components"]["messages"][name] for name in document["channels"][channel]["messages"]}


# --- the committed file ----------------------------------------------------------------------------


def test_the_committed_document_is_what_make_asyncapi_generates() -> None:
    assert COMMITTED.read_text() == dumps(build_asyncapi()), (
        "docs/api/asyncapi.yaml is stale: run `make asyncapi` and commit it"
    )


def test_the_module_prints_the_document() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "flowmesh.cli.asyncapi"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == COMMITTED.read_text()
    assert yaml.safe_load(done.stdout)["asyncapi"] == asyncapi.ASYNCAPI_VERSION == "3.0.0"
    assert not re.search(r"[&*]id\d+", done.stdout), "YAML anchors and aliases do not belong in a document people read"


def _validate(path: Path) -> subprocess.CompletedProcess[str]:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed: the AsyncAPI document is validated with the official parser (Node.js)")
    if not PARSER.is_file():
        pytest.fail("@asyncapi/parser is not in node_modules: run `make node`")
    return subprocess.run(
        [node, str(VALIDATOR), str(path)], capture_output=True, text=True, timeout=120, check=False, cwd=ROOT
    )


def test_the_official_parser_finds_no_error_in_the_committed_document() -> None:
    done = _validate(COMMITTED)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "valid AsyncAPI 3.0.0" in done.stdout
    assert not re.search(r"^error ", done.stdout, re.MULTILINE)


def test_the_validator_fails_with_diagnostics_on_a_broken_document(tmp_path: Path, document: dict[str, Any]) -> None:
    broken = tmp_path / "broken.yaml"
    document = {**document, "operations": {**document["operations"]}}
    document["operations"]["sendRunEvent"] = {**document["operations"]["sendRunEvent"], "action": "publish"}
    broken.write_text(dumps(document))
    done = _validate(broken)
    assert done.returncode == 1
    assert "error" in done.stdout and "operations.sendRunEvent.action" in done.stdout
    assert "not a valid AsyncAPI document" in done.stderr
    assert _validate(tmp_path / "missing.yaml").returncode == 2


# --- true to the contracts -------------------------------------------------------------------------


def test_every_run_event_type_has_a_message_with_its_own_data_model(document: dict[str, Any]) -> None:
    messages = _messages_of(document, asyncapi.RUNS_CHANNEL)
    assert list(messages) == list(RUN_EVENT_TYPES)
    schemas = document["components"]["schemas"]
    for event_type, message in messages.items():
        envelope, narrowed = message["payload"]["allOf"]
        assert envelope == {"$ref": "#/components/schemas/RunEvent"}
        assert narrowed["properties"]["type"] == {"const": event_type}
        model = EVENT_DATA[event_type].__name__
        assert narrowed["properties"]["data"] == {"$ref": f"#/components/schemas/{model}"}
        assert schemas[model]["title"] == model
    parameter = document["channels"][asyncapi.RUNS_CHANNEL]["parameters"]["event"]
    assert parameter["enum"] == list(RUN_EVENT_TYPES)
    sent = document["operations"]["sendRunEvent"]["messages"]
    assert [m["$ref"].rsplit("/", 1)[1] for m in sent] == list(RUN_EVENT_TYPES)


def test_every_header_name_is_documented_and_every_message_has_headers(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    for name in ("FlowmeshHeaders", "IntegratorHeaders"):
        assert set(schemas[name]["properties"]) == set(HEADERS)
    assert set(schemas["FlowmeshHeaders"]["required"]) == {headers.TENANT, headers.SCHEMA, headers.MSG_ID}
    assert "required" not in schemas["IntegratorHeaders"]
    assert schemas["FlowmeshHeaders"]["properties"][headers.SCHEMA]["const"] == headers.SCHEMA_VERSION
    for message in document["components"]["messages"].values():
        assert message["headers"]["$ref"].startswith("#/components/schemas/")
    text = COMMITTED.read_text()
    assert all(name in text for name in HEADERS)


@pytest.mark.parametrize(
    ("channel", "values", "built"),
    [
        (asyncapi.EVENTS_CHANNEL, {"tenant": "acme", "eventType": "order.paid"}, "fm.events.acme.order.paid"),
        (
            asyncapi.RUNS_CHANNEL,
            {"tenant": "acme", "flowId": "f1", "runId": "r1", "event": "step.failed"},
            "fm.runs.acme.f1.r1.step.failed",
        ),
        (asyncapi.OUT_CHANNEL, {"tenant": "acme", "name": "invoice.ready"}, "fm.out.acme.invoice.ready"),
    ],
)
def test_each_address_is_the_subject_builders_own(
    document: dict[str, Any], channel: str, values: dict[str, str], built: str
) -> None:
    found = document["channels"][channel]
    assert set(found["parameters"]) == set(values)
    assert found["address"].format(**values) == built


def test_each_channel_names_the_stream_it_is_on_and_what_an_integrator_may_do(document: dict[str, Any]) -> None:
    expected = {
        asyncapi.EVENTS_CHANNEL: (streams.EVENTS, "publish"),
        asyncapi.RUNS_CHANNEL: (streams.RUN_EVENTS, "subscribe"),
        asyncapi.OUT_CHANNEL: (streams.OUT, "subscribe"),
    }
    grants = permissions.integrator_permissions("acme")
    for channel, (stream, verb) in expected.items():
        found = document["channels"][channel]
        jetstream = found["x-jetstream"]
        assert (jetstream["stream"], jetstream["retention"]) == (stream.name, stream.retention)
        assert jetstream["subjects"] == list(stream.subjects)
        assert jetstream["maxAgeSeconds"] == stream.max_age_s
        assert f"`{stream.name}`" in found["description"]
        grant = found["x-integrator-permission"][verb].replace("{tenant}", "acme")
        assert grant in (grants.publish if verb == "publish" else grants.subscribe)
        action = document["operations"][next(k for k, op in document["operations"].items() if channel in str(op))]
        assert action["action"] == ("receive" if verb == "publish" else "send")


def test_the_parameter_patterns_hold_what_flowmesh_puts_in_subjects(document: dict[str, Any]) -> None:
    tenant = re.compile(document["components"]["parameters"]["tenant"]["x-pattern"])
    for tenant_id in ("acme", "user@example.com", "a.b", "*", ">", "x" * 65, "_hsneaky", "tenant one"):
        assert tenant.fullmatch(subjects.tenant_token(tenant_id)), tenant_id
    runs = document["channels"][asyncapi.RUNS_CHANNEL]["parameters"]
    for name in ("flowId", "runId"):
        assert re.fullmatch(runs[name]["x-pattern"], new_id())
    part = re.compile(document["channels"][asyncapi.EVENTS_CHANNEL]["parameters"]["eventType"]["x-pattern"])
    for value in ("order.paid", "a", "a.b-c_d", "a..b", ".a", "a b", "a.*", "a.>", ""):
        assert bool(part.fullmatch(value)) == subjects.is_safe_subject_part(value), value


def test_the_description_tells_an_integrator_its_user_inbox_and_permissions(document: dict[str, Any]) -> None:
    text = document["info"]["description"]
    assert "`integrator-{tenant}`" in text and "`_INBOX.integrator-{tenant}`" in text
    grants = permissions.integrator_permissions(asyncapi.TENANT_MARK)
    for grant in (*grants.publish, *grants.subscribe):
        assert f"`{grant.replace(asyncapi.TENANT_MARK, '{tenant}')}`" in text
    assert "`send` means Flowmesh" in text
    assert set(document["servers"]) == {"dev", "production"}
    assert document["servers"]["dev"]["protocol"] == "nats"


# --- the payload schemas hold real events ----------------------------------------------------------


def _payload_validator(document: dict[str, Any], message: str) -> Draft202012Validator:
    # the document is the root, so "#/components/..." references resolve inside it
    return Draft202012Validator({**document, "$ref": f"#/components/messages/{message}/payload"})


def _event(event_type: str, data: Any, **extra: Any) -> dict[str, Any]:
    event = RunEvent(
        id=new_id(),
        seq=1,
        type=event_type,
        ts="2026-01-02T03:04:05.678Z",
        tenant_id="acme",
        run_id=new_id(),
        flow_id=new_id(),
        version=1,
        data=data,
        **extra,
    )
    return event.wire(exclude_none=True)


def test_events_as_the_runner_writes_them_match_their_message_and_wrong_ones_do_not(document: dict[str, Any]) -> None:
    queued = _event("run.queued", RunQueuedData(status="queued", trigger_type="manual", parent_run_id=None))
    assert queued["data"] == {"status": "queued", "triggerType": "manual", "parentRunId": None}
    failed = _event(
        "run.succeeded", RunSucceededData(status="succeeded", duration_ms=12, error=RunFailure(message="x"))
    )
    step = _event(
        "step.succeeded",
        StepSucceededData(status="succeeded", step_type="llm", usage=TokenUsage(input_tokens=3, output_tokens=4)),
        step_id="ask",
        attempt=1,
    )
    for event in (queued, failed, step):
        errors = list(_payload_validator(document, event["type"]).iter_errors(event))
        assert errors == [], [e.message for e in errors]
    # another type's message, a step event without its step, a seq of 0, a count that is not one
    assert not _payload_validator(document, "run.started").is_valid(queued)
    assert not _payload_validator(document, "step.succeeded").is_valid({**step, "stepId": None})
    assert not _payload_validator(document, "run.queued").is_valid({**queued, "seq": 0})
    assert not _payload_validator(document, "step.succeeded").is_valid({**step, "data": {"durationMs": "soon"}})


def test_every_example_holds_to_its_message_schemas(document: dict[str, Any]) -> None:
    # the official parser does not check AsyncAPI 3.0 examples, so they are checked here
    checked = 0
    for name, message in document["components"]["messages"].items():
        for example in message.get("examples", []):
            for part in ("payload", "headers"):
                validator = Draft202012Validator({**document, "$ref": f"#/components/messages/{name}/{part}"})
                errors = [e.message for e in validator.iter_errors(example[part])]
                assert errors == [], f"{name} {part}: {errors}"
                checked += 1
    assert checked >= 10
    broken = document["components"]["messages"]["step.retrying"]["examples"][0]["payload"]
    assert not _payload_validator(document, "step.retrying").is_valid({**broken, "seq": 0})


# --- the builder's parts ---------------------------------------------------------------------------


def test_subject_matching_follows_nats_wildcards() -> None:
    assert subject_matches("fm.runs.>", "fm.runs.a.b.c.run.queued")
    assert not subject_matches("fm.runs.>", "fm.runs")
    assert subject_matches("fm.*.x", "fm.a.x") and not subject_matches("fm.*.x", "fm.a.b.x")
    assert not subject_matches("fm.events.a", "fm.events.a.b")
    assert stream_of(subjects.out_message("acme", "n")) is streams.OUT
    with pytest.raises(ValueError, match="on 0 streams"):
        stream_of("elsewhere.entirely")


def test_an_address_comes_only_from_a_builder_that_places_each_parameter_once() -> None:
    assert address(subjects.external_event, "tenant", "eventType") == "fm.events.{tenant}.{eventType}"
    with pytest.raises(ValueError, match="does not place its argument"):
        address(lambda tenant: subjects.external_event("fixed", "x"), "tenant")


def test_the_contracts_stay_light_the_generator_lives_in_the_cli() -> None:
    contracts = ROOT / "libs" / "contracts"
    declared = (contracts / "pyproject.toml").read_text()
    assert "yaml" not in declared and "faststream" not in declared
    sources = [p.read_text() for p in (contracts / "src").rglob("*.py")]
    assert not any(re.search(r"^\s*(import|from) (yaml|faststream)\b", s, re.MULTILINE) for s in sources)
