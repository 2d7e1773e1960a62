"""What the flows service's handlers work with, built once per process."""

from __future__ import annotations

from dataclasses import dataclass

from flowmesh.runtime.db import Database
from flowmesh.runtime.outbox import OutboxRelay
from flowmesh.runtime.quota import QuotaView


@dataclass(frozen=True, slots=True)
class FlowsDeps:
    """The flows service's collaborators, given to every handler.

    Without ``quotas`` no plan limit is enforced; with it, a new flow (create, duplicate,
    import) is refused at the plan's flow limit.
    """

    db: Database
    relay: OutboxRelay
    quotas: QuotaView | None = None
