"""The billing plans (free, pro, enterprise, high_frequency) and their limits, as data.

These are the plans a fresh installation starts with. The usage service owns plans (its
``plans`` table, editable without code) and seeds it from here; until it answers, the gateway reads
the limits it enforces (requests per second) from here too.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final, get_args

from flowmesh.contracts.models.usage import Plan, PlanName

FREE: Final = Plan(
    name="free",
    flows=1,
    runs_per_month=1_000,
    runs_in_flight=10,
    requests_per_second=20,
    overage_per_1000_runs_usd=None,  # over the monthly runs: refused (403 quota-exceeded)
)
PRO: Final = Plan(
    name="pro",
    flows=100,
    runs_per_month=100_000,
    runs_in_flight=100,
    requests_per_second=200,
    overage_per_1000_runs_usd=0.50,  # over the monthly runs: allowed, billed
)
ENTERPRISE: Final = Plan(
    name="enterprise",
    flows=1_000,
    runs_per_month=None,
    runs_in_flight=1_000,
    requests_per_second=2_000,
)
HIGH_FREQUENCY: Final = Plan(
    name="high_frequency",
    flows=1_000,
    runs_per_month=None,
    runs_in_flight=10_000,
    requests_per_second=None,
)

PLANS: Final[Mapping[str, Plan]] = MappingProxyType({p.name: p for p in (FREE, PRO, ENTERPRISE, HIGH_FREQUENCY)})
"""Every plan by name; ``None`` limits are unlimited."""

PLAN_NAMES: Final[tuple[str, ...]] = get_args(PlanName)
"""The plan names a tenant may be given."""

DEFAULT_PLAN: Final = FREE.name
"""The plan of a new tenant unless ``FLOWMESH_DEFAULT_PLAN`` says otherwise."""
