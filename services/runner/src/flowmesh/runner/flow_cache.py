"""What the runner keeps about flows: whether one may start (asked of the flows service, cached
until it announces a change), and each frozen version it runs (parsed once: versions never change).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from flowmesh.contracts.errors import InvalidInput, NotFound
from flowmesh.contracts.models import FieldError, FlowVersion
from flowmesh.contracts.models.flows import FlowSettings
from flowmesh.contracts.models.rpc import RunnableFlow
from flowmesh.contracts.strict import json_pointer
from flowmesh.contracts.subjects import FlowsOp
from flowmesh.runner import repo
from flowmesh.runner.graph import Graph

if TYPE_CHECKING:
    from jsonschema.protocols import Validator
from flowmesh.runtime.cache import TtlCache
from flowmesh.runtime.rpc import RpcClient

RUNNABLE_TTL_S: Final = 5.0
RUNNABLE_CACHE_SIZE: Final = 10_000

RunnableKey = tuple[str, str, int | None]
"""Tenant, flow id, version (None: the active one)."""


class RunnableFlows:
    """What the flows service says about starting a flow, cached until it announces a change.

    Entries are dropped by ``fm.flows.{t}.*`` announcements (the flows service publishes them
    before it answers the change), and expire after a few seconds in case one was missed. One
    question per flow at a time: when an entry expires, the starts in flight share the answer.
    """

    def __init__(self, flows: RpcClient) -> None:
        self.flows = flows
        # an answer is kept only if no announcement raced the question (its "forgets" is current)
        self._cache: TtlCache[RunnableKey, tuple[int, RunnableFlow]] = TtlCache(
            RUNNABLE_TTL_S, ttl_of=self._ttl_of, maxsize=RUNNABLE_CACHE_SIZE
        )
        self._forgets = 0
        self._asked: dict[tuple[str, str], set[int | None]] = {}
        """The versions asked of each flow (what an announcement must forget)."""

    async def get(self, tenant: str, flow_id: str, version: int | None) -> RunnableFlow:
        """The flow's runnable version (raises the flows service's error: not found, not published)."""
        key = (tenant, flow_id, version)
        asked = self._asked.setdefault((tenant, flow_id), set())
        if version not in asked:
            if len(self._asked) > RUNNABLE_CACHE_SIZE:  # forget everything rather than grow for ever
                self._asked.clear()
                self._cache.clear()
                asked = self._asked[(tenant, flow_id)] = set()
            asked.add(version)
        _, found = await self._cache.get(key, lambda: self._lookup(key))
        return found

    async def _lookup(self, key: RunnableKey) -> tuple[int, RunnableFlow]:
        tenant, flow_id, version = key
        forgets = self._forgets
        found = RunnableFlow.model_validate(
            await self.flows.call(FlowsOp.RUNNABLE, {"flowId": flow_id, "version": version}, tenant=tenant)
        )
        return forgets, found

    def _ttl_of(self, answer: tuple[int, RunnableFlow]) -> float:
        return RUNNABLE_TTL_S if answer[0] == self._forgets else 0.0

    def forget(self, tenant: str, flow_id: str) -> None:
        """A flow changed (published, rolled back, (de)activated, deleted): ask the flows service again."""
        self._forgets += 1
        for version in self._asked.pop((tenant, flow_id), ()):
            self._cache.discard((tenant, flow_id, version))


class Versions:
    """The frozen versions the runner runs: parsed graphs, input validators, copies saved."""

    def __init__(self, default_run_timeout_ms: int | None) -> None:
        self.default_run_timeout_ms = default_run_timeout_ms
        self._graphs: dict[tuple[str, int], Graph] = {}
        self._validators: dict[tuple[str, int], Validator | None] = {}
        self._saved: set[tuple[str, int]] = set()

    async def graph(self, conn: Any, flow_id: str, version: int) -> Graph:
        """The graph of a version the runner has a copy of (read on a driver connection when not cached)."""
        key = (flow_id, version)
        graph = self._graphs.get(key)
        if graph is None:
            found = await repo.version_on(conn, flow_id=flow_id, version=version)
            if found is None:
                raise NotFound(f"version {version} of flow {flow_id} is unknown to the runner")
            graph = self._graphs[key] = self._parse(*found)
        return graph

    def graph_of(self, version: FlowVersion) -> Graph:
        """The graph of a version as the flows service gave it."""
        key = (version.flow_id, version.version)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = self._parse(version.definition, version.settings)
        return graph

    def _parse(self, definition: Any, settings: Any) -> Graph:
        run_timeout_ms = FlowSettings.model_validate(settings or {}).run_timeout_ms
        return Graph(definition, run_timeout_ms=run_timeout_ms, default_run_timeout_ms=self.default_run_timeout_ms)

    def check_input(self, version: FlowVersion, value: Any) -> None:
        """Raise :class:`InvalidInput` (every error) when ``value`` does not match the version's inputSchema."""
        key = (version.flow_id, version.version)
        if key not in self._validators:
            # imported when a flow first asks: most never declare an input schema, and a runner
            # that never validates one does not carry jsonschema and its referencing library
            from jsonschema.validators import validator_for

            schema = version.input_schema
            self._validators[key] = validator_for(schema)(schema) if schema else None
        validator = self._validators[key]
        if validator is None:
            return
        errors = [
            FieldError(path=json_pointer(("input", *e.absolute_path)), message=e.message)
            for e in validator.iter_errors(value)
        ]
        if errors:
            raise InvalidInput("the input does not match the flow's inputSchema", errors=errors)

    async def save(self, conn: Any, version: FlowVersion, tenant: str) -> None:
        """Keep the runner's copy of a version (once per process): a run never points at a missing one."""
        key = (version.flow_id, version.version)
        if key in self._saved:
            return
        await repo.insert_version(
            conn,
            flow_id=version.flow_id,
            version=version.version,
            tenant=tenant,
            definition=version.definition,
            input_schema=version.input_schema,
            settings=version.settings,
        )
        self._saved.add(key)
