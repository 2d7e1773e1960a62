"""Usage, plans, stats and API keys: the usage service's side of the wire (metering reads, plan limits, BYOK)."""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Any, Final, Literal

from pydantic import BeforeValidator, Field

from flowmesh.contracts.models.base import Timestamp, WireModel
from flowmesh.contracts.subjects import tenant_token

PlanName = Literal["free", "pro", "enterprise", "high_frequency"]


class PlanCaps(WireModel):
    """What one run, flow, connection or sender may use at most, by plan (P9); ``None``: no cap of the plan.

    Every service enforces its own: the runner the children and outputs of a run, the flows service
    the triggers of a flow, the gateway WebSockets and webhooks. A snapshot written before these
    existed reads as no caps (what it said then).
    """

    foreach_items: int | None = Field(default=None, description="items one foreach step may iterate over")
    children_per_run: int | None = Field(default=None, description="child runs (subflow, foreach) one run may start")
    triggers_per_flow: int | None = Field(default=None, description="triggers of any type one flow may have")
    cron_min_interval_s: int | None = Field(
        default=None, description="the shortest time between two firings of a schedule trigger, in seconds"
    )
    websockets_per_token: int | None = Field(
        default=None, description="live WebSockets open at once per token subject, per gateway replica"
    )
    websockets_per_tenant: int | None = Field(
        default=None, description="live WebSockets open at once per tenant, per gateway replica"
    )
    webhooks_per_second: int | None = Field(
        default=None, description="webhook deliveries per second per tenant (a bucket apart from the API's)"
    )
    step_output_bytes: int | None = Field(
        default=None, description="largest output (JSON) a step may record; the runner's setting is the ceiling"
    )
    run_output_bytes: int | None = Field(
        default=None, description="largest output (JSON) a run may end with; the runner's setting is the ceiling"
    )

    def caps(self) -> PlanCaps:
        """These caps alone (of a :class:`Plan`: without its name and other limits)."""
        return PlanCaps(**{name: getattr(self, name) for name in PlanCaps.model_fields})


class Plan(PlanCaps):
    """A billing plan's limits; ``None`` means unlimited."""

    name: str
    flows: int | None
    runs_per_month: int | None
    runs_in_flight: int | None
    requests_per_second: int | None
    overage_per_1000_runs_usd: float | None = None


class PlanAssignment(WireModel):
    """Body of ``PUT /admin/tenants/{id}/plan``."""

    plan: PlanName


class TenantPlan(WireModel):
    """A tenant's plan."""

    tenant_id: str
    plan: str


class AssignedPlan(TenantPlan):
    """``fm.rpc.usage.plan``: a tenant's plan, and whether it was given one (else: the default plan).

    Every service reads the same ``FLOWMESH_DEFAULT_PLAN``; a caller applies its own to a tenant
    without an assignment.
    """

    assigned: bool
    limits: Plan | None = Field(
        default=None, description="the plan's row of the plans table (absent from an older usage service)"
    )


class UsageSummary(WireModel):
    """``GET /usage``."""

    period_start: Timestamp
    period_end: Timestamp
    plan: str
    runs_used: int
    runs_limit: int | None
    steps_used: int
    tokens_used: int
    runs_percentage: float | None
    estimated_overage: float
    days_remaining: int
    input_tokens: int = 0
    output_tokens: int = 0


class FlowStats(WireModel):
    """``GET /flows/{id}/stats``."""

    executions_total: int
    succeeded: int
    failed: int
    avg_duration_ms: float | None
    p95_duration_ms: float | None
    last_executed_at: Timestamp | None
    cancelled: int = 0
    timed_out: int = 0


class ApiKeyCreate(WireModel):
    """Body of ``POST /api-keys``."""

    provider: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    api_key: Annotated[str, Field(min_length=1, max_length=4096)]


class ApiKeyInfo(WireModel):
    """A stored key, never shown whole."""

    provider: str
    key_hint: str
    created_at: Timestamp
    last_used_at: Timestamp | None = None


class RevealKey(WireModel):
    """``fm.rpc.usage.keys.reveal`` request (runner only): which provider's key of the caller's tenant."""

    provider: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


class RevealedKey(WireModel):
    """``fm.rpc.usage.keys.reveal`` reply: the plaintext key. Never logged, never sent anywhere else."""

    provider: str
    api_key: str


# --- metering, quotas and keys (P6) ---------------------------------------------------------------

KEYS_REVEAL_ROLE: Final = "service:runner"
"""The ``Flowmesh-Role`` the runner sends on ``fm.rpc.usage.keys.reveal``; any other caller is refused.

No JWT carries it through the gateway (no HTTP route reaches ``reveal``); in production, NATS
permissions allow only the runner's user to publish on that subject."""

_PERIOD = r"^(current|previous|[0-9]{4}-(0[1-9]|1[0-2]))$"


def quota_key(tenant_id: str) -> str:
    """The key of a tenant's :class:`TenantQuota` snapshot in the ``fm_quota`` KV bucket."""
    return tenant_token(tenant_id)


def _iso_date(value: Any) -> Any:
    """Only ``YYYY-MM-DD`` reads as a date (not a Unix time, not a datetime)."""
    if isinstance(value, dt.date) or (isinstance(value, str) and re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", value)):
        return value
    raise ValueError("must be a date as YYYY-MM-DD")


IsoDate = Annotated[dt.date, BeforeValidator(_iso_date)]
"""A calendar date written ``YYYY-MM-DD``."""


class UsageQuery(WireModel):
    """Query of ``GET /usage``: ``current`` (default), ``previous`` or a month ``YYYY-MM`` (UTC)."""

    period: Annotated[str, Field(pattern=_PERIOD, description="current, previous, or a month as YYYY-MM")] = "current"


class UsageExportQuery(WireModel):
    """Query of ``GET /usage/export``: days ``from`` to ``to`` (inclusive, UTC; default this month so far)."""

    from_: IsoDate | None = Field(default=None, alias="from", description="first day (YYYY-MM-DD, UTC)")
    to: IsoDate | None = Field(default=None, description="last day, inclusive (YYYY-MM-DD, UTC)")
    format: Literal["json", "csv"] = "json"


class UsageDay(WireModel):
    """One tenant's metered usage on one day (UTC): what a billing system imports."""

    date: dt.date
    tenant_id: str
    runs: int = Field(description="top-level runs started (accepted); children and in-place retries excluded")
    child_runs: int = Field(description="runs started by subflow and foreach steps")
    runs_succeeded: int
    runs_failed: int
    runs_cancelled: int
    runs_timed_out: int
    runs_refused: int = Field(description="starts refused for quota (recorded as failed, not counted in runs)")
    steps: int = Field(description="steps that finished (succeeded or failed), the trigger excluded")
    step_ms: int = Field(description="sum of those steps' durationMs")
    input_tokens: int
    output_tokens: int


class UsageExport(WireModel):
    """``GET /usage/export?format=json``: the days with usage, oldest first."""

    tenant_id: str
    from_: dt.date = Field(alias="from")
    to: dt.date
    items: list[UsageDay]


class UsageExportCsv(WireModel):
    """The usage service's answer to an export with ``format=csv``: the document as text."""

    csv: str


class TenantQuota(WireModel):
    """A tenant's plan limits and this month's metered runs.

    The answer of ``fm.rpc.usage.quota`` and the value kept in the ``fm_quota`` KV bucket under
    :func:`quota_key`. A snapshot whose ``period`` is not the current month (UTC) is from before the
    month began: its ``runsUsed`` is 0 now.
    """

    tenant_id: str
    plan: str
    plan_revision: int = Field(description="grows with every plan change of the tenant (0: the default plan)")
    period: str = Field(description="the billing month, YYYY-MM (UTC)")
    period_start: Timestamp
    period_end: Timestamp
    runs_used: int
    runs_limit: int | None
    runs_in_flight_limit: int | None
    flows_limit: int | None
    overage_allowed: bool = Field(description="runs over runsLimit are billed (true) or refused (false)")
    runs_exhausted: bool = Field(description="a new run must be refused: runsUsed >= runsLimit and no overage")
    updated_at: Timestamp
    caps: PlanCaps = Field(default_factory=PlanCaps, description="the plan's caps per run, flow and connection")


class PlanRef(WireModel):
    """Body of ``fm.rpc.usage.adminPlan``: set a tenant's plan (admin only)."""

    # PostgreSQL text holds no NUL: refused here (422), not by the database (500)
    tenant_id: Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[^\x00]+$")]
    plan: str


class FlowStatsRequest(WireModel):
    """Body of ``fm.rpc.usage.flowStats``."""

    flow_id: str


class ApiKeyList(WireModel):
    """``GET /api-keys``: the tenant's stored keys, never shown whole."""

    items: list[ApiKeyInfo]


class ApiKeyRef(WireModel):
    """Body of ``fm.rpc.usage.keys.delete``."""

    provider: str


# --- tenant secrets (P9) --------------------------------------------------------------------------

SECRET_NAME: Final = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
"""A secret's name: what ``{{ secrets.NAME }}`` reads, so a CEL identifier of at most 64 characters."""
MAX_SECRET_BYTES: Final = 8192
"""The largest secret value, in UTF-8 bytes (tokens, keys and certificates fit; documents do not)."""
SecretName = Annotated[str, Field(min_length=1, max_length=64, pattern=SECRET_NAME)]


class SecretCreate(WireModel):
    """Body of ``POST /secrets``: a name and its value (non-empty, no NUL, at most 8192 UTF-8 bytes)."""

    name: SecretName
    value: Annotated[str, Field(min_length=1, max_length=MAX_SECRET_BYTES)]


class SecretInfo(WireModel):
    """A stored secret, never shown whole."""

    name: str
    hint: str
    created_at: Timestamp
    updated_at: Timestamp


class SecretList(WireModel):
    """``GET /secrets``: the tenant's stored secrets, never shown whole."""

    items: list[SecretInfo]


class SecretRef(WireModel):
    """Body of ``fm.rpc.usage.secrets.delete``."""

    name: str


class RevealSecrets(WireModel):
    """``fm.rpc.usage.secrets.reveal`` request (runner only): which secrets of the caller's tenant."""

    names: Annotated[list[SecretName], Field(min_length=1, max_length=100)]


class RevealedSecrets(WireModel):
    """``fm.rpc.usage.secrets.reveal`` reply: the values found, and the names that are not stored.

    Never logged, never sent anywhere else."""

    values: dict[str, str]
    missing: list[str] = Field(default_factory=list)
