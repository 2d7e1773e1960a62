"""Identifiers and timestamps as they travel on the wire: UUIDv7 strings, RFC 3339 UTC with milliseconds.

UUIDv7 ids are time-ordered, so indexes on them stay append-mostly; one time format on every wire
lets any client compare and sort times as strings.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import uuid_utils


def new_id() -> str:
    """A new UUIDv7 (time-ordered) as a string."""
    return str(uuid_utils.uuid7())


def is_uuid(value: str) -> bool:
    """Whether ``value`` is a UUID in its canonical or any accepted textual form."""
    try:
        uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        return False
    return True


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def format_time(value: datetime) -> str:
    """RFC 3339 UTC with milliseconds, e.g. ``2026-01-02T03:04:05.678Z``."""
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
