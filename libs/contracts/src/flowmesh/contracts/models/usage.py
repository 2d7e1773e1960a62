"""Usage, plans, stats and API keys (DESIGN §6, §8)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from flowmesh.contracts.models.base import Timestamp, WireModel

PlanName = Literal["free", "pro", "enterprise", "high_frequency"]


class Plan(WireModel):
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


class FlowStats(WireModel):
    """``GET /flows/{id}/stats``."""

    executions_total: int
    succeeded: int
    failed: int
    avg_duration_ms: float | None
    p95_duration_ms: float | None
    last_executed_at: Timestamp | None


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
