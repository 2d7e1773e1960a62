"""IANA time zone names: which ones a schedule may name, and opening them without touching odd files.

``ZoneInfo(name)`` reads a file under the zone database: a name over the file system's 255
characters raises ``OSError`` (file name too long), a directory of the database (``Europe``)
raises ``IsADirectoryError``, and other files of it (``zone.tab``) a ``ValueError``. A name is
therefore looked up in the list of the zones the database has before any file is opened.
"""

from __future__ import annotations

from functools import cache
from typing import Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

MAX_ZONE_NAME: Final = 64
"""Longer than any IANA zone name (the longest, ``America/Argentina/ComodRivadavia``, has 32)."""


@cache
def known_zones() -> frozenset[str]:
    """Every zone name the zone database here holds (``UTC`` included); read once."""
    return frozenset(available_timezones()) | {"UTC"}


def zone_problem(name: str) -> str | None:
    """Why ``name`` is not a time zone a schedule may use (None: it is one)."""
    if len(name) > MAX_ZONE_NAME or name not in known_zones():
        shown = name if len(name) <= MAX_ZONE_NAME else name[:MAX_ZONE_NAME] + "…"
        return f"timezone {shown!r} is not an IANA time zone name (such as 'Europe/Paris' or 'UTC')"
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return f"timezone {name!r} cannot be read from the time zone database"
    return None


def open_zone(name: str) -> ZoneInfo:
    """The zone called ``name``.

    Raises:
        ValueError: not a zone name of the database (:func:`zone_problem` says why).
    """
    problem = zone_problem(name)
    if problem is not None:
        raise ValueError(problem)
    return ZoneInfo(name)
