"""Background work tied to a service's life: entered when it starts, stopped when it stops.

Each helper is an async context manager, so a service lists what it runs once
(:meth:`~flowmesh.runtime.service.ServiceRuntime.resource`, ``every``, ``background``) and the
runtime enters them in order at start and leaves them in reverse at stop, even when starting
failed half-way: nothing is started without being stopped, and no task is kept in a list cell.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)

Job = Callable[[], Awaitable[object]]


@contextlib.asynccontextmanager
async def task_running(
    coro_fn: Callable[[], Coroutine[Any, Any, None]], *, name: str
) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``coro_fn()`` as a task for the duration of the block; cancelled (and awaited) at its end."""
    task = asyncio.create_task(coro_fn(), name=name)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def periodic(seconds: float, fn: Job, *, name: str) -> contextlib.AbstractAsyncContextManager[asyncio.Task[None]]:
    """Call ``fn`` now and then every ``seconds`` while the block runs.

    A failing call is logged and tried again at the next tick: a periodic chore (pruning, a
    refresh) must not stop for good because the database was briefly away.
    """

    async def repeat() -> None:
        while True:
            try:
                await fn()
            except Exception as exc:
                log.warning("%s failed (tried again in %.0fs): %s", name, seconds, exc)
            await asyncio.sleep(seconds)

    return task_running(repeat, name=name)


def once(fn: Job, *, name: str) -> contextlib.AbstractAsyncContextManager[asyncio.Task[None]]:
    """Call ``fn`` once in the background after start; cancelled if the service stops first.

    A failure is logged, not raised: work done in the background is never what stops a service.
    """

    async def run() -> None:
        try:
            await fn()
        except Exception as exc:
            log.warning("%s failed: %s", name, exc)

    return task_running(run, name=name)


@contextlib.asynccontextmanager
async def hooks(start: Job | None = None, stop: Job | None = None) -> AsyncIterator[None]:
    """A pair of start/stop callables as a resource (``stop`` runs only if ``start`` returned)."""
    if start is not None:
        await start()
    try:
        yield
    finally:
        if stop is not None:
            await stop()
