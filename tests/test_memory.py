"""Idle memory: a service process does not import the libraries it needs only on demand.

Each is megabytes a process keeps for its whole life (``bench/rss.py`` measures the whole): the
OpenTelemetry SDK and exporter unless tracing is configured, Alembic and SQLAlchemy (never: a schema
that is behind is migrated by a child process), the CEL package's command-line interface (never),
jsonschema until a flow declares an input schema, croniter until a schedule trigger is checked; and
the gateway, which has no database, no asyncpg.
Checked in a fresh interpreter, as ``python -m flowmesh.<name>`` imports its modules.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from test_import_rules import SERVICES

ON_DEMAND = (
    "opentelemetry.sdk",
    "opentelemetry.exporter",
    "google.protobuf",
    "alembic",
    "sqlalchemy",
    "mako",
    "cel.cli",
    "typer",
    "rich",
    "prompt_toolkit",
    "jsonschema",
    "croniter",
)
NEEDED = {"scheduler": ("croniter",)}
"""What one service uses all the time (the scheduler computes cron times on every sweep)."""
UNUSED = {"gateway": ("asyncpg",)}
"""What one service never uses: the gateway has no database."""


@pytest.mark.parametrize("service", SERVICES)
def test_a_service_at_rest_imports_none_of_what_it_needs_only_on_demand(service: str) -> None:
    on_demand = tuple(name for name in ON_DEMAND if name not in NEEDED.get(service, ())) + UNUSED.get(service, ())
    code = (
        "import json, sys\n"
        f"import flowmesh.{service}.app, flowmesh.{service}.settings, flowmesh.runtime.service\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.startswith({on_demand!r}))))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(out.stdout) == []


def test_the_cel_engine_loaded_alone_is_the_one_the_cel_package_then_uses() -> None:
    code = (
        "from flowmesh.contracts.expressions import compile_expression\n"
        "assert compile_expression('x + 1').execute({'x': 1}) == 2\n"
        "import cel\n"  # a tool importing the package afterwards finds the engine already loaded
        "assert cel.compile('2 * 3').execute() == 6\n"
    )
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
