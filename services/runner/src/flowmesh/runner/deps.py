"""What the runner's handlers work with, built once per process."""

from __future__ import annotations

from dataclasses import dataclass

from flowmesh.runner.shell import Runner
from flowmesh.runtime.db import Database


@dataclass(frozen=True, slots=True)
class RunnerDeps:
    """The runner's collaborators, given to every handler."""

    db: Database
    runner: Runner
