"""The event loop every service process runs on: uvloop's, unless configured otherwise.

Profiles of the gateway, the flows service and the runner under load put a fifth to a third of their
busy time in asyncio's selector transports (a Python layer around every socket read and write, on a
path that makes two or three of them per request or step). uvloop does the same work in libuv's C;
the services' libraries (aiohttp, asyncpg, nats-py, FastStream) run on it unchanged.
``FLOWMESH_EVENT_LOOP=asyncio`` falls back to the standard loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

log = logging.getLogger(__name__)

EventLoopKind = Literal["uvloop", "asyncio"]
T = TypeVar("T")


def loop_factory(kind: EventLoopKind) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """What makes the event loop of ``kind``; None for asyncio's default (or where uvloop is missing)."""
    if kind == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:  # a platform uvloop does not build for (Windows): the standard loop
        log.warning("uvloop is not installed: running on asyncio's event loop")
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], *, kind: EventLoopKind = "uvloop") -> T:
    """``asyncio.run(main)`` on the event loop of ``kind``."""
    with asyncio.Runner(loop_factory=loop_factory(kind)) as runner:
        return runner.run(main)
