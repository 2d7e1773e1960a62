"""deploy/k8s and deploy/nats/helm, checked without a cluster: rendered, validated, linted, held to policy.

The checks live in ``deploy.manifests``; the tests at the end break a copy of the tree on purpose and
expect the same checks to say so.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from deploy.manifests import (
    DEPLOY,
    K8S,
    Manifest,
    documented_secrets,
    find,
    helm_values_problems,
    kustomize,
    lint_yaml,
    policy_problems,
    referenced_secrets,
    validate_objects,
)
from flowmesh.contracts.permissions import SERVICES
from flowmesh.contracts.streams import RUNNER_STARTS, RUNNER_STEPS

TREES = ("base", "overlays/dev", "overlays/prod")
README = DEPLOY.parent / "docs" / "operations.md"
"""Where the deployment is written step by step: the Secrets it creates, the labels it applies by."""
NATS_HELM = DEPLOY / "nats" / "helm"
NATS_AUTH = DEPLOY / "nats" / "flowmesh-auth.conf"
DATABASE_SERVICES = ("flows", "runner", "scheduler", "usage")


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Manifest]]:
    return {tree: kustomize(K8S / tree) for tree in TREES}


def config_of(objects: list[Manifest]) -> dict[str, str]:
    (config,) = [c for c in find(objects, "ConfigMap") if c["metadata"]["name"].startswith("flowmesh-config")]
    return config["data"]


def test_every_yaml_file_under_deploy_passes_yamllint() -> None:
    assert lint_yaml(DEPLOY) == []


@pytest.mark.parametrize("tree", TREES)
def test_every_rendered_object_validates_against_its_schema(rendered: dict[str, list[Manifest]], tree: str) -> None:
    objects = rendered[tree]
    assert objects
    assert validate_objects(objects) == []


def test_prod_holds_every_policy(rendered: dict[str, list[Manifest]]) -> None:
    assert policy_problems(rendered["overlays/prod"], min_replicas=2, pinned_images=True) == []


@pytest.mark.parametrize("tree", ["base", "overlays/dev"])
def test_base_and_dev_hold_every_policy_but_replicas_and_tags(rendered: dict[str, list[Manifest]], tree: str) -> None:
    assert policy_problems(rendered[tree], min_replicas=1, pinned_images=False) == []


def test_prod_runs_r3_streams_three_databases_and_nats_over_tls(rendered: dict[str, list[Manifest]]) -> None:
    objects = rendered["overlays/prod"]
    config = config_of(objects)
    assert config["FLOWMESH_STREAM_REPLICAS"] == "3"
    assert config["NATS_URL"].startswith("tls://")
    ca = config["FLOWMESH_NATS_TLS_CA"]
    for workload in find(objects, "Deployment") + find(objects, "Job"):
        mounts = {m["mountPath"] for m in workload["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
        assert str(Path(ca).parent) in mounts, workload["metadata"]["name"]
    (cluster,) = find(objects, "Cluster")
    assert cluster["spec"]["instances"] == 3
    assert cluster["spec"]["postgresql"]["synchronous"]["number"] >= 1
    (scaled,) = find(objects, "ScaledObject", "runner")
    assert scaled["spec"]["minReplicaCount"] == 3


def test_dev_runs_one_of_everything(rendered: dict[str, list[Manifest]]) -> None:
    objects = rendered["overlays/dev"]
    assert config_of(objects)["FLOWMESH_STREAM_REPLICAS"] == "1"
    assert {d["spec"].get("replicas") for d in find(objects, "Deployment")} <= {1, None}
    assert find(objects, "HorizontalPodAutoscaler", "gateway")[0]["spec"]["minReplicas"] == 1
    assert find(objects, "ScaledObject", "runner")[0]["spec"]["minReplicaCount"] == 1
    assert find(objects, "Cluster")[0]["spec"]["instances"] == 1


def test_services_connect_as_their_own_nats_user_and_shut_down_gracefully(rendered: dict[str, list[Manifest]]) -> None:
    objects = rendered["overlays/prod"]
    for name in SERVICES:
        (deployment,) = find(objects, "Deployment", name)
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert {"name": "FLOWMESH_NATS_USER", "value": name} in container["env"]
        assert {"secretRef": {"name": f"flowmesh-{name}"}} in container["envFrom"]
        port = "http" if name == "gateway" else "health"
        assert container["ports"][0]["name"] == port
        assert container["livenessProbe"]["httpGet"]["port"] == port
    gateway = find(objects, "Deployment", "gateway")[0]["spec"]["template"]["spec"]
    assert gateway["terminationGracePeriodSeconds"] >= 45
    assert gateway["containers"][0]["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    assert {"name": "FLOWMESH_GATEWAY_DRAIN_S", "value": "5"} in gateway["containers"][0]["env"]
    assert find(objects, "Deployment", "runner")[0]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 60


def test_a_migration_job_runs_each_schema_owner_before_the_services(rendered: dict[str, list[Manifest]]) -> None:
    jobs = find(rendered["overlays/prod"], "Job")
    assert {j["metadata"]["labels"]["app.kubernetes.io/name"] for j in jobs} == set(DATABASE_SERVICES)
    for job in jobs:
        assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "migrate"
        assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["migrate"]
        assert job["spec"]["backoffLimit"] >= 1 and job["spec"]["ttlSecondsAfterFinished"] > 0


def test_every_object_carries_the_labels_the_readme_applies_by(rendered: dict[str, list[Manifest]]) -> None:
    readme = README.read_text(encoding="utf-8")
    for obj in rendered["overlays/prod"]:
        labels = obj["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/part-of") == "flowmesh", obj["metadata"]["name"]
        component = labels.get("app.kubernetes.io/component")
        assert component in ("server", "migrate", "config", "database", "network"), obj["metadata"]["name"]
    for selector in ("component in (config,database,network)", "component=migrate", "component!=migrate"):
        assert selector in readme


def test_network_policies_deny_by_default_and_keep_the_runner_off_private_ranges(
    rendered: dict[str, list[Manifest]],
) -> None:
    policies = {p["metadata"]["name"]: p["spec"] for p in find(rendered["overlays/prod"], "NetworkPolicy")}
    deny = policies["flowmesh-default-deny"]
    assert deny["podSelector"] == {"matchLabels": {"app.kubernetes.io/part-of": "flowmesh"}}
    assert sorted(deny["policyTypes"]) == ["Egress", "Ingress"]
    assert "ingress" not in deny and "egress" not in deny
    (rule,) = policies["runner-allow-internet"]["egress"]
    block = rule["to"][0]["ipBlock"]
    assert block["cidr"] == "0.0.0.0/0"
    assert set(block["except"]) == {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "100.64.0.0/10"}
    postgres = policies["flowmesh-allow-postgres"]["podSelector"]["matchExpressions"][0]["values"]
    assert sorted(postgres) == sorted(DATABASE_SERVICES)


def test_keda_scales_the_runner_on_its_two_consumers_in_the_flowmesh_account(
    rendered: dict[str, list[Manifest]],
) -> None:
    (scaled,) = find(rendered["overlays/prod"], "ScaledObject", "runner")
    triggers = [t["metadata"] for t in scaled["spec"]["triggers"]]
    assert {(t["stream"], t["consumer"]) for t in triggers} == {
        (RUNNER_STEPS.stream, RUNNER_STEPS.durable),
        (RUNNER_STARTS.stream, RUNNER_STARTS.durable),
    }
    account = re.search(r"^accounts\s*\{\s*(\w+)", NATS_AUTH.read_text(encoding="utf-8"), re.MULTILINE)
    assert account is not None
    assert {t["account"] for t in triggers} == {account.group(1)}
    # the headless Service of the release: KEDA finds each server, and the consumer's leader, by it
    assert {t["natsServerMonitoringEndpoint"] for t in triggers} == {"nats-headless.flowmesh.svc.cluster.local:8222"}


def test_every_secret_the_manifests_read_is_created_in_the_readme_with_its_keys(
    rendered: dict[str, list[Manifest]],
) -> None:
    documented = documented_secrets(README)
    for tree in TREES:
        missing = referenced_secrets(rendered[tree]) - documented.keys()
        assert not missing, f"{tree} reads Secrets docs/operations.md never creates: {sorted(missing)}"
    assert documented["flowmesh-gateway"] == {"FLOWMESH_NATS_PASSWORD", "FLOWMESH_JWT_SECRET"}
    for name in DATABASE_SERVICES:
        extra = {"FLOWMESH_USAGE_KEYS_SECRET"} if name == "usage" else set()
        assert documented[f"flowmesh-{name}"] == {"DATABASE_URL", "FLOWMESH_NATS_PASSWORD", *extra}
    assert "openssl rand -base64 48" in README.read_text(encoding="utf-8")


def test_nats_values_validate_and_load_every_password_the_auth_config_names() -> None:
    files = [NATS_HELM / "values.yaml", NATS_HELM / "values-dev.yaml"]
    assert helm_values_problems(files) == []
    values = yaml.safe_load(files[0].read_text(encoding="utf-8"))
    wanted = set(re.findall(r"\$(FM_NATS_PASSWORD_\w+)", NATS_AUTH.read_text(encoding="utf-8")))
    assert wanted == {f"FM_NATS_PASSWORD_{name.upper()}" for name in SERVICES}
    env = values["container"]["env"]
    assert set(env) == wanted
    for var in wanted:
        assert env[var] == {"valueFrom": {"secretKeyRef": {"name": "flowmesh-nats-users", "key": var}}}
    assert documented_secrets(README)["flowmesh-nats-users"] == wanted
    # the auth config is mounted beside nats.conf from the chart's ConfigMap and included from there
    assert values["config"]["merge"]["$include"] == NATS_AUTH.name
    assert rf"configMap.merge.data.{NATS_AUTH.name.replace('.', chr(92) + '.')}=deploy/nats/{NATS_AUTH.name}" in (
        README.read_text(encoding="utf-8")
    )
    assert values["config"]["cluster"] == {"enabled": True, "replicas": 3}
    assert values["config"]["nats"]["tls"]["secretName"] == "nats-server-tls"


# ---- broken on purpose: the same checks must fail ---------------------------------------------------


@pytest.fixture
def k8s_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    return copy


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert text.count(old) == 1, f"{old!r} is not in {path} exactly once"
    path.write_text(text.replace(old, new), encoding="utf-8")


def test_a_misspelt_deployment_field_fails_validation(k8s_copy: Path) -> None:
    edit(k8s_copy / "base" / "flows.yaml", "  replicas: 1\n", "  replica: 1\n")
    problems = validate_objects(kustomize(k8s_copy / "overlays" / "prod"), k8s_copy / "schemas")
    assert problems
    assert all(p.startswith("Deployment/flows: ") and "'replica' was unexpected" in p for p in problems), problems


@pytest.mark.parametrize(
    ("old", "new", "unexpected"),
    [
        ("  maxReplicaCount: 10\n", "  maxReplicasCount: 10\n", "maxReplicasCount"),
        ('        lagThreshold: "128"\n', '        lagTreshold: "128"\n', "lagTreshold"),
    ],
    ids=["spec", "trigger-metadata"],
)
def test_a_misspelt_scaledobject_field_fails_validation(k8s_copy: Path, old: str, new: str, unexpected: str) -> None:
    edit(k8s_copy / "base" / "runner.yaml", old, new)
    problems = validate_objects(kustomize(k8s_copy / "overlays" / "prod"), k8s_copy / "schemas")
    assert problems
    assert all(p.startswith("ScaledObject/runner: ") and f"'{unexpected}' was unexpected" in p for p in problems)


def test_bad_indentation_fails_yamllint(k8s_copy: Path) -> None:
    # still valid YAML, but the list sits two columns deeper than the rest of the tree's lists
    good = (
        "          envFrom:\n            - configMapRef:\n                name: flowmesh-config\n"
        "            - secretRef:\n"
    )
    bad = (
        "          envFrom:\n              - configMapRef:\n                  name: flowmesh-config\n"
        "              - secretRef:\n"
    )
    edit(k8s_copy / "base" / "gateway.yaml", good, bad)
    problems = lint_yaml(k8s_copy)
    assert problems
    assert all(p.startswith("base/gateway.yaml:") and "(indentation)" in p for p in problems), problems


def test_a_literal_password_in_a_manifest_fails_the_policy(k8s_copy: Path) -> None:
    edit(
        k8s_copy / "base" / "usage.yaml",
        "              value: usage\n",
        "              value: usage\n            - name: FLOWMESH_NATS_PASSWORD\n              value: hunter2\n",
    )
    problems = policy_problems(kustomize(k8s_copy / "overlays" / "prod"), min_replicas=2, pinned_images=True)
    assert problems == [
        "Deployment/usage container usage: FLOWMESH_NATS_PASSWORD has a literal value; it must come from a Secret"
    ]
