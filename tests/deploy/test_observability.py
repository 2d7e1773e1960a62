"""deploy/observability: the Grafana dashboard plots only what the services export, and the Prometheus
configs scrape what deploy/k8s and ``make run`` serve.

The exported metrics are read from the registry after importing every service's application (each
defines its metrics at import, as it does in its own process); tests/e2e/test_metrics.py scrapes the
same families from running processes.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

from deploy.manifests import DEPLOY, K8S, Manifest, find, kustomize
from flowmesh.cli.main import DEFAULT_HTTP_PORT, DEV_HEALTH_PORT_OFFSETS
from flowmesh.contracts.permissions import SERVICES

OBSERVABILITY = DEPLOY / "observability"
DASHBOARD = OBSERVABILITY / "grafana" / "flowmesh.json"
PROMETHEUS = OBSERVABILITY / "prometheus.yml"
PROMETHEUS_DEV = OBSERVABILITY / "prometheus-dev.yml"
HEALTH_PORT = 9090
METRIC = re.compile(r"\bflowmesh_[a-z_]+")
BY = re.compile(r"\bby \(([^)]*)\)")
SELECTOR_LABEL = re.compile(r"[{,]\s*([a-z_]+)\s*(?:=~|!=|!~|=)")
TARGET_LABELS = frozenset({"le", "job", "pod", "instance", "namespace"})
"""Labels Prometheus adds to every series (``le`` is a histogram bucket's), not the services."""
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")


def exported() -> dict[str, set[str]]:
    """Every ``flowmesh_`` series name the services export, with the label names of its family."""
    for service in SERVICES:
        importlib.import_module(f"flowmesh.{service}.app")
    found: dict[str, set[str]] = {}
    for collector in list(REGISTRY._collector_to_names):  # the registry's own index of its collectors
        labels = set(getattr(collector, "_labelnames", ()))
        for family in collector.collect():
            if family.name.startswith("flowmesh_"):
                series = family.name + ("_total" if family.type == "counter" else "")
                found[series] = labels
    return found


def dashboard_exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [t["expr"] for p in board["panels"] for t in p.get("targets", [])]


def series_of(expr: str) -> set[str]:
    """The metric names an expression reads, histogram series named by their family."""
    names = set()
    for name in METRIC.findall(expr):
        for suffix in HISTOGRAM_SERIES:
            if name.endswith(suffix):
                name = name.removesuffix(suffix)
        names.add(name)
    return names


def test_the_dashboard_is_a_grafana_dashboard_of_prometheus_panels_that_do_not_overlap() -> None:
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert board["uid"] == "flowmesh" and board["title"] and isinstance(board["schemaVersion"], int)
    assert [v["name"] for v in board["templating"]["list"]] == ["datasource"]
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])
        for t in p["targets"]:
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]


def test_every_metric_the_dashboard_plots_is_exported_by_a_service_with_the_labels_it_groups_by() -> None:
    families = exported()
    exprs = dashboard_exprs()
    plotted = set().union(*(series_of(e) for e in exprs))
    assert plotted, "the dashboard plots no flowmesh_ metric"
    missing = {name for name in plotted if name not in families}
    assert not missing, f"the dashboard reads metrics no service exports: {sorted(missing)}"
    for expr in exprs:
        known = set().union(*(families[n] for n in series_of(expr))) | TARGET_LABELS
        used = {label.strip() for group in BY.findall(expr) for label in group.split(",")} | set(
            SELECTOR_LABEL.findall(expr)
        )
        assert used <= known, f"{expr}: no metric it reads has the labels {sorted(used - known)}"


def test_the_dashboard_covers_runs_steps_lag_gateway_websockets_scheduler_usage_and_rpc() -> None:
    plotted = set().union(*(series_of(e) for e in dashboard_exprs()))
    assert {
        "flowmesh_runner_runs_started_total",
        "flowmesh_runner_runs_finished_total",
        "flowmesh_runner_steps_total",
        "flowmesh_runner_step_duration_seconds",
        "flowmesh_runner_runs_in_flight",
        "flowmesh_consumer_pending_messages",
        "flowmesh_http_request_seconds",
        "flowmesh_http_requests_total",
        "flowmesh_gateway_websocket_connections",
        "flowmesh_scheduler_lateness_seconds",
        "flowmesh_usage_metering_lag_seconds",
        "flowmesh_rpc_seconds",
    } <= plotted


@pytest.fixture(scope="module")
def base() -> list[Manifest]:
    return kustomize(K8S / "base")


def _relabel_keep(job: dict[str, Any]) -> dict[str, str]:
    """The pod labels and port name the ``keep`` rule of a kubernetes_sd job requires."""
    (keep,) = [r for r in job["relabel_configs"] if r.get("action") == "keep"]
    sources = [s.removeprefix("__meta_kubernetes_pod_") for s in keep["source_labels"]]
    return dict(zip(sources, keep["regex"].split(keep.get("separator", ";")), strict=True))


def test_the_kubernetes_scrape_config_finds_every_service_pod_on_its_health_port(base: list[Manifest]) -> None:
    config = yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))
    (job,) = config["scrape_configs"]
    (sd,) = job["kubernetes_sd_configs"]
    namespace = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text(encoding="utf-8"))["namespace"]
    assert sd["role"] == "pod" and sd["namespaces"]["names"] == [namespace]
    wanted = _relabel_keep(job)
    port_name = wanted.pop("container_port_name")
    labels = {k.removeprefix("label_"): v for k, v in wanted.items()}
    assert len(labels) == len(wanted), "the keep rule reads pod labels and the port name only"
    scraped = set()
    for deployment in find(base, "Deployment"):
        pod = deployment["spec"]["template"]
        # Prometheus names a pod label's meta label with every character outside [a-zA-Z0-9_] as _
        as_meta = {re.sub(r"[^a-zA-Z0-9_]", "_", k): v for k, v in pod["metadata"]["labels"].items()}
        if not labels.items() <= as_meta.items():
            continue
        scraped.add(pod["metadata"]["labels"]["app.kubernetes.io/name"])
        ports = [p for c in pod["spec"]["containers"] for p in c.get("ports", []) if p.get("name") == port_name]
        assert [p["containerPort"] for p in ports] == [HEALTH_PORT], deployment["metadata"]["name"]
    assert scraped == set(SERVICES)
    (policy,) = find(base, "NetworkPolicy", "flowmesh-allow-metrics-scrape")
    assert [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]] == [HEALTH_PORT]
    assert {r["target_label"] for r in job["relabel_configs"] if "target_label" in r} >= {"job", "pod"}


def test_the_dev_scrape_config_matches_the_ports_of_make_run() -> None:
    config = yaml.safe_load(PROMETHEUS_DEV.read_text(encoding="utf-8"))
    (job,) = config["scrape_configs"]
    targets = {s["labels"]["job"]: s["targets"] for s in job["static_configs"]}
    expected = {"gateway": DEFAULT_HTTP_PORT} | {n: DEFAULT_HTTP_PORT + o for n, o in DEV_HEALTH_PORT_OFFSETS.items()}
    assert targets == {name: [f"127.0.0.1:{port}"] for name, port in expected.items()}
    assert set(targets) == set(SERVICES)


def test_observability_files_are_where_the_operations_guide_says() -> None:
    guide = (Path(DEPLOY.parent) / "docs" / "operations.md").read_text(encoding="utf-8")
    for path in (DASHBOARD, PROMETHEUS, PROMETHEUS_DEV):
        assert str(path.relative_to(DEPLOY.parent)) in guide
