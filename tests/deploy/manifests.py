"""Checks of ``deploy/`` that need no cluster, shared by the tests (which also run them on copies broken on purpose).

Each check returns the problems it found, one line each (``<where>: <what>``); an empty list means it passed.
Kubernetes' own kinds are validated strictly (unknown fields refused) with ``kubernetes_validate``; custom
resources against the JSON Schemas in ``deploy/k8s/schemas/`` (``<group>_<kind>.json``), which close every
level they define for the same reason.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from yamllint import linter
from yamllint.config import YamlLintConfig

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
SCHEMAS = K8S / "schemas"
YAMLLINT_CONFIG = DEPLOY / ".yamllint"
NATS_VALUES_SCHEMA = DEPLOY / "nats" / "helm" / "values.schema.json"

KUBERNETES_VERSIONS = ("1.32", kubernetes_validate.latest_version())
"""The oldest Kubernetes the manifests support (the kubectl here is 1.32) and the newest the package knows."""

SECRET_LIKE = re.compile(r"PASSWORD|SECRET|DATABASE_URL")
"""Names whose value must come from a Secret, never written in a manifest."""

UID = 10001
"""The image's non-root user (deploy/docker/Dockerfile)."""

Manifest = dict[str, Any]


class CheckError(Exception):
    """A check could not run at all (no kubectl, an overlay that does not build)."""


def kustomize(directory: Path) -> list[Manifest]:
    """The objects ``kubectl kustomize directory`` renders.

    Raises:
        CheckError: kubectl is missing or the kustomization does not build.
    """
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise CheckError(
            "kubectl is not on PATH: the manifest checks render deploy/k8s with `kubectl kustomize` "
            "(any kubectl >= 1.27 bundles kustomize); install it to run them"
        )
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0:
        raise CheckError(f"kubectl kustomize {directory} failed: {result.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]


def describe(obj: Manifest) -> str:
    """``Kind/name``, how problems name an object."""
    return f"{obj.get('kind', '?')}/{obj.get('metadata', {}).get('name', '?')}"


def find(objects: Iterable[Manifest], kind: str, name: str | None = None) -> list[Manifest]:
    """The objects of one kind (and name)."""
    return [o for o in objects if o.get("kind") == kind and (name is None or o["metadata"]["name"] == name)]


def _schema_errors(schema: dict[str, Any], instance: Any, where: str) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema)
    return [
        f"{where}: {'/'.join(map(str, error.absolute_path)) or '(top)'}: {error.message}"
        for error in sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path)))
    ]


def custom_schemas(directory: Path = SCHEMAS) -> dict[tuple[str, str], dict[str, Any]]:
    """The schemas of custom resources, by (API group, lower-case kind), from ``<group>_<kind>.json`` files."""
    schemas: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(directory.glob("*.json")):
        group, _, kind = path.stem.rpartition("_")
        schema = json.loads(path.read_text(encoding="utf-8"))
        jsonschema.Draft202012Validator.check_schema(schema)
        schemas[(group, kind)] = schema
    return schemas


def validate_objects(objects: Iterable[Manifest], schemas_dir: Path = SCHEMAS) -> list[str]:
    """Every object against its schema: Kubernetes' own (strict) or ours for custom resources.

    An object with neither schema is a problem too: nothing ships unvalidated.
    """
    schemas = custom_schemas(schemas_dir)
    problems: list[str] = []
    for obj in objects:
        where = describe(obj)
        group = str(obj.get("apiVersion", "")).rpartition("/")[0]
        schema = schemas.get((group, str(obj.get("kind", "")).lower()))
        if schema is not None:
            problems += _schema_errors(schema, obj, where)
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                api = obj.get("apiVersion")
                problems.append(f"{where}: no schema for {api}, neither Kubernetes {version}'s nor in {schemas_dir}")
                break
            except kubernetes_validate.ValidationError as error:
                path = "/".join(map(str, error.absolute_path)) or "(top)"
                problems.append(f"{where}: Kubernetes {version}: {path}: {error.message}")
    return problems


def lint_yaml(root: Path, config: Path = YAMLLINT_CONFIG) -> list[str]:
    """yamllint over every YAML file under ``root``; warnings count as problems too."""
    conf = YamlLintConfig(file=str(config))
    problems: list[str] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = str(path)
        if not conf.is_yaml_file(name) or conf.is_file_ignored(name):
            continue
        with path.open(encoding="utf-8") as f:
            for p in linter.run(f, conf, name):
                rule = f" ({p.rule})" if p.rule else ""
                problems.append(f"{path.relative_to(root)}:{p.line}:{p.column}: {p.level}: {p.desc}{rule}")
    return problems


def pod_specs(objects: Iterable[Manifest]) -> Iterator[tuple[Manifest, Manifest]]:
    """(workload, pod template) of every Deployment and Job."""
    for obj in objects:
        if obj.get("kind") in ("Deployment", "Job"):
            yield obj, obj["spec"]["template"]


def _selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    match = (selector or {}).get("matchLabels", selector or {})
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


def _autoscaler_min(objects: list[Manifest], deployment: str) -> int | None:
    for hpa in find(objects, "HorizontalPodAutoscaler"):
        if hpa["spec"]["scaleTargetRef"]["name"] == deployment:
            return int(hpa["spec"].get("minReplicas", 1))
    for scaled in find(objects, "ScaledObject"):
        if scaled["spec"]["scaleTargetRef"]["name"] == deployment:
            return int(scaled["spec"].get("minReplicaCount", 0))
    return None


def _pinned(image: str) -> bool:
    """Whether an image reference names a digest, or a tag other than ``latest``."""
    tag = image.rsplit("/", 1)[-1].partition(":")[2]
    return "@sha256:" in image or tag not in ("", "latest")


def _pod_problems(where: str, template: Manifest, *, pinned_images: bool) -> list[str]:
    spec = template["spec"]
    problems: list[str] = []
    pod_sc = spec.get("securityContext", {})
    expected = {"runAsNonRoot": True, "runAsUser": UID}
    problems += [f"{where}: pod securityContext.{k} must be {v!r}" for k, v in expected.items() if pod_sc.get(k) != v]
    if not isinstance(pod_sc.get("fsGroup"), int):
        problems.append(f"{where}: pod securityContext.fsGroup is not set")
    if pod_sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.append(f"{where}: pod securityContext.seccompProfile.type must be RuntimeDefault")
    if spec.get("automountServiceAccountToken") is not False:
        problems.append(f"{where}: automountServiceAccountToken must be false (no pod talks to the API server)")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for c in spec["containers"]:
        at = f"{where} container {c['name']}"
        sc = c.get("securityContext", {})
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{at}: readOnlyRootFilesystem must be true")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{at}: allowPrivilegeEscalation must be false")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            problems.append(f"{at}: capabilities must drop ALL")
        resources = c.get("resources", {})
        for part in ("requests", "limits"):
            missing = {"cpu", "memory"} - set(resources.get(part, {}))
            if missing:
                problems.append(f"{at}: resources.{part} lacks {', '.join(sorted(missing))}")
        tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
        if not tmp or "emptyDir" not in volumes.get(tmp[0]["name"], {}):
            problems.append(f"{at}: /tmp must be an emptyDir (the root filesystem is read-only)")
        image = c.get("image", "")
        if pinned_images and not _pinned(image):
            problems.append(f"{at}: image {image!r} is not pinned to a tag or digest")
        for env in c.get("env", []):
            if SECRET_LIKE.search(env["name"]) and "value" in env:
                problems.append(f"{at}: {env['name']} has a literal value; it must come from a Secret")
    return problems


def policy_problems(objects: list[Manifest], *, min_replicas: int, pinned_images: bool) -> list[str]:
    """What every rendered overlay must hold, beyond its schema.

    Args:
        objects: The rendered overlay.
        min_replicas: The fewest replicas each Deployment may run (its own, or its autoscaler's minimum).
        pinned_images: Whether every image must name a tag (not ``latest``) or a digest.
    """
    problems: list[str] = []
    pdbs = find(objects, "PodDisruptionBudget")
    for workload, template in pod_specs(objects):
        where = describe(workload)
        problems += _pod_problems(where, template, pinned_images=pinned_images)
        if workload["kind"] != "Deployment":
            continue
        labels = template["metadata"]["labels"]
        spec = template["spec"]
        for c in spec["containers"]:
            expected = {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
            # the gateway's readiness is its own (?scope=self), not every service's
            probes = {p: c.get(p, {}).get("httpGet", {}).get("path", "").split("?")[0] for p in expected}
            if probes != expected:
                problems.append(f"{where} container {c['name']}: probes must be {expected}, found {probes}")
        keys = {t["topologyKey"] for t in spec.get("topologySpreadConstraints", [])}
        missing_keys = {"topology.kubernetes.io/zone", "kubernetes.io/hostname"} - keys
        if missing_keys:
            problems.append(f"{where}: no topology spread over {', '.join(sorted(missing_keys))}")
        if not any(_selects(p["spec"].get("selector"), labels) for p in pdbs):
            problems.append(f"{where}: no PodDisruptionBudget selects its pods")
        autoscaled = _autoscaler_min(objects, workload["metadata"]["name"])
        if autoscaled is not None and "replicas" in workload["spec"]:
            problems.append(f"{where}: sets replicas although an autoscaler owns them (every apply would reset them)")
        replicas = autoscaled if autoscaled is not None else workload["spec"].get("replicas", 1)
        if replicas < min_replicas:
            problems.append(f"{where}: runs {replicas} replica(s), fewer than {min_replicas}")
    templates = [t["metadata"].get("labels", {}) for _, t in pod_specs(objects)]
    for service in find(objects, "Service"):
        if not any(_selects(service["spec"].get("selector"), labels) for labels in templates):
            problems.append(f"{describe(service)}: its selector matches no pod template")
    for secret in find(objects, "Secret"):
        if secret.get("data") or secret.get("stringData"):
            problems.append(f"{describe(secret)}: a Secret with values is committed; create it apart")
    for config in find(objects, "ConfigMap"):
        leaked = sorted(k for k in config.get("data", {}) if SECRET_LIKE.search(k))
        if leaked:
            problems.append(f"{describe(config)}: {', '.join(leaked)} belong in a Secret")
    return problems


def referenced_secrets(objects: Iterable[Manifest]) -> set[str]:
    """The names of every Secret the objects read (env, envFrom, volumes, TLS, CloudNativePG bootstrap)."""
    names: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "secretName" and isinstance(value, str):
                    names.add(value)
                elif key in ("secretRef", "secretKeyRef", "secret") and isinstance(value, dict) and "name" in value:
                    names.add(value["name"])
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    for obj in objects:
        walk(obj.get("spec", {}))
    return names


def documented_secrets(readme: Path) -> dict[str, set[str]]:
    """The Secrets a README creates, with their keys.

    Read from its ``kubectl create secret`` commands and from cert-manager Certificates' ``secretName``.
    """
    text = re.sub(r"\\\n\s*", " ", readme.read_text(encoding="utf-8"))
    secrets: dict[str, set[str]] = {}
    for match in re.finditer(r"create secret (?:generic|tls) ([a-z0-9.-]+)([^\n]*)", text):
        keys = set(re.findall(r"--from-literal=([A-Za-z0-9_.-]+)=", match.group(2)))
        secrets.setdefault(match.group(1), set()).update(keys)
    for match in re.finditer(r"secretName: ([a-z0-9.-]+)", text):
        secrets.setdefault(match.group(1), set())
    return secrets


def merge_values(*layers: dict[str, Any]) -> dict[str, Any]:
    """Helm's merge of values files: later wins, maps merge, ``null`` removes a key."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if value is None:
                merged.pop(key, None)
            elif isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = merge_values(merged[key], value)
            else:
                merged[key] = value
    return merged


def helm_values_problems(files: list[Path], schema_path: Path = NATS_VALUES_SCHEMA) -> list[str]:
    """Each values file, and all of them merged in order, against the chart values' schema."""
    schema = json.loads(schema_path.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    layers = [yaml.safe_load(f.read_text(encoding="utf-8")) or {} for f in files]
    problems: list[str] = []
    for path, layer in zip(files, layers, strict=True):
        problems += _schema_errors(schema, layer, path.name)
    problems += _schema_errors(schema, merge_values(*layers), " + ".join(f.name for f in files))
    return problems
