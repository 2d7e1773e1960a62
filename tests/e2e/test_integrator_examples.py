"""The integrator examples (``examples/integrators``), run as an integrator runs them, against the stack.

Each language's script places an order (an event that starts the orders flow), follows the run on
fm.runs, reads the flow's confirmation on fm.out and pays the order (the event its ``waitEvent``
waits for). The flow is the one in ``examples/integrators/orders-flow.json``, created over HTTP as
its tenant would. ``docs/integrators.md`` shows the same files: a test keeps the two equal.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from flowmesh.contracts.permissions import integrator_user
from integrators import LockedStack, add_event_trigger, greeting_flow, locked_nats, runs_of
from stack import ProcessStack, fresh_database, publish_flow, remove_database, wait_run

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "integrators"
FLOW = json.loads((EXAMPLES / "orders-flow.json").read_text())
DOC = ROOT / "docs" / "integrators.md"
SCRIPT_TIMEOUT_S = 90
LANGUAGES = ("python", "js")
LOCKED_TENANTS = {language: f"locked-{language}-{uuid.uuid4().hex[:8]}" for language in LANGUAGES}
"""One tenant per language on the locked stack: each has its own integrator user and its own orders flow."""


@pytest.fixture(scope="module")
def locked(infra: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LockedStack]:
    """Every service on a database and a NATS server of their own, that NATS knowing only the deployed users."""
    root = tmp_path_factory.mktemp("locked")
    db_name = f"e2e_locked_{uuid.uuid4().hex[:8]}"
    with locked_nats(root / "nats", tuple(LOCKED_TENANTS.values())) as nats_server:
        url = fresh_database(infra.database_url, db_name)
        try:
            with LockedStack(nats_server, url, root) as s:
                yield s
        finally:
            remove_database(infra.database_url, db_name)


def _command(language: str) -> list[str]:
    if language == "python":
        return [sys.executable, str(EXAMPLES / "python" / "orders.py")]
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed: the JavaScript example needs Node.js 18 or later")
    if not (ROOT / "node_modules" / "@nats-io" / "jetstream").is_dir():
        pytest.fail("node_modules is missing the NATS client: run make node")
    return [node, str(EXAMPLES / "js" / "orders.mjs")]


def _orders_flow(stack: ProcessStack, c: httpx.Client) -> str:
    """The example's flow, published, with its event trigger known to the runner."""
    r = c.post("/flows", json={k: FLOW[k] for k in ("name", "description", "definition")})
    assert r.status_code == 201, r.text
    flow_id: str = r.json()["id"]
    assert c.post(f"/flows/{flow_id}/publish").status_code == 201
    trigger = FLOW["trigger"]
    add_event_trigger(c, stack.env["DATABASE_URL"], flow_id, trigger["config"]["eventType"])
    return flow_id


def run_example(language: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The script run to its end (bounded), with only the configuration it documents."""
    base = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "SYSTEMROOT")}
    return subprocess.run(
        _command(language),
        env={**base, "TIMEOUT_S": "30", **env},
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT_S,
        cwd=EXAMPLES,
        check=False,
    )


@pytest.mark.parametrize("language", LANGUAGES)
def test_the_example_places_follows_confirms_and_pays_an_order(stack: ProcessStack, language: str) -> None:
    check_example(stack, language, f"int-{uuid.uuid4().hex[:8]}", {})


@pytest.mark.parametrize("language", LANGUAGES)
def test_the_example_needs_no_more_than_the_integrators_nats_user_may_do(locked: LockedStack, language: str) -> None:
    """On a NATS server that knows only the deployed users, the example runs as its tenant's integrator."""
    tenant = LOCKED_TENANTS[language]
    user = integrator_user(tenant)
    check_example(locked, language, tenant, {"NATS_USER": user, "NATS_PASSWORD": locked.passwords[user]})


def test_an_http_event_is_published_under_the_gateways_own_nats_user(locked: LockedStack) -> None:
    with locked.client(f"http-{uuid.uuid4().hex[:8]}") as c:
        flow_id = publish_flow(c, greeting_flow())
        add_event_trigger(c, locked.env["DATABASE_URL"], flow_id, "signup")
        r = c.post("/events/signup", json={"name": "ada"})
        assert r.status_code == 202, r.text
        (run,) = runs_of(c, flow_id, at_least=1)
        assert run["triggerType"] == "event" and run["output"] == {"hello": "ada"}


def check_example(stack: ProcessStack, language: str, tenant: str, login: dict[str, str]) -> None:
    """Run the example as ``tenant``'s integrator and check what it printed against what the stack recorded."""
    order_id = f"order-{uuid.uuid4().hex[:8]}"
    with stack.client(tenant) as c:
        flow_id = _orders_flow(stack, c)
        env = {"NATS_URL": stack.env["NATS_URL"], "FLOWMESH_TENANT": tenant, "ORDER_ID": order_id, **login}
        done = run_example(language, env)
        out = done.stdout
        assert done.returncode == 0, f"exit {done.returncode}\nstdout:\n{out}\nstderr:\n{done.stderr}"

        # (1) the event, and the same Nats-Msg-Id again: JetStream keeps one
        placed = re.findall(
            rf"published fm\.events\.{tenant}\.order\.placed msgId=\S+ stream=EVENTS seq=(\d+) duplicate=(\w+)", out
        )
        assert [d for _, d in placed] == ["false", "true"], out
        assert placed[0][0] == placed[1][0], "a duplicate is acknowledged with the first one's sequence"
        # (3) the confirmation the publish step sent
        confirmed = re.search(rf"^out fm\.out\.{tenant}\.order\.confirmed (\{{.*\}})$", out, re.M)
        assert confirmed is not None, out
        message = json.loads(confirmed.group(1))
        assert message["orderId"] == order_id and str(message["total"]) == "42"
        run_id = message["runId"]
        # (4) the payment, and (2) the run followed to its end without a gap
        assert re.search(
            rf"published fm\.events\.{tenant}\.order\.paid msgId=\S+ stream=EVENTS seq=\d+ duplicate=false", out
        )
        ending = re.search(rf"^followed run {run_id}: (\d+) events, gap-free=true, run\.succeeded$", out, re.M)
        assert ending is not None, out

        # what the stack recorded: one run, started by the event, resumed by the payment
        runs = c.get("/runs", params={"flowId": flow_id}).json()["items"]
        assert [r["id"] for r in runs] == [run_id], "the duplicate event started a second run"
        run = wait_run(c, run_id)
        assert run["triggerType"] == "event" and run["input"] == {"orderId": order_id, "total": 42}
        assert run["status"] == "succeeded" and run["output"] == {"orderId": order_id, "paidWith": "card"}
        recorded = [e["type"] for e in c.get(f"/runs/{run_id}/events", params={"pageSize": 1000}).json()["items"]]
        followed = re.findall(rf"^run {run_id} seq=\d+ (\S+)", out, re.M)
        assert sorted(followed) == sorted(recorded) and len(followed) == int(ending.group(1))
        assert {"run.waiting", "run.succeeded"} <= set(followed)
        assert re.search(rf"^run {run_id} seq=\d+ step\.succeeded paid$", out, re.M), "the payment resumed the wait"


def _embedded(doc: str) -> list[tuple[str, str]]:
    """(path, code) of each block the doc marks as a file's copy: ``<!-- file: path -->`` then a fenced block."""
    return [(path, code) for path, code in re.findall(r"<!-- file: (\S+) -->\n```[a-z]*\n(.*?)```\n", doc, flags=re.S)]


def test_the_code_the_doc_shows_is_the_code_that_is_tested() -> None:
    doc = DOC.read_text()
    blocks = _embedded(doc)
    shown = {path for path, _ in blocks}
    assert {"examples/integrators/python/orders.py", "examples/integrators/js/orders.mjs"} <= shown, shown
    for path, code in blocks:
        assert code == (ROOT / path).read_text(), f"{path} differs from its copy in docs/integrators.md"


def test_the_doc_links_what_it_names() -> None:
    doc = DOC.read_text()
    assert "](api/asyncapi.yaml)" in doc
    for target in re.findall(r"\]\((?!https?://|#)([^)#]+)", doc):
        assert (DOC.parent / target).resolve().is_relative_to(ROOT), target
        assert (DOC.parent / target).exists(), f"docs/integrators.md links {target}, which does not exist"
    assert "](docs/integrators.md)" in (ROOT / "README.md").read_text(), "README.md does not link docs/integrators.md"
