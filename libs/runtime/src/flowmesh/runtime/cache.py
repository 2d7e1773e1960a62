"""A time-to-live cache whose misses are loaded once however many callers ask at the same moment.

Services remember answers of other services and of the database for a short while (a tenant's
quota, the plans table, a runnable flow). Without single flight, a burst of requests for one cold
key sends the same question as many times as there are requests; here the first asks and the
others wait for its answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    """Values by key, each kept for a time to live, loaded with single flight on a miss.

    Args:
        ttl_s: How long a value is kept.
        ttl_of: The time to live of one value instead (e.g. shorter for a "don't know" answer);
            0 or less keeps nothing.
        maxsize: How many values at most; the oldest stored is forgotten first. None: no bound.
        clock: Monotonic seconds (a test may give its own).
    """

    def __init__(
        self,
        ttl_s: float,
        *,
        ttl_of: Callable[[V], float] | None = None,
        maxsize: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl_s = ttl_s
        self._ttl_of = ttl_of
        self._maxsize = maxsize
        self._clock = clock
        self._entries: dict[K, tuple[float, V]] = {}
        self._loading: dict[K, asyncio.Future[V]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: K) -> tuple[bool, V | None]:
        """``(True, value)`` when a fresh value is kept for ``key``, else ``(False, None)``."""
        entry = self._entries.get(key)
        if entry is None:
            return False, None
        if self._clock() >= entry[0]:
            del self._entries[key]
            return False, None
        return True, entry[1]

    def put(self, key: K, value: V) -> None:
        """Keep ``value`` for ``key`` for its time to live."""
        ttl = self._ttl_of(value) if self._ttl_of is not None else self._ttl_s
        self._entries.pop(key, None)
        if ttl <= 0:
            return
        self._entries[key] = (self._clock() + ttl, value)
        if self._maxsize is not None and len(self._entries) > self._maxsize:
            del self._entries[next(iter(self._entries))]

    def discard(self, key: K) -> None:
        """Forget ``key`` (a newer fact arrived by another way)."""
        self._entries.pop(key, None)

    def clear(self) -> None:
        """Forget every value (loads in flight still complete and are kept)."""
        self._entries.clear()

    async def get(self, key: K, load: Callable[[], Awaitable[V]]) -> V:
        """The value of ``key``: kept, or loaded by ``load()`` (one load per key at a time).

        A failed load is not kept; its error is raised to every caller waiting for it. A caller
        cancelled while waiting does not cancel the load the others wait for.
        """
        found, value = self.lookup(key)
        if found:
            return value  # type: ignore[return-value]
        pending = self._loading.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._load(key, load))
            self._loading[key] = pending
            pending.add_done_callback(lambda done: self._loaded(key, done))
        return await asyncio.shield(pending)

    async def _load(self, key: K, load: Callable[[], Awaitable[V]]) -> V:
        value = await load()
        self.put(key, value)
        return value

    def _loaded(self, key: K, done: asyncio.Future[V]) -> None:
        if self._loading.get(key) is done:
            del self._loading[key]
        if not done.cancelled():
            done.exception()  # retrieved here, so a failure nobody waited for is not reported as lost
