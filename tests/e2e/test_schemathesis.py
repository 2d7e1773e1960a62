"""Schemathesis against a live stack: every documented operation answers as ``/openapi.json`` says.

Schemathesis reads the committed ``docs/api/openapi.json`` (so collection needs no server; the last
test proves the gateway serves exactly that document). For each operation it sends the
coverage phase's cases (boundary values, missing and wrong-typed parameters, unexpected methods,
no or bad credentials) and a few fuzzed ones, and checks that nothing is a 5xx and that every
response is documented: status, content type, headers and body schema. Path parameters point at
real resources (a published flow with a finished run and triggers), so success bodies are checked
too, not only 404s. Generation is derandomised with a fixed seed: the same cases every run.

The stack is its own, on the ``high_frequency`` plan, so the plan's request rate and flow limit do
not turn the run into a wall of 429s and 403s (those statuses are documented and checked anyway).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from schemathesis import Case

from flowmesh.contracts.ids import is_uuid
from stack import ProcessStack, chain, token, wait_run

DOCUMENT = Path(__file__).resolve().parents[2] / "docs" / "api" / "openapi.json"
SEED = 20260131
MAX_EXAMPLES = 8


@pytest.fixture(scope="module")
def api(infra, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessStack]:  # type: ignore[no-untyped-def]
    with ProcessStack(
        infra.nats_url,
        infra.database_url,
        tmp_path_factory.mktemp("schemathesis"),
        # made-up webhook tokens by the hundred from one address: their per-address limit is not under test here
        env={"FLOWMESH_DEFAULT_PLAN": "high_frequency", "FLOWMESH_GATEWAY_WEBHOOK_UNKNOWN_PER_S": "0"},
    ) as s:
        yield s


def _seed(c: httpx.Client) -> dict[str, Any]:
    """Real resources for the path parameters: a published flow with a finished run and triggers."""
    r = c.post("/flows", json={"name": "schemathesis", "definition": chain(2)})
    assert r.status_code == 201, r.text
    flow_id = r.json()["id"]
    assert c.post(f"/flows/{flow_id}/publish").status_code == 201
    hook = c.post(f"/flows/{flow_id}/triggers", json={"type": "webhook", "name": "hook"})
    assert hook.status_code == 201, hook.text
    doomed_trigger = c.post(f"/flows/{flow_id}/triggers", json={"type": "webhook", "name": "doomed"})
    assert doomed_trigger.status_code == 201, doomed_trigger.text
    doomed_flow = c.post("/flows", json={"name": "doomed"})
    assert doomed_flow.status_code == 201, doomed_flow.text
    r = c.post(f"/flows/{flow_id}/runs", json={"input": {"v": 1}})
    assert r.status_code == 201, r.text
    run = wait_run(c, r.json()["id"])
    return {
        "flowId": flow_id,
        "runId": run["id"],
        "triggerId": hook.json()["id"],
        "token": hook.json()["url"].rsplit("/", 1)[1],
        "doomedFlowId": doomed_flow.json()["id"],
        "doomedTriggerId": doomed_trigger.json()["id"],
    }


TENANT = f"st-{uuid.uuid4().hex[:8]}"
CONFIG = schemathesis.Config.from_dict(
    {
        "seed": SEED,
        "auth": {"openapi": {"bearerAuth": {"bearer": token(TENANT)}}},
        "request-timeout": 10,
        "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
        "phases": {"examples": {"enabled": False}, "stateful": {"enabled": False}},
        "checks": {
            # Some rules are beyond a JSON Schema (CEL expressions, cron syntax, a trigger's config by its
            # type, If-Match): a schema-valid request may still be a 412 or a 422.
            "positive_data_acceptance": {"expected-statuses": ["2xx", "401", "403", "404", "409", "412", "422"]},
        },
        "operations": [
            # /flows/import is also /flows/{flowId} with the id "import" (not a UUID): PUT there is a 404 or a
            # 422, not a 405, and a 405's Allow rightly lists the methods of both routes
            {
                "include-operation-id": "importFlow",
                "checks": {"unsupported_method": {"enabled": False}, "allow_header_conformance": {"enabled": False}},
            },
        ],
    }
)
schema = schemathesis.openapi.from_path(DOCUMENT, config=CONFIG)


@pytest.fixture(scope="module")
def ids(api: ProcessStack) -> dict[str, Any]:
    with api.client(TENANT) as c:
        return _seed(c)


IDS = ("flowId", "runId", "triggerId")
TOKEN = re.compile(r"[A-Za-z0-9_-]{16,128}")
# DELETE gets resources of its own, so the rest keep theirs for the whole run
DOOMED = {
    ("DELETE", "/api/v1/flows/{flowId}", "flowId"): "doomedFlowId",
    ("DELETE", "/api/v1/triggers/{triggerId}", "triggerId"): "doomedTriggerId",
}


def _point_at_real_resources(case: Case, ids: dict[str, Any]) -> None:
    """Well-formed ids become real ones (malformed ones stay: they test the 404s)."""
    params = case.path_parameters or {}
    for name, value in params.items():
        if (name == "token" and TOKEN.fullmatch(str(value))) or (name in IDS and is_uuid(str(value))):
            params[name] = ids[DOOMED.get((case.method.upper(), case.path, name), name)]


@schema.parametrize()
def test_every_operation_answers_as_documented(case: Case, api: ProcessStack, ids: dict[str, Any]) -> None:
    _point_at_real_resources(case, ids)
    case.call_and_validate(base_url=api.base)


def test_the_served_document_is_the_committed_one_and_public(api: ProcessStack) -> None:
    r = httpx.get(api.base + "/openapi.json")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    assert r.json() == json.loads(DOCUMENT.read_text())
    page = httpx.get(api.base + "/docs")
    assert page.status_code == 200 and "swagger-ui-bundle.js" in page.text
    asset = httpx.get(api.base + "/docs/static/swagger-ui-bundle.js")
    assert asset.status_code == 200 and len(asset.content) > 100_000
