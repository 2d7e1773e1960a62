"""Request rate limits per tenant, by plan: a token bucket per tenant in each gateway replica.

Buckets live in the replica's memory, so with N replicas behind a load balancer a tenant gets up to
N times its plan's rate. Sharing them (a KV round trip per request) would cost more than the limit
is worth; ``fm_quota`` snapshots from the usage service are where exact, shared limits live.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from flowmesh.contracts.errors import RateLimited
from flowmesh.contracts.models.usage import Plan
from flowmesh.contracts.plans import PLANS
from flowmesh.runtime.cache import TtlCache

log = logging.getLogger(__name__)

Clock = Callable[[], float]
PlanLookup = Callable[[str], Awaitable[str]]
"""The name of a tenant's plan (the usage service's answer, once it exists)."""

BURST_S: Final = 1.0
"""A bucket holds this many seconds of its rate: a client may send one second's worth at once."""
PRUNE_EVERY_S: Final = 60.0
MAX_TENANTS: Final = 10_000
"""Plans remembered at most (memory stays bounded however many tenants send requests)."""


@dataclass(slots=True)
class TokenBucket:
    """Tokens refill at ``rate`` per second up to ``burst``; each request takes one."""

    rate: float
    burst: float
    tokens: float
    updated: float

    @classmethod
    def full(cls, rate: float, now: float, *, burst_s: float = BURST_S) -> TokenBucket:
        """A bucket at capacity (a tenant not seen for a while owes nothing)."""
        burst = max(1.0, rate * burst_s)
        return cls(rate=rate, burst=burst, tokens=burst, updated=now)

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    def take(self, now: float) -> float:
        """Take a token: 0.0 when there was one, else the seconds until there is (nothing is taken)."""
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate

    def is_full(self, now: float) -> bool:
        """Whether the bucket has refilled completely (forgetting it changes nothing)."""
        return self.tokens + max(0.0, now - self.updated) * self.rate >= self.burst


def retry_after(wait_s: float) -> int:
    """``Retry-After`` in whole seconds, at least 1 (RFC 9110 allows no fractions)."""
    return max(1, math.ceil(wait_s))


class PlanSource:
    """A tenant's plan, remembered for ``ttl_s``, asked once at a time per tenant.

    Until the usage service answers plans (P6), every tenant is on ``default``; give ``lookup`` to
    ask it instead. A failing lookup never fails the request: the last known plan, or the default,
    is used (logged) and remembered like an answer, so a usage service that is down is not asked
    again on every request.
    """

    def __init__(
        self, default: str, lookup: PlanLookup | None = None, *, ttl_s: float = 60.0, clock: Clock = time.monotonic
    ) -> None:
        self._default = PLANS[default]
        self._lookup = lookup or self._answer_default
        self._plans: TtlCache[str, Plan] = TtlCache(ttl_s, maxsize=MAX_TENANTS, clock=clock)
        self._known: dict[str, Plan] = {}
        """The last plan each tenant was answered, kept past its time to live for when the lookup fails."""

    async def plan_of(self, tenant: str) -> Plan:
        """The tenant's plan."""
        return await self._plans.get(tenant, lambda: self._ask(tenant))

    async def _answer_default(self, _: str) -> str:
        return self._default.name

    async def _ask(self, tenant: str) -> Plan:
        fallback = self._known.get(tenant, self._default)
        try:
            plan = PLANS[await self._lookup(tenant)]
        except Exception:
            log.warning("the plan of tenant %r is unknown; using %s", tenant, fallback.name, exc_info=True)
            return fallback
        self._known.pop(tenant, None)
        self._known[tenant] = plan
        if len(self._known) > MAX_TENANTS:
            del self._known[next(iter(self._known))]  # the tenant answered longest ago
        return plan


class RateLimiter:
    """Admits a tenant's request if its plan's bucket has a token (``high_frequency``: always)."""

    def __init__(self, plans: PlanSource, *, clock: Clock = time.monotonic, burst_s: float = BURST_S) -> None:
        self.plans = plans
        self._clock = clock
        self._burst_s = burst_s
        self._buckets: dict[str, TokenBucket] = {}
        self._pruned = clock()

    async def admit(self, tenant: str) -> None:
        """Count one request of ``tenant`` (HTTP API and webhooks alike).

        Raises:
            RateLimited: over the plan's requests per second; ``retry_after_s`` says when to retry.
        """
        plan = await self.plans.plan_of(tenant)
        rate = plan.requests_per_second
        if rate is None:
            return
        now = self._clock()
        bucket = self._buckets.get(tenant)
        if bucket is None or bucket.rate != rate:  # new tenant, or a new plan: start full
            bucket = self._buckets[tenant] = TokenBucket.full(rate, now, burst_s=self._burst_s)
        wait = bucket.take(now)
        if now - self._pruned >= PRUNE_EVERY_S:
            self._prune(now)
        if wait > 0:
            seconds = retry_after(wait)
            raise RateLimited(
                f"over the {plan.name} plan's {rate} requests per second; retry in {seconds} s", retry_after_s=seconds
            )

    def _prune(self, now: float) -> None:
        """Forget full buckets: memory stays bounded by the tenants active in the last minute."""
        self._pruned = now
        self._buckets = {t: b for t, b in self._buckets.items() if not b.is_full(now)}
