"""Trigger configs: schedules, events, webhooks; tokens and secrets."""

from __future__ import annotations

import base64

import pytest

from flowmesh.contracts.errors import InvalidInput
from flowmesh.flows import triggers


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"cron": "*/5 * * * *"}, {"cron": "*/5 * * * *", "timezone": "UTC", "misfire": "skip"}),
        (
            {"cron": "30 0 9 * * MON-FRI", "timezone": "Europe/Paris", "misfire": "fireAll"},
            {"cron": "30 0 9 * * MON-FRI", "timezone": "Europe/Paris", "misfire": "fireAll"},
        ),
    ],
)
def test_valid_schedules_get_defaults(config: dict[str, str], expected: dict[str, str]) -> None:
    assert triggers.check_config("schedule", config) == expected


@pytest.mark.parametrize(
    ("config", "path"),
    [
        ({"cron": "* * * *"}, "/config/cron"),
        ({"cron": "* * * * * * *"}, "/config/cron"),
        ({"cron": "61 * * * *"}, "/config/cron"),
        ({"cron": "0 0 25 * * *"}, "/config/cron"),
        ({"cron": "* * * * *", "timezone": "Mars/Olympus"}, "/config/timezone"),
        ({"cron": "* * * * *", "misfire": "sometimes"}, "/config/misfire"),
        ({"timezone": "UTC"}, "/config/cron"),
        ({"cron": "* * * * *", "extra": 1}, "/config/extra"),
        ({"cron": "* * * * *", "timezone": "A" * 300}, "/config/timezone"),
        ({"cron": "* * * * *", "timezone": "Europe"}, "/config/timezone"),
        ({"cron": "* * * * *", "timezone": "Europe/" + "x" * 260}, "/config/timezone"),
        ({"cron": "* * * * *", "timezone": "zone.tab"}, "/config/timezone"),
        ({"cron": "0 0 31 2 *"}, "/config/cron"),
        ({"cron": "0 0 0 30 2 *"}, "/config/cron"),
        ({"cron": "0 0 31 4,6,9,11 *"}, "/config/cron"),
        ({"cron": "* * * * *", "misfire": 1}, "/config/misfire"),
    ],
)
def test_invalid_schedules_name_the_field(config: dict[str, str], path: str) -> None:
    with pytest.raises(InvalidInput) as err:
        triggers.check_config("schedule", config)
    assert path in [e.path for e in err.value.errors or []]


def test_event_triggers_need_a_safe_type_and_a_compiling_filter() -> None:
    assert triggers.check_config("event", {"eventType": "order.paid", "filter": "event.total > 10"}) == {
        "eventType": "order.paid",
        "filter": "event.total > 10",
    }
    for config, path in (
        ({"eventType": "order.*"}, "/config/eventType"),
        ({"eventType": "ok", "filter": "event.total >"}, "/config/filter"),
        ({"eventType": "ok", "filter": "input.x"}, "/config/filter"),
    ):
        with pytest.raises(InvalidInput) as err:
            triggers.check_config("event", config)
        assert [e.path for e in err.value.errors or []] == [path]


def test_webhook_config_is_only_signed() -> None:
    assert triggers.check_config("webhook", {}) == {"signed": False}
    with pytest.raises(InvalidInput):
        triggers.check_config("webhook", {"signed": "perhaps"})


def test_tokens_are_long_random_and_stored_hashed() -> None:
    a, b = triggers.new_webhook_token(), triggers.new_webhook_token()
    assert a != b and len(a) >= 32
    assert triggers.hash_token(a) != a and len(triggers.hash_token(a)) == 64


def test_signing_secrets_follow_standard_webhooks() -> None:
    secret = triggers.new_signing_secret()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) >= 24


@pytest.mark.parametrize("cron", ["0 0 29 2 *", "0 0 29 2 1", "0 0 31 * *", "0 0 0 1 1 *"])
def test_rare_crons_still_fire(cron: str) -> None:
    assert triggers.check_config("schedule", {"cron": cron})["cron"] == cron


@pytest.mark.parametrize("signed", ["yes", "true", 1, 0, None, "on"])
def test_webhook_signed_is_a_strict_boolean(signed: object) -> None:
    with pytest.raises(InvalidInput) as caught:
        triggers.check_config("webhook", {"signed": signed})
    assert [e.path for e in caught.value.errors or []] == ["/config/signed"]


@pytest.mark.parametrize(
    ("cron", "within", "gap"),
    [
        ("*/5 * * * *", 300, None),  # every 300 s: not under 300
        ("*/4 * * * *", 300, 240),
        ("0,1 * * * *", 300, 60),
        ("0 0,1 * * *", 7200, 3600),  # between hours
        ("* * * * * *", 2, 1),
        ("*/10 * * * * *", 10, None),
        ("* 3 * * 1", 300, 60),  # every minute of one hour on Mondays
        ("0 0 29 2 *", 86_400, None),  # once a leap year
        ("0 12 * * *", 86_400, None),
    ],
)
def test_the_shortest_gap_of_a_cron_is_found_when_under_the_plans_interval(
    cron: str, within: int, gap: int | None
) -> None:
    seconds_first = triggers.cron_fields(cron)[1]
    assert triggers.shortest_gap_s(cron, seconds_first, within_s=within) == gap


def test_a_cron_interval_problem_names_the_plan_and_its_interval() -> None:
    problem = triggers.cron_interval_problem({"cron": "*/2 * * * *"}, "free", 300)
    assert problem is not None and problem.path == "/config/cron"
    assert problem.message == "cron '*/2 * * * *' fires 120 s apart; the free plan's shortest cron interval is 300 s"
    assert triggers.cron_interval_problem({"cron": "* * * * * *"}, "high_frequency", 1) is None
    assert triggers.cron_interval_problem({"cron": "* * * * * *"}, "x", None) is None
