"""What the usage service's handlers work with, built once per process."""

from __future__ import annotations

from dataclasses import dataclass

from flowmesh.runtime.db import Database
from flowmesh.usage.keys import KeyStore
from flowmesh.usage.meter import Meter
from flowmesh.usage.quota import PlanBook, QuotaSnapshots
from flowmesh.usage.secrets import SecretStore


@dataclass(frozen=True, slots=True)
class UsageDeps:
    """The usage service's collaborators, given to every handler."""

    db: Database
    plans: PlanBook
    snapshots: QuotaSnapshots
    keys: KeyStore
    meter: Meter
    secrets: SecretStore
