"""OWASP API7:2023 Server Side Request Forgery.

The risk for Flowmesh: an ``http`` step fetches a URL its tenant wrote (or a template made from a
run's input), from inside the platform's network; an ``llm`` step posts to a provider's base URL.
Pointed at loopback, a private range or a cloud metadata service, they would read what only the
platform should reach, and return it in the run's output.

What these tests prove, through the public API only, on a stack whose runner refuses private
addresses (``FLOWMESH_HTTP_STEP_ALLOW_PRIVATE=false``, as in production): a step to loopback written
as ``127.0.0.1``, ``[::1]``, ``0.0.0.0``, ``localhost``, decimal, hexadecimal, octal and short forms,
IPv4-mapped and NAT64 IPv6, to the link-local metadata address, and to names that resolve there, is
refused with the runner's ``forbidden-address`` step error and never reaches the server behind it;
a redirect from an allowed server to loopback is refused at that hop, and an ``llm`` provider on
loopback is refused alike.

Safety: every process of this stack runs in a network jail (``netjail/sitecustomize.py``): names are
answered by a stub (no DNS query leaves the machine), connections to anything but loopback are
refused, and the one "public" address the stub hands out is served by the local upstream. So no
packet goes to a non-loopback address, even if the guard under test were broken. Deeper tests: the
runner's ``test_ssrf_ranges.py`` (every IANA special-purpose range) and
``test_http_urls_and_redirects.py``.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from flowmesh.contracts.testing import linear, node
from stack import ProcessStack, isolated_stack, publish_flow, wait_run
from upstream import Upstream

JAIL = Path(__file__).parent / "netjail"
PUBLIC = "93.184.215.14"
"""What the stub resolver answers for ``public.test``: a global address, served by the local upstream."""


@pytest.fixture(scope="module")
def ssrf_upstream() -> Iterator[Upstream]:
    u = Upstream()
    yield u
    u.close()


@pytest.fixture(scope="module")
def guarded(infra: Any, ssrf_upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessStack]:
    """Every service, its runner refusing private addresses, in the network jail."""
    port = int(ssrf_upstream.base.rsplit(":", 1)[1])
    jail = {
        "hosts": {
            "public.test": PUBLIC,
            "metadata.google.internal": "169.254.169.254",
            "loopback.test": "127.0.0.1",
            "mapped.test": "::ffff:127.0.0.1",
        },
        "connect": {PUBLIC: port},
    }
    env = {
        "FLOWMESH_HTTP_STEP_ALLOW_PRIVATE": "false",
        "FLOWMESH_RUNNER_LLM_PROVIDERS": json.dumps({"local": f"http://127.0.0.1:{port}/v1"}),
        "FLOWMESH_TEST_NETJAIL": json.dumps(jail),
        "PYTHONPATH": os.pathsep.join(p for p in (str(JAIL), os.environ.get("PYTHONPATH", "")) if p),
    }
    with isolated_stack(infra.database_url, tmp_path_factory.mktemp("ssrf"), env=env) as s:
        yield s


@pytest.fixture(scope="module")
def tenant(guarded: ProcessStack) -> Iterator[httpx.Client]:
    with guarded.client(f"ssrf-{uuid.uuid4().hex[:8]}") as c:
        yield c


@pytest.fixture(scope="module")
def fetch(tenant: httpx.Client) -> str:
    """A published flow whose one ``http`` step GETs the URL given as input."""
    return publish_flow(tenant, linear(node("call", "http", url="{{ input.url }}")))


def call(c: httpx.Client, flow_id: str, url: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the fetch flow on ``url``: the run and its ``call`` step."""
    r = c.post(f"/flows/{flow_id}/runs", json={"input": {"url": url}})
    assert r.status_code == 201, r.text
    run = wait_run(c, r.json()["id"])
    steps = {s["stepId"]: s for s in c.get(f"/runs/{run['id']}/steps").json()["items"]}
    return run, steps["call"]


def loopback_in_disguise(port: int) -> dict[str, str]:
    return {
        "127.0.0.1": f"http://127.0.0.1:{port}",
        "::1": f"http://[::1]:{port}",
        "0.0.0.0": f"http://0.0.0.0:{port}",
        "localhost": f"http://localhost:{port}",
        "a name under localhost": f"http://api.localhost:{port}",
        "decimal": f"http://2130706433:{port}",
        "hexadecimal": f"http://0x7f000001:{port}",
        "octal": f"http://017700000001:{port}",
        "dotted octal": f"http://0177.0.0.01:{port}",
        "short form": f"http://127.1:{port}",
        "another loopback address": f"http://127.8.9.10:{port}",
        "IPv4-mapped IPv6": f"http://[::ffff:127.0.0.1]:{port}",
        "IPv4-mapped IPv6 in hex": f"http://[::ffff:7f00:1]:{port}",
        "NAT64 of loopback": f"http://[64:ff9b::7f00:1]:{port}",
        "link-local metadata": "http://169.254.169.254",
        "a name of the metadata service": f"http://metadata.google.internal:{port}",
        "a name resolving to loopback": f"http://loopback.test:{port}",
        "a name resolving to mapped loopback": f"http://mapped.test:{port}",
    }


def test_the_stand_in_public_server_is_reachable(tenant: httpx.Client, fetch: str, ssrf_upstream: Upstream) -> None:
    """The control: the guard refuses addresses, not every request (and the jail serves the stand-in)."""
    run, step = call(tenant, fetch, "http://public.test/reachable")
    assert run["status"] == "succeeded", step
    assert step["output"]["status"] == 200
    assert any(r["path"] == "/reachable" for r in ssrf_upstream.requests)


def test_every_disguise_of_loopback_and_metadata_is_refused(
    tenant: httpx.Client, fetch: str, ssrf_upstream: Upstream
) -> None:
    port = int(ssrf_upstream.base.rsplit(":", 1)[1])
    for case, base in loopback_in_disguise(port).items():
        marker = f"/internal/{uuid.uuid4().hex}"
        run, step = call(tenant, fetch, base + marker)
        assert run["status"] == "failed", (case, step)
        assert step["error"]["type"] == "forbidden-address", (case, step["error"])
        assert "may not reach it" in step["error"]["message"], (case, step["error"])
        assert step["output"] is None, case
        assert not [r for r in ssrf_upstream.requests if r["path"] == marker], f"{case} reached the server"


def test_a_redirect_to_loopback_is_refused_at_that_hop(
    tenant: httpx.Client, fetch: str, ssrf_upstream: Upstream
) -> None:
    port = int(ssrf_upstream.base.rsplit(":", 1)[1])
    for target in (f"http://127.0.0.1:{port}", f"http://localhost:{port}", f"http://loopback.test:{port}"):
        marker = f"/internal/{uuid.uuid4().hex}"
        first = f"/redirect?to={target}{marker}"
        run, step = call(tenant, fetch, "http://public.test" + first)
        assert run["status"] == "failed" and step["error"]["type"] == "forbidden-address", step
        assert any(r["path"] == first for r in ssrf_upstream.requests)  # the first hop went out
        assert not [r for r in ssrf_upstream.requests if r["path"] == marker], f"{target} was reached"


def test_an_llm_provider_on_loopback_is_refused(tenant: httpx.Client, ssrf_upstream: Upstream) -> None:
    assert tenant.post("/api-keys", json={"provider": "local", "apiKey": "sk-ssrf-0123456789"}).status_code == 201
    flow_id = publish_flow(
        tenant,
        linear(node("call", "llm", provider="local", model="m", messages=[{"role": "user", "content": "hi"}])),
    )
    r = tenant.post(f"/flows/{flow_id}/runs", json={"input": {}})
    run = wait_run(tenant, r.json()["id"])
    step = next(s for s in tenant.get(f"/runs/{run['id']}/steps").json()["items"] if s["stepId"] == "call")
    assert run["status"] == "failed" and step["error"]["type"] == "forbidden-address", step
    assert not [r for r in ssrf_upstream.requests if r["path"].startswith("/v1/")]
