"""What the scheduler's handlers work with, built once per process."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from flowmesh.scheduler.dispatcher import Dispatcher
from flowmesh.scheduler.sync import Sync


@dataclass(frozen=True, slots=True)
class SchedulerDeps:
    """The scheduler's collaborators, given to every handler."""

    sessions: async_sessionmaker[AsyncSession]
    sync: Sync
    dispatcher: Dispatcher
