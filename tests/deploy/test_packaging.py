"""The container recipe, rehearsed without Docker: each service installs alone and its entry point starts.

The build stage of ``deploy/docker/Dockerfile`` is replayed: its COPY instructions fill a directory
with what the build context sends (``.dockerignore`` applied), and the same ``install.sh`` installs
each service from there into a fresh virtualenv (in parallel, sharing uv's cache). Then
``python -m flowmesh.<service> check`` imports the app and parses its settings. A dependency a service
imports but does not declare, or a file the build needs but the context leaves out, fails here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from flowmesh.contracts.permissions import SERVICES

REPO = Path(__file__).resolve().parents[2]
UV = REPO / ".tools" / "bin" / "uv"
INSTALL = REPO / "deploy" / "docker" / "install.sh"
DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
DEV_TOOLS = ("pytest", "ruff", "mypy", "hypothesis", "schemathesis", "testcontainers")


def install_env() -> dict[str, str]:
    """The environment of install.sh: the repo's uv, no interpreter downloads, no outer virtualenv."""
    assert UV.is_file(), f"{UV} is missing: `make install` bootstraps uv into .tools/"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "UV_PROJECT_ENVIRONMENT")}
    return env | {"UV": str(UV), "UV_PYTHON_DOWNLOADS": "never", "PYTHON": sys.executable}


def install(context: Path, service: str, venv: Path) -> subprocess.CompletedProcess[str]:
    """``bash deploy/docker/install.sh SERVICE VENV`` in a build context, as the Dockerfile runs it."""
    return subprocess.run(
        ["bash", str(context / INSTALL.relative_to(REPO)), service, str(venv)],
        env=install_env(),
        cwd=context,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the build stage's COPY instructions put under its WORKDIR, from the context Docker is sent."""
    root = tmp_path_factory.mktemp("context")
    for sources, destination in build_copies():
        for source in sources:
            path = REPO / source
            files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
            for file in files:
                relative = file.relative_to(REPO).as_posix()
                if dockerignored(relative):
                    continue
                if path.is_file():
                    target = root / destination / file.name if destination.endswith("/") else root / destination
                else:
                    target = root / destination / file.relative_to(path)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, target)
    return root


@pytest.fixture(scope="module")
def installs(context: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess[str]]:
    """Every service installed into its own fresh virtualenv, all at once (``<tmp>/<service>``)."""
    root = tmp_path_factory.mktemp("venvs")
    with ThreadPoolExecutor(max_workers=len(SERVICES)) as pool:
        return dict(zip(SERVICES, pool.map(lambda s: install(context, s, root / s), SERVICES), strict=True))


def venv_of(installs: dict[str, subprocess.CompletedProcess[str]], service: str) -> Path:
    """The service's virtualenv, once install.sh succeeded for it."""
    result = installs[service]
    assert result.returncode == 0, f"install.sh {service} failed:\n{result.stderr[-3000:]}"
    return Path(result.args[-1])


def service_env(data_dir: Path) -> dict[str, str]:
    """A clean environment for ``check``: dev settings, nothing inherited from the test session."""
    inherited = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("FLOWMESH_") and k not in ("NATS_URL", "DATABASE_URL", "VIRTUAL_ENV")
    }
    return inherited | {"FLOWMESH_ENV": "dev", "FLOWMESH_DATA_DIR": str(data_dir)}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("service", SERVICES)
def test_each_service_installs_alone_and_its_entry_point_checks_its_settings(
    installs: dict[str, subprocess.CompletedProcess[str]], service: str, tmp_path: Path
) -> None:
    result = subprocess.run(
        [str(venv_of(installs, service) / "bin" / "python"), "-m", f"flowmesh.{service}", "check"],
        env=service_env(tmp_path / "data"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{service}: configuration OK" in result.stdout


@pytest.mark.timeout(300)
@pytest.mark.parametrize("service", SERVICES)
def test_a_service_venv_holds_no_dev_tools_nor_other_services(
    installs: dict[str, subprocess.CompletedProcess[str]], service: str
) -> None:
    venv = venv_of(installs, service)
    modules = [*DEV_TOOLS, "flowmesh.cli", *(f"flowmesh.{s}" for s in SERVICES)]
    probe = (
        "import importlib.util, json, sys\n"
        "print(json.dumps({m: importlib.util.find_spec(m) is not None for m in sys.argv[1:]}))"
    )
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-c", probe, *modules],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    present = {m for m, found in json.loads(result.stdout).items() if found}
    assert present == {f"flowmesh.{service}"}
    assert not [t for t in DEV_TOOLS if (venv / "bin" / t).exists()]


def test_install_refuses_a_service_that_does_not_exist(context: Path, tmp_path: Path) -> None:
    result = install(context, "billing", tmp_path / "venv")
    assert result.returncode == 2
    assert "no service named 'billing'" in result.stderr
    assert "known: flows gateway runner scheduler usage" in result.stderr
    assert not (tmp_path / "venv").exists()


# ---- the Dockerfile ------------------------------------------------------------------------------------


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions, (KEYWORD, arguments), continuation lines joined, comments dropped."""
    lines = [line for line in DOCKERFILE.read_text(encoding="utf-8").splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    result = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, args = line.strip().partition(" ")
            result.append((keyword.upper(), args.strip()))
    return result


def build_copies() -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY of the build stage, from the context (no ``--from``)."""
    steps = instructions()
    second_from = [k for k, _ in steps].index("FROM", [k for k, _ in steps].index("FROM") + 1)
    copies = []
    for keyword, args in steps[:second_from]:
        if keyword == "COPY" and "--from=" not in args:
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            copies.append((words[:-1], words[-1]))
    return copies


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` (relative to the repo) out of the build context.

    Docker's rules: the last pattern matching the path, or one of its parent directories, decides;
    ``!`` re-includes; ``**`` spans directories.
    """
    patterns = [p.strip() for p in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()]
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in (p for p in patterns if p and not p.startswith("#")):
        negated = pattern.startswith("!")
        body = pattern.lstrip("!").strip("/")
        regex = re.escape(body).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = not negated
    return excluded


def test_the_dockerfile_builds_one_service_with_install_sh_and_runs_it_unprivileged() -> None:
    steps = instructions()
    froms = [args for keyword, args in steps if keyword == "FROM"]
    assert froms == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE}"]
    assert ("ARG", "PYTHON_IMAGE=python:3.11-slim") in steps
    runs = " ".join(args for keyword, args in steps if keyword == "RUN")
    assert "uv==0.13.8" in runs
    assert 'deploy/docker/install.sh "${SERVICE}" /opt/flowmesh' in runs
    # the runtime stage: the venv from the build stage, a non-root user, a health check, the service's module
    runtime = steps[[k for k, _ in steps].index("FROM", 1) :]
    assert ("COPY", "--from=build /opt/flowmesh /opt/flowmesh") in runtime
    (user,) = [args for keyword, args in runtime if keyword == "USER"]
    assert user.split(":")[0] not in ("0", "root") and user.split(":")[0] == "10001"
    env = " ".join(args for keyword, args in runtime if keyword == "ENV")
    assert "FLOWMESH_SERVICE=${SERVICE}" in env and "PYTHONDONTWRITEBYTECODE=1" in env
    (health,) = [args for keyword, args in runtime if keyword == "HEALTHCHECK"]
    assert "/opt/flowmesh/healthcheck.py" in health
    (entrypoint,) = [args for keyword, args in runtime if keyword == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["/opt/flowmesh/entrypoint.sh"]
    assert 'exec python -m "flowmesh.${FLOWMESH_SERVICE' in (REPO / "deploy" / "docker" / "entrypoint.sh").read_text()


def test_every_copy_source_exists_and_is_in_the_build_context() -> None:
    sources = []
    for keyword, args in instructions():
        if keyword == "COPY" and not args.startswith("--from="):
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            sources += words[:-1]
    assert sources
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: no such path in the repository"
        assert not dockerignored(source), f"COPY {source}: .dockerignore keeps it out of the build context"
    for private in (".git", ".venv", ".tools", ".flowmesh", "bench/results", "tests", "libs/runtime/tests", "uv.lock"):
        assert dockerignored(private), f"{private} would be sent to the Docker daemon"
