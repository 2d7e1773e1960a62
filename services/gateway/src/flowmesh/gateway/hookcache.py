"""Webhook tokens to their triggers, remembered a few seconds, dropped early when their flow changes.

A delivery must not cost a question to the flows service each time, yet a disabled trigger or a
deactivated flow must stop accepting deliveries at once: every gateway replica hears the flows
service's announcements and drops the tokens of the flow that changed; the time to live is only a
backstop for an announcement missed.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from flowmesh.gateway.webhooks import Hook
from flowmesh.runtime.cache import TtlCache

MAX_ENTRIES: Final = 10_000


@dataclass(frozen=True, slots=True)
class _Found:
    hook: Hook
    generation: int
    """The cache's generation when the lookup started."""


class HookCache:
    """Token → :class:`Hook`, one question to the flows service per token at a time.

    ``generation`` counts announcements: a lookup answered before a change but finished after its
    announcement may be stale, so a lookup started before any announcement since is not kept
    (its callers still get its answer, as they would have without a cache).
    """

    def __init__(
        self, *, ttl_s: float, max_entries: int = MAX_ENTRIES, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.generation = 0
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._found: TtlCache[str, _Found] = TtlCache(ttl_s, ttl_of=self._ttl_of, maxsize=max_entries, clock=clock)
        self._flow_of: dict[str, str] = {}
        """Token → flow id of what was looked up, so that a flow's tokens can be dropped."""

    def __len__(self) -> int:
        return len(self._found)

    async def get(self, token: str, ask: Callable[[], Awaitable[Hook]]) -> Hook:
        """The hook of ``token``; ``ask()`` asks the flows service on a miss (its errors are not kept)."""
        generation = self.generation

        async def load() -> _Found:
            hook = await ask()
            self._remember(token, hook.flow_id)
            return _Found(hook, generation)

        return (await self._found.get(token, load)).hook

    def forget_flow(self, flow_id: str) -> None:
        """A flow or one of its triggers changed: its hooks are looked up again."""
        self.generation += 1
        for token in [t for t, flow in self._flow_of.items() if flow == flow_id]:
            del self._flow_of[token]
            self._found.discard(token)

    def _ttl_of(self, found: _Found) -> float:
        return self._ttl_s if found.generation == self.generation else 0.0

    def _remember(self, token: str, flow_id: str) -> None:
        if len(self._flow_of) >= self._max_entries:
            # tokens expired or evicted from the cache meanwhile need no dropping any more
            self._flow_of = {t: f for t, f in self._flow_of.items() if self._found.lookup(t)[0]}
        self._flow_of[token] = flow_id
