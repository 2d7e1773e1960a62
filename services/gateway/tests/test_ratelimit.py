"""Rate limits: the token bucket, the per-tenant limiter by plan, and the plan source (no I/O, a fake clock)."""

from __future__ import annotations

import asyncio

import pytest

from flowmesh.contracts.errors import RateLimited
from flowmesh.contracts.models.usage import Plan, PlanName
from flowmesh.contracts.plans import DEFAULT_PLAN, PLAN_NAMES, PLANS
from flowmesh.gateway.ratelimit import (
    AddressLimiter,
    PlanSource,
    RateLimiter,
    SocketCounts,
    TokenBucket,
    retry_after,
    webhooks_rate,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_full_bucket_admits_its_burst_then_says_how_long_to_wait() -> None:
    bucket = TokenBucket.full(20, now=0.0)
    assert [bucket.take(0.0) for _ in range(20)] == [0.0] * 20
    assert bucket.take(0.0) == pytest.approx(1 / 20)
    assert bucket.take(0.0) == pytest.approx(1 / 20)  # a refused request takes nothing


def test_a_bucket_refills_at_its_rate_and_never_over_its_burst() -> None:
    bucket = TokenBucket.full(10, now=0.0)
    for _ in range(10):
        bucket.take(0.0)
    assert bucket.take(0.25) == 0.0  # 2.5 tokens back, one taken
    assert bucket.take(0.25) == 0.0
    assert bucket.take(0.25) == pytest.approx(0.05)  # 0.5 left: half a token short
    assert not bucket.is_full(0.25)
    assert bucket.is_full(10.0)
    assert [bucket.take(100.0) for _ in range(11)].count(0.0) == 10


def test_a_slow_plan_still_allows_one_request() -> None:
    bucket = TokenBucket.full(0.5, now=0.0)
    assert bucket.burst == 1.0
    assert bucket.take(0.0) == 0.0
    assert bucket.take(0.0) == pytest.approx(2.0)


def test_the_clock_going_backwards_takes_no_tokens_away() -> None:
    bucket = TokenBucket.full(5, now=10.0)
    bucket.take(10.0)
    assert bucket.take(9.0) == 0.0
    assert bucket.tokens == pytest.approx(3.0)


@pytest.mark.parametrize(("wait", "header"), [(0.001, 1), (0.05, 1), (1.0, 1), (1.01, 2), (7.5, 8)])
def test_retry_after_is_whole_seconds_and_at_least_one(wait: float, header: int) -> None:
    assert retry_after(wait) == header


def test_the_plans_table_of_the_design() -> None:
    assert set(PLANS) == set(PLAN_NAMES) == {"free", "pro", "enterprise", "high_frequency"}
    assert DEFAULT_PLAN == "free"
    rates = {name: plan.requests_per_second for name, plan in PLANS.items()}
    assert rates == {"free": 20, "pro": 200, "enterprise": 2000, "high_frequency": None}
    assert PLANS["free"].flows == 1 and PLANS["free"].runs_per_month == 1000 and PLANS["free"].runs_in_flight == 10
    assert PLANS["pro"].overage_per_1000_runs_usd == 0.5
    assert PLANS["free"].overage_per_1000_runs_usd is None  # refused over the monthly runs
    assert PLANS["high_frequency"].runs_in_flight == 10_000


async def test_a_free_tenant_gets_20_requests_at_once_then_429_with_retry_after() -> None:
    clock = Clock()
    limiter = RateLimiter(PlanSource("free", clock=clock), clock=clock)
    for _ in range(20):
        await limiter.admit("acme")
    with pytest.raises(RateLimited) as refused:
        await limiter.admit("acme")
    assert refused.value.status == 429 and refused.value.retry_after_s == 1
    await limiter.admit("globex")  # buckets are per tenant
    clock.now += 0.06  # one token back
    await limiter.admit("acme")
    with pytest.raises(RateLimited):
        await limiter.admit("acme")


async def test_high_frequency_is_unlimited() -> None:
    clock = Clock()
    limiter = RateLimiter(PlanSource("high_frequency", clock=clock), clock=clock)
    for _ in range(10_000):
        await limiter.admit("acme")


async def test_idle_tenants_are_forgotten() -> None:
    clock = Clock()
    limiter = RateLimiter(PlanSource("pro", clock=clock), clock=clock)
    for tenant in ("a", "b", "c"):
        await limiter.admit(tenant)
    clock.now += 120
    await limiter.admit("d")
    assert set(limiter._buckets) == {"d"}


async def test_the_plan_source_asks_once_per_ttl_and_survives_a_failing_lookup() -> None:
    clock = Clock()
    answers: list[PlanName | Exception] = ["pro", RuntimeError("usage is down"), "enterprise"]
    asked: list[str] = []

    async def lookup(tenant: str) -> str:
        asked.append(tenant)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    source = PlanSource("free", lookup, ttl_s=60, clock=clock)
    assert (await source.plan_of("acme")).name == "pro"
    assert (await source.plan_of("acme")).name == "pro"
    assert asked == ["acme"]
    clock.now += 61
    assert (await source.plan_of("acme")).name == "pro"  # the lookup failed: the last known plan
    clock.now += 61
    assert (await source.plan_of("acme")).name == "enterprise"
    assert len(asked) == 3


async def test_an_unknown_plan_name_falls_back_to_the_default() -> None:
    async def lookup(_: str) -> str:
        return "platinum"

    assert (await PlanSource("free", lookup).plan_of("acme")).name == "free"


async def test_a_tenant_whose_plan_changes_gets_the_new_rate() -> None:
    clock = Clock()
    plans: dict[str, str] = {"acme": "free"}

    async def lookup(tenant: str) -> str:
        return plans[tenant]

    limiter = RateLimiter(PlanSource("free", lookup, ttl_s=0, clock=clock), clock=clock)
    for _ in range(20):
        await limiter.admit("acme")
    with pytest.raises(RateLimited):
        await limiter.admit("acme")
    plans["acme"] = "pro"
    for _ in range(200):
        await limiter.admit("acme")


async def test_concurrent_requests_of_a_tenant_ask_its_plan_once() -> None:
    asked: list[str] = []
    release = asyncio.Event()

    async def lookup(tenant: str) -> str:
        asked.append(tenant)
        await release.wait()
        return "pro"

    source = PlanSource("free", lookup, ttl_s=60)
    waiting = [asyncio.create_task(source.plan_of("acme")) for _ in range(5)]
    await asyncio.sleep(0)
    release.set()
    assert {p.name for p in await asyncio.gather(*waiting)} == {"pro"}
    assert asked == ["acme"]


# --- P9: webhooks' own bucket, unknown webhook lookups per address, WebSockets ---------------------


async def test_webhooks_have_a_bucket_apart_from_the_api() -> None:
    clock = Clock()
    plans = PlanSource("free", clock=clock)
    api, hooks = RateLimiter(plans, clock=clock), RateLimiter(plans, clock=clock, rate_of=webhooks_rate, what="hooks")
    for _ in range(10):
        await hooks.admit("acme")
    with pytest.raises(RateLimited) as refused:
        await hooks.admit("acme")
    assert "free plan's 10 hooks per second" in refused.value.detail
    for _ in range(20):  # the API's bucket is whole
        await api.admit("acme")


async def test_a_plan_answered_with_its_figures_is_used_as_answered() -> None:
    async def lookup(_: str) -> Plan:
        return PLANS["free"].model_copy(update={"webhooks_per_second": 2})

    clock = Clock()
    hooks = RateLimiter(PlanSource("pro", lookup, clock=clock), clock=clock, rate_of=webhooks_rate)
    await hooks.admit("acme")
    await hooks.admit("acme")
    with pytest.raises(RateLimited):
        await hooks.admit("acme")


def test_unknown_lookups_spend_an_addresss_tokens_and_known_ones_none() -> None:
    clock = Clock()
    unknown = AddressLimiter(3, clock=clock)
    for _ in range(3):
        unknown.check("10.0.0.1")  # only misses spend
    for _ in range(3):
        unknown.spend("10.0.0.1")
    with pytest.raises(RateLimited) as refused:
        unknown.check("10.0.0.1")
    assert refused.value.retry_after_s == 1 and "unknown webhook URLs" in refused.value.detail
    unknown.check("10.0.0.2")  # per address
    clock.now += 0.34
    unknown.check("10.0.0.1")
    AddressLimiter(0, clock=clock).spend("x")  # 0: no limit
    none = AddressLimiter(0, clock=clock)
    for _ in range(100):
        none.spend("x")
    none.check("x")


def test_socket_counts_hold_the_plans_caps_per_subject_and_per_tenant() -> None:
    plan = PLANS["free"].model_copy(update={"websockets_per_token": 2, "websockets_per_tenant": 3})
    counts = SocketCounts()
    counts.open("acme", "alice", plan)
    counts.open("acme", "alice", plan)
    with pytest.raises(RateLimited) as refused:
        counts.open("acme", "alice", plan)
    assert "cap per token" in refused.value.detail
    counts.open("acme", "bob", plan)
    with pytest.raises(RateLimited) as refused:
        counts.open("acme", "carol", plan)
    assert "cap per tenant" in refused.value.detail
    counts.open("globex", "alice", plan)  # another tenant's count
    counts.close("acme", "alice")
    counts.open("acme", "carol", plan)
    unlimited = PLANS["free"].model_copy(update={"websockets_per_token": None, "websockets_per_tenant": None})
    for _ in range(50):
        counts.open("initech", "x", unlimited)
