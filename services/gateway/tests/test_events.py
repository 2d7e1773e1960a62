"""The pure parts of ``POST /api/v1/events/{eventType}``: the event's id and the type's check."""

from __future__ import annotations

import uuid

import pytest

from flowmesh.contracts.errors import InvalidInput
from flowmesh.gateway.routes.events import checked_event_type, event_id


def test_without_a_key_every_event_gets_a_new_time_ordered_id() -> None:
    first, second = event_id("acme", None, "fp"), event_id("acme", None, "fp")
    assert first != second
    assert uuid.UUID(first).version == 7


def test_with_a_key_the_same_request_always_gets_the_same_id() -> None:
    assert event_id("acme", "k1", "fp") == event_id("acme", "k1", "fp")
    assert uuid.UUID(event_id("acme", "k1", "fp")).version == 5


@pytest.mark.parametrize(("tenant", "key", "fp"), [("globex", "k1", "fp"), ("acme", "k2", "fp"), ("acme", "k1", "fp2")])
def test_another_tenant_key_or_request_gets_another_id(tenant: str, key: str, fp: str) -> None:
    assert event_id(tenant, key, fp) != event_id("acme", "k1", "fp")


@pytest.mark.parametrize("value", ["order", "order.paid", "a-b_c.D9", "x" * 64, ".".join(["abc"] * 60)])
def test_safe_event_types_pass(value: str) -> None:
    assert checked_event_type(value) == value


@pytest.mark.parametrize("value", ["", "a.*", ">", "a..b", ".a", "a.", "a b", "x" * 65, "été", "a\x00"])
def test_unsafe_event_types_are_a_422_on_the_path_parameter(value: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        checked_event_type(value)
    assert exc.value.status == 422
    assert [e.path for e in exc.value.errors or []] == ["/eventType"]
