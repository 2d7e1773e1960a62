#!/usr/bin/env bash
# Install one Flowmesh service, and only what it needs, into a virtualenv:
#
#   deploy/docker/install.sh SERVICE VENV_DIR
#
# The container build (deploy/docker/Dockerfile) and the packaging rehearsal
# (tests/deploy/test_packaging.py) both run this script, so what the tests prove is what ships.
# No uv.lock is committed: the versions come from the root pyproject's
# `[tool.uv] constraint-dependencies`, exported here as a pip-style constraints file.
# Environment: UV (the uv binary, default `uv`), PYTHON (the interpreter a new venv is based on,
# default `python3`).
set -euo pipefail

usage="usage: install.sh SERVICE VENV_DIR"
service="${1:?$usage}"
venv="${2:?$usage}"
uv="${UV:-uv}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
member="$root/services/$service"

if [[ ! "$service" =~ ^[a-z][a-z0-9_]*$ || ! -f "$member/pyproject.toml" ]]; then
    known="$(cd "$root/services" && for d in */; do [[ -f "$d/pyproject.toml" ]] && printf '%s ' "${d%/}"; done)"
    echo "install.sh: no service named '$service' (no services/$service/pyproject.toml); known: ${known% }" >&2
    exit 2
fi

if [[ ! -x "$venv/bin/python" ]]; then
    "$uv" venv --quiet --python "${PYTHON:-python3}" "$venv"
fi
python="$venv/bin/python"

constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
"$python" - "$root/pyproject.toml" >"$constraints" <<'EOF'
import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    pins = tomllib.load(f)["tool"]["uv"]["constraint-dependencies"]
print("\n".join(pins))
EOF

# Non-editable installs of the two libraries and the one member; --no-sources so the workspace's
# `{ workspace = true }` sources never pull in the other members; bytecode compiled now because the
# image's root filesystem is read-only at run time.
"$uv" pip install --quiet --python "$python" --no-sources --compile-bytecode \
    --constraints "$constraints" \
    "$root/libs/contracts" "$root/libs/runtime" "$member"

# The module the entry point runs must import: a member whose package is misnamed fails here, in the build.
if ! "$python" -c "import importlib, sys; importlib.import_module(sys.argv[1])" "flowmesh.$service.__main__"; then
    echo "install.sh: flowmesh.$service.__main__ does not import from $venv" >&2
    exit 3
fi
