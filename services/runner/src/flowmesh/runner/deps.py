"""What the runner's handlers work with, built once per process."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from flowmesh.runner.shell import Runner


@dataclass(frozen=True, slots=True)
class RunnerDeps:
    """The runner's collaborators, given to every handler."""

    sessions: async_sessionmaker[AsyncSession]
    runner: Runner
