"""Request rate limits per tenant, by plan: a token bucket per tenant in each gateway replica.

Buckets live in the replica's memory, so with N replicas behind a load balancer a tenant gets up to
N times its plan's rate. Sharing them (a KV round trip per request) would cost more than the limit
is worth; ``fm_quota`` snapshots from the usage service are where exact, shared limits live.

The API and the webhooks have a bucket each (``requestsPerSecond``, ``webhooksPerSecond``): anyone
who knows a webhook's URL can send to it, and must not be able to lock its tenant out of its own
API. Lookups of webhook tokens that turn out unknown have no tenant: they are limited per client
address (:class:`AddressLimiter`). Open WebSockets are counted per token subject and per tenant
(:class:`SocketCounts`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, TypeVar

from flowmesh.contracts.errors import RateLimited
from flowmesh.contracts.models.usage import Plan
from flowmesh.contracts.plans import PLANS
from flowmesh.runtime.cache import TtlCache

log = logging.getLogger(__name__)

K = TypeVar("K")

Clock = Callable[[], float]
PlanLookup = Callable[[str], Awaitable[str | Plan]]
"""A tenant's plan: its limits as the usage service's plans table has them, or its name (read in ``PLANS``)."""
RateOf = Callable[[Plan], int | None]
"""Which of a plan's rates a limiter applies (None: unlimited)."""

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

    def wait(self, now: float) -> float:
        """Seconds until a token is there (0.0: there is one), taking none."""
        self._refill(now)
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate

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
            answer = await self._lookup(tenant)
            plan = answer if isinstance(answer, Plan) else PLANS[answer]
        except Exception:
            log.warning("the plan of tenant %r is unknown; using %s", tenant, fallback.name, exc_info=True)
            return fallback
        self._known.pop(tenant, None)
        self._known[tenant] = plan
        if len(self._known) > MAX_TENANTS:
            del self._known[next(iter(self._known))]  # the tenant answered longest ago
        return plan


def _requests(plan: Plan) -> int | None:
    return plan.requests_per_second


def webhooks_rate(plan: Plan) -> int | None:
    """The webhook bucket's rate of a plan."""
    return plan.webhooks_per_second


class RateLimiter:
    """Admits a tenant's request if its plan's bucket has a token (``high_frequency``: always)."""

    def __init__(
        self,
        plans: PlanSource,
        *,
        clock: Clock = time.monotonic,
        burst_s: float = BURST_S,
        rate_of: RateOf = _requests,
        what: str = "requests",
    ) -> None:
        self.plans = plans
        self._rate_of = rate_of
        self._what = what
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
        rate = self._rate_of(plan)
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
                f"over the {plan.name} plan's {rate} {self._what} per second; retry in {seconds} s",
                retry_after_s=seconds,
            )

    def _prune(self, now: float) -> None:
        """Forget full buckets: memory stays bounded by the tenants active in the last minute."""
        self._pruned = now
        self._buckets = {t: b for t, b in self._buckets.items() if not b.is_full(now)}


class AddressLimiter:
    """A token bucket per client address, for what has no tenant (lookups of unknown webhook tokens).

    ``check`` refuses while the address's bucket is empty; ``spend`` takes a token after the fact
    (a lookup that found nothing), so an address sending to known webhooks never spends any.
    """

    def __init__(self, rate: float, *, clock: Clock = time.monotonic, burst_s: float = BURST_S) -> None:
        self.rate = rate
        self._clock = clock
        self._burst_s = burst_s
        self._buckets: dict[str, TokenBucket] = {}
        self._pruned = clock()

    def check(self, address: str) -> None:
        """Raise when ``address`` has no token left (nothing is taken).

        Raises:
            RateLimited: the address looked up too many unknown tokens; ``retry_after_s`` says when to retry.
        """
        bucket = self._buckets.get(address)
        if self.rate <= 0 or bucket is None:
            return
        wait = bucket.wait(self._clock())
        if wait > 0:
            seconds = retry_after(wait)
            raise RateLimited(
                f"too many lookups of unknown webhook URLs from this address ({self.rate:g} per second); "
                f"retry in {seconds} s",
                retry_after_s=seconds,
            )

    def spend(self, address: str) -> None:
        """Take a token from ``address`` (a lookup found nothing); an empty bucket stays empty."""
        if self.rate <= 0:
            return
        now = self._clock()
        bucket = self._buckets.get(address)
        if bucket is None:
            bucket = self._buckets[address] = TokenBucket.full(self.rate, now, burst_s=self._burst_s)
        bucket.take(now)
        if now - self._pruned >= PRUNE_EVERY_S or len(self._buckets) > MAX_TENANTS:
            self._pruned = now
            self._buckets = {a: b for a, b in self._buckets.items() if not b.is_full(now)}


class SocketCounts:
    """Open WebSockets of this replica per token subject and per tenant, held within a plan's caps."""

    def __init__(self) -> None:
        self._by_subject: dict[tuple[str, str], int] = {}
        self._by_tenant: dict[str, int] = {}

    def open(self, tenant: str, subject: str, plan: Plan) -> None:
        """Count a socket about to open; :meth:`close` it when it ends.

        Raises:
            RateLimited: the token subject or the tenant already has the plan's WebSockets open here.
        """
        key = (tenant, subject)
        held, cap = self._by_subject.get(key, 0), plan.websockets_per_token
        if cap is not None and held >= cap:
            raise RateLimited(
                f"this token already has {held} WebSockets open, the {plan.name} plan's cap per token; close one first",
                retry_after_s=1,
            )
        held, cap = self._by_tenant.get(tenant, 0), plan.websockets_per_tenant
        if cap is not None and held >= cap:
            raise RateLimited(
                f"this tenant already has {held} WebSockets open, the {plan.name} plan's cap per tenant; "
                "close one first",
                retry_after_s=1,
            )
        self._by_subject[key] = self._by_subject.get(key, 0) + 1
        self._by_tenant[tenant] = self._by_tenant.get(tenant, 0) + 1

    def close(self, tenant: str, subject: str) -> None:
        """A socket counted by :meth:`open` ended."""
        _down(self._by_subject, (tenant, subject))
        _down(self._by_tenant, tenant)


def _down(counts: dict[K, int], key: K) -> None:
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)
