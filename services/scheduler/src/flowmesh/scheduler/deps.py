"""What the scheduler's handlers work with, built once per process."""

from __future__ import annotations

from dataclasses import dataclass

from flowmesh.runtime.db import Database
from flowmesh.scheduler.dispatcher import Dispatcher
from flowmesh.scheduler.sync import Sync


@dataclass(frozen=True, slots=True)
class SchedulerDeps:
    """The scheduler's collaborators, given to every handler."""

    db: Database
    sync: Sync
    dispatcher: Dispatcher
