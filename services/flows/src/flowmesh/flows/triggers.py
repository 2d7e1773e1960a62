"""Trigger rules: config checks, webhook tokens and signing secrets (the public API's trigger configs). Pure."""

from __future__ import annotations

import base64
import hashlib
import secrets
from datetime import UTC, datetime
from typing import Any, Final

from pydantic import BaseModel, ValidationError

from flowmesh.contracts.errors import InvalidInput
from flowmesh.contracts.expressions import EVENT_NAMES, TOO_COSTLY, check_expression, expression_source
from flowmesh.contracts.models import FieldError
from flowmesh.contracts.models.flows import EventConfig, ScheduleConfig, TriggerType, WebhookConfig
from flowmesh.contracts.strict import json_pointer
from flowmesh.contracts.subjects import is_safe_subject_part
from flowmesh.contracts.timezones import zone_problem

CONFIG_MODELS: Final[dict[str, type[BaseModel]]] = {
    "webhook": WebhookConfig,
    "schedule": ScheduleConfig,
    "event": EventConfig,
}
WEBHOOK_PATH: Final = "/api/v1/hooks/"
TOKEN_BYTES: Final = 24  # 192 bits: a webhook URL is its only credential, so at least 128 bits must be unguessable
SECRET_BYTES: Final = 32
FIRE_WITHIN_YEARS: Final = 9
"""A cron must match a time within this many years: February 29th is 8 years apart across 2100."""
CRON_SAMPLES: Final = 400
"""Firings looked at for a cron's shortest interval (:func:`shortest_gap_s`)."""
CRON_FROM: Final = datetime(2025, 1, 1)
"""Where :func:`shortest_gap_s` starts looking: a fixed time, so an answer never depends on the day."""


def new_webhook_token() -> str:
    """A URL-safe random token for a webhook URL."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def hash_token(token: str) -> str:
    """What is stored of a webhook token: a SHA-256 (the token itself is random, so no salt is needed)."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_signing_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` and the base64 of random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def cron_fields(expression: str) -> tuple[int, bool]:
    """How many fields a cron expression has and whether the first is seconds (6 fields)."""
    n = len(expression.split())
    return n, n == 6


def valid_cron(expression: str, seconds_first: bool) -> bool:
    """Whether a 5- or 6-field cron expression is valid syntax."""
    # croniter (and dateutil) load with the first schedule trigger checked, not in every idle process
    from croniter import croniter

    return bool(croniter.is_valid(expression, second_at_beginning=seconds_first))


def fires(expression: str, seconds_first: bool) -> bool:
    """Whether a valid cron expression matches some time in the next :data:`FIRE_WITHIN_YEARS` years.

    ``0 0 31 2 *`` (February 31st) is valid syntax but never fires. croniter looks day by day and
    gives up past the years it is given, so the answer is quick whatever the expression.
    """
    from croniter import croniter
    from croniter.croniter import CroniterBadDateError

    start = datetime.now(UTC).replace(tzinfo=None)
    try:
        croniter(
            expression, start, max_years_between_matches=FIRE_WITHIN_YEARS, second_at_beginning=seconds_first
        ).get_next(datetime)
    except CroniterBadDateError:
        return False
    return True


def shortest_gap_s(expression: str, seconds_first: bool, *, within_s: float) -> float | None:
    """The shortest time between two firings of a valid cron that fires, when under ``within_s``; else None.

    A cron's times are every combination of its days, hours, minutes and seconds: the same minutes and seconds in every
    hour it fires: the firings right after the first one show the shortest gap under an hour, and
    :data:`CRON_SAMPLES` firings cover gaps between hours and days. Stops at the first gap under
    ``within_s``, so a refusal is quick.
    """
    from croniter import croniter
    from croniter.croniter import CroniterBadDateError

    it = croniter(expression, CRON_FROM, max_years_between_matches=FIRE_WITHIN_YEARS, second_at_beginning=seconds_first)
    try:
        last = it.get_next(float)
        for _ in range(CRON_SAMPLES):
            at = it.get_next(float)
            if at - last < within_s:
                return at - last
            last = at
    except CroniterBadDateError:  # fires a few times, then no more within the years looked at
        return None
    return None


def cron_interval_problem(config: dict[str, Any], plan: str, min_interval_s: int | None) -> FieldError | None:
    """Why a checked schedule config fires more often than the plan allows, or None (422 at ``/config/cron``)."""
    if min_interval_s is None or min_interval_s <= 1:
        return None  # a cron fires at most once a second
    cron = config["cron"]
    gap = shortest_gap_s(cron, cron_fields(cron)[1], within_s=min_interval_s)
    if gap is None:
        return None
    return FieldError(
        path="/config/cron",
        message=f"cron {cron!r} fires {gap:g} s apart; the {plan} plan's shortest cron interval is {min_interval_s} s",
    )


def check_config(trigger_type: TriggerType, config: dict[str, Any]) -> dict[str, Any]:
    """The trigger's config, checked and with defaults filled in.

    Raises:
        InvalidInput: every problem, each located under ``/config``.
    """
    model = CONFIG_MODELS[trigger_type]
    try:
        parsed = model.model_validate(config, strict=True)  # no "yes" for true: JSON types as written
    except ValidationError as exc:
        raise InvalidInput(
            f"invalid {trigger_type} trigger config",
            errors=[FieldError(path=json_pointer(("config", *e["loc"])), message=e["msg"]) for e in exc.errors()],
        ) from None
    errors: list[FieldError] = []
    if isinstance(parsed, ScheduleConfig):
        n, seconds_first = cron_fields(parsed.cron)
        if n not in (5, 6):
            errors.append(
                FieldError(
                    path="/config/cron",
                    message=f"cron {parsed.cron!r} has {n} fields; write 5, or 6 with seconds first",
                )
            )
        elif not valid_cron(parsed.cron, seconds_first):
            errors.append(FieldError(path="/config/cron", message=f"cron {parsed.cron!r} is not a valid expression"))
        elif not fires(parsed.cron, seconds_first):
            errors.append(
                FieldError(
                    path="/config/cron",
                    message=f"cron {parsed.cron!r} never fires (no time matches in the next {FIRE_WITHIN_YEARS} years)",
                )
            )
        problem = zone_problem(parsed.timezone)
        if problem is not None:
            errors.append(FieldError(path="/config/timezone", message=problem))
    elif isinstance(parsed, EventConfig):
        if not is_safe_subject_part(parsed.event_type):
            errors.append(
                FieldError(
                    path="/config/eventType",
                    message=f"eventType {parsed.event_type!r} must be "
                    "tokens of letters, digits, '_' or '-', joined by dots",
                )
            )
        if parsed.filter is not None:
            problem = check_expression(expression_source(parsed.filter), EVENT_NAMES)
            if problem is not None:
                errors.append(
                    FieldError(
                        path="/config/filter",
                        message=f"filter is {problem}"
                        if problem.startswith(TOO_COSTLY)
                        else f"filter does not compile: {problem}",
                    )
                )
    if errors:
        raise InvalidInput(f"invalid {trigger_type} trigger config", errors=errors)
    return parsed.model_dump(mode="json", by_alias=True, exclude_none=True)
