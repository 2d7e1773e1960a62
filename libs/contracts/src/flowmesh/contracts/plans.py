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

KIB: Final = 1024
MIB: Final = 1024 * KIB

FREE: Final = Plan(
    name="free",
    flows=1,
    runs_per_month=1_000,
    runs_in_flight=10,
    requests_per_second=20,
    overage_per_1000_runs_usd=None,  # over the monthly runs: refused (403 quota-exceeded)
    foreach_items=100,
    children_per_run=100,
    triggers_per_flow=5,
    cron_min_interval_s=300,
    websockets_per_token=5,
    websockets_per_tenant=10,
    webhooks_per_second=10,
    step_output_bytes=256 * KIB,
    run_output_bytes=256 * KIB,
)
PRO: Final = Plan(
    name="pro",
    flows=100,
    runs_per_month=100_000,
    runs_in_flight=100,
    requests_per_second=200,
    overage_per_1000_runs_usd=0.50,  # over the monthly runs: allowed, billed
    foreach_items=1_000,
    children_per_run=1_000,
    triggers_per_flow=20,
    cron_min_interval_s=60,
    websockets_per_token=20,
    websockets_per_tenant=100,
    webhooks_per_second=100,
    step_output_bytes=MIB,
    run_output_bytes=MIB,
)
ENTERPRISE: Final = Plan(
    name="enterprise",
    flows=1_000,
    runs_per_month=None,
    runs_in_flight=1_000,
    requests_per_second=2_000,
    foreach_items=10_000,
    children_per_run=10_000,
    triggers_per_flow=100,
    cron_min_interval_s=1,
    websockets_per_token=100,
    websockets_per_tenant=1_000,
    webhooks_per_second=1_000,
    step_output_bytes=MIB,
    run_output_bytes=MIB,
)
HIGH_FREQUENCY: Final = Plan(
    name="high_frequency",
    flows=1_000,
    runs_per_month=None,
    runs_in_flight=10_000,
    requests_per_second=None,
    foreach_items=10_000,
    children_per_run=10_000,
    triggers_per_flow=100,
    cron_min_interval_s=1,
    websockets_per_token=1_000,
    websockets_per_tenant=10_000,
    webhooks_per_second=None,  # like its requests: unlimited (unknown tokens are still limited per address)
    step_output_bytes=MIB,
    run_output_bytes=MIB,
)

PLANS: Final[Mapping[str, Plan]] = MappingProxyType({p.name: p for p in (FREE, PRO, ENTERPRISE, HIGH_FREQUENCY)})
"""Every plan by name; ``None`` limits are unlimited.

The caps (:class:`~flowmesh.contracts.models.usage.PlanCaps`) are never ``None`` where nothing else
bounds what they guard: a foreach's items, a run's children, a flow's triggers, WebSockets. The
output caps are also bounded by the runner's settings (an operator's ceiling, 1 MiB by default)."""

PLAN_NAMES: Final[tuple[str, ...]] = get_args(PlanName)
"""The plan names a tenant may be given."""

DEFAULT_PLAN: Final = FREE.name
"""The plan of a new tenant unless ``FLOWMESH_DEFAULT_PLAN`` says otherwise."""
