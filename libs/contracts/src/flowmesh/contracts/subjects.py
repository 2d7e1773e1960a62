"""Every NATS subject Flowmesh uses, as constants and small builders.

No other module writes a subject literal: services import these names, and the NATS permissions
(:mod:`flowmesh.contracts.permissions`) are derived from them, so a subject cannot drift between
the code that uses it and the user allowed to. The map: ``docs/architecture.md#subjects``.
"""

from __future__ import annotations

import hashlib
import re
from typing import Final

PREFIX: Final = "fm"
"""Root of every Flowmesh subject."""

SAFE_TOKEN_PATTERN: Final = r"[A-Za-z0-9_-]{1,64}"
"""What one subject token may be (a regular expression, matched whole): a tenant id enters a subject as one."""
SAFE_SUBJECT_PART_PATTERN: Final = rf"{SAFE_TOKEN_PATTERN}(\.{SAFE_TOKEN_PATTERN})*"
"""What a user-given subject part (``eventType``, ``publish`` name) may be: safe tokens joined by dots."""
MAX_SUBJECT_PART: Final = 255
"""The longest user-given subject part, in characters."""

_SAFE_TOKEN = re.compile(SAFE_TOKEN_PATTERN)
_SAFE_DOTTED = re.compile(SAFE_SUBJECT_PART_PATTERN)
_HASHED_PREFIX: Final = "_h"


def is_safe_token(value: str) -> bool:
    """Whether ``value`` can stand as one subject token (``[A-Za-z0-9_-]{1,64}``)."""
    return _SAFE_TOKEN.fullmatch(value) is not None


def is_safe_subject_part(value: str) -> bool:
    """Whether a user-given subject part (``eventType``, ``publish`` name) is safe: tokens joined by dots."""
    return _SAFE_DOTTED.fullmatch(value) is not None and len(value) <= MAX_SUBJECT_PART


def tenant_token(tenant_id: str) -> str:
    """The subject token of a tenant: the id itself when safe, else a stable hash of it.

    Ids that already start with the hash marker are hashed too, so no tenant can pick an id equal
    to another tenant's hashed token and share its subjects.
    """
    if is_safe_token(tenant_id) and not tenant_id.startswith(_HASHED_PREFIX):
        return tenant_id
    return _HASHED_PREFIX + hashlib.sha256(tenant_id.encode()).hexdigest()[:32]


# --- request/reply (core NATS, queue group = service name) -------------------------------------

RPC_FLOWS: Final = f"{PREFIX}.rpc.flows"
"""Prefix of the flows service's request/reply subjects."""
RPC_RUNS: Final = f"{PREFIX}.rpc.runs"
"""Prefix of the runner's request/reply subjects."""
RPC_USAGE: Final = f"{PREFIX}.rpc.usage"
"""Prefix of the usage service's request/reply subjects."""
RPC_SCHEDULER: Final = f"{PREFIX}.rpc.scheduler"
"""Prefix of the scheduler's request/reply subjects."""

RPC_PREFIXES: Final = {
    "flows": RPC_FLOWS,
    "runner": RPC_RUNS,
    "usage": RPC_USAGE,
    "scheduler": RPC_SCHEDULER,
}
"""Request/reply prefix of each NATS-only service, keyed by service (= queue group) name."""


def rpc(prefix: str, op: str) -> str:
    """The request/reply subject of one operation, e.g. ``rpc(RPC_FLOWS, "create")``."""
    return f"{prefix}.{op}"


def ping(service: str) -> str:
    """The readiness ping subject every NATS-only service answers."""
    return rpc(RPC_PREFIXES[service], "ping")


class FlowsOp:
    """Operations of ``fm.rpc.flows.<op>``."""

    CREATE: Final = rpc(RPC_FLOWS, "create")
    LIST: Final = rpc(RPC_FLOWS, "list")
    GET: Final = rpc(RPC_FLOWS, "get")
    UPDATE: Final = rpc(RPC_FLOWS, "update")
    REPLACE: Final = rpc(RPC_FLOWS, "replace")
    DELETE: Final = rpc(RPC_FLOWS, "delete")
    VALIDATE: Final = rpc(RPC_FLOWS, "validate")
    PUBLISH: Final = rpc(RPC_FLOWS, "publish")
    VERSIONS: Final = rpc(RPC_FLOWS, "versions")
    VERSION: Final = rpc(RPC_FLOWS, "version")
    ROLLBACK: Final = rpc(RPC_FLOWS, "rollback")
    ACTIVATE: Final = rpc(RPC_FLOWS, "activate")
    DEACTIVATE: Final = rpc(RPC_FLOWS, "deactivate")
    DUPLICATE: Final = rpc(RPC_FLOWS, "duplicate")
    EXPORT: Final = rpc(RPC_FLOWS, "export")
    IMPORT: Final = rpc(RPC_FLOWS, "import")
    CATALOG: Final = rpc(RPC_FLOWS, "catalog")
    TRIGGERS: Final = rpc(RPC_FLOWS, "triggers")
    TRIGGER_CREATE: Final = rpc(RPC_FLOWS, "triggerCreate")
    TRIGGER_UPDATE: Final = rpc(RPC_FLOWS, "triggerUpdate")
    TRIGGER_DELETE: Final = rpc(RPC_FLOWS, "triggerDelete")
    RUNNABLE: Final = rpc(RPC_FLOWS, "runnable")
    """For the runner: a flow's active (or a given) frozen version, and whether it may start."""
    WEBHOOK: Final = rpc(RPC_FLOWS, "webhook")
    """For the gateway: the trigger a webhook token belongs to (no tenant: the token decides)."""
    SCHEDULES: Final = rpc(RPC_FLOWS, "schedules")
    """For the scheduler (no tenant): schedule triggers and their flows' state as they are now."""
    AUDIT: Final = rpc(RPC_FLOWS, "audit")
    """``GET /audit``: the flows service's audit entries (``AuditRead`` → ``AuditEntries``)."""
    PING: Final = rpc(RPC_FLOWS, "ping")


class RunsOp:
    """Operations of ``fm.rpc.runs.<op>``."""

    START: Final = rpc(RPC_RUNS, "start")
    GET: Final = rpc(RPC_RUNS, "get")
    LIST: Final = rpc(RPC_RUNS, "list")
    STEPS: Final = rpc(RPC_RUNS, "steps")
    EVENTS: Final = rpc(RPC_RUNS, "events")
    SNAPSHOT: Final = rpc(RPC_RUNS, "snapshot")
    """For the gateway's WebSocket: a run, its steps and its last event ``seq``, read together."""
    CANCEL: Final = rpc(RPC_RUNS, "cancel")
    RESUME: Final = rpc(RPC_RUNS, "resume")
    RETRY: Final = rpc(RPC_RUNS, "retry")
    PING: Final = rpc(RPC_RUNS, "ping")


class SchedulerOp:
    """Operations of ``fm.rpc.scheduler.<op>``: durable timers for other services (no tenant)."""

    TIMER_SET: Final = rpc(RPC_SCHEDULER, "timers.set")
    """Arm (or re-arm) the timer ``(owner, key)``: it fires once on ``fm.timers.fired.<owner>``."""
    TIMER_CANCEL: Final = rpc(RPC_SCHEDULER, "timers.cancel")
    """Disarm the timer ``(owner, key)``; cancelling one that fired or never existed is not an error."""
    PING: Final = rpc(RPC_SCHEDULER, "ping")


class UsageOp:
    """Operations of ``fm.rpc.usage.<op>``: plans, quotas, usage reads, the BYOK key vault and tenant secrets."""

    PLAN: Final = rpc(RPC_USAGE, "plan")
    """The caller's tenant's plan and whether it was assigned (``AssignedPlan``): the gateway's rate limits."""
    PLAN_SET: Final = rpc(RPC_USAGE, "plan.set")
    """Admin only: give a tenant a plan (``PlanRef`` → ``TenantPlan``)."""
    QUOTA: Final = rpc(RPC_USAGE, "quota")
    """The tenant's limits and this month's metered runs (``TenantQuota``), for quota checks."""
    SUMMARY: Final = rpc(RPC_USAGE, "summary")
    """``GET /usage`` (``UsageQuery`` → ``UsageSummary``)."""
    EXPORT: Final = rpc(RPC_USAGE, "export")
    """``GET /usage/export`` (``UsageExportQuery`` → ``UsageExport`` or ``UsageExportCsv``)."""
    FLOW_STATS: Final = rpc(RPC_USAGE, "flowStats")
    """``GET /flows/{id}/stats`` (``FlowStatsRequest`` → ``FlowStats``)."""
    KEYS_LIST: Final = rpc(RPC_USAGE, "keys.list")
    """The tenant's stored keys, hints only (``ApiKeyList``)."""
    KEYS_PUT: Final = rpc(RPC_USAGE, "keys.put")
    """Store (or replace) a provider's key (``ApiKeyCreate`` → ``ApiKeyInfo``)."""
    KEYS_DELETE: Final = rpc(RPC_USAGE, "keys.delete")
    """Forget a provider's key (``ApiKeyRef``); unknown → not-found."""
    KEYS_REVEAL: Final = rpc(RPC_USAGE, "keys.reveal")
    """For the runner only: a tenant's plaintext API key of one provider (``RevealKey`` → ``RevealedKey``)."""
    AUDIT: Final = rpc(RPC_USAGE, "audit")
    """``GET /audit``: the usage service's audit entries (``AuditRead`` → ``AuditEntries``)."""
    SECRETS_LIST: Final = rpc(RPC_USAGE, "secrets.list")
    """The tenant's stored secrets, hints only (``SecretList``)."""
    SECRETS_PUT: Final = rpc(RPC_USAGE, "secrets.put")
    """Store (or replace) a named secret (``SecretCreate`` → ``SecretInfo``)."""
    SECRETS_DELETE: Final = rpc(RPC_USAGE, "secrets.delete")
    """Forget a secret (``SecretRef``); unknown → not-found."""
    SECRETS_REVEAL: Final = rpc(RPC_USAGE, "secrets.reveal")
    """For the runner only: a tenant's plaintext secrets by name (``RevealSecrets`` → ``RevealedSecrets``)."""
    PING: Final = rpc(RPC_USAGE, "ping")


class FlowEventType:
    """The ``<event>`` of ``fm.flows.{t}.<event>``."""

    PUBLISHED: Final = "published"
    ROLLED_BACK: Final = "rolledBack"
    DELETED: Final = "deleted"
    ACTIVATED: Final = "activated"
    DEACTIVATED: Final = "deactivated"
    TRIGGER_CHANGED: Final = "triggerChanged"


# --- JetStream subjects -------------------------------------------------------------------------

FLOWS_EVENTS_ALL: Final = f"{PREFIX}.flows.>"
"""Every flow lifecycle announcement (stream ``FLOWS``)."""
RUN_START_CMD: Final = f"{PREFIX}.cmd.runs.start"
"""Start a run that must not be lost (stream ``RUN_CMDS``)."""
STEP_WORK: Final = f"{PREFIX}.work.steps"
"""A step ready to execute (stream ``STEP_WORK``)."""
RUN_EVENTS_ALL: Final = f"{PREFIX}.runs.>"
"""Every run event (stream ``RUN_EVENTS``)."""
TIMERS_FIRED_ALL: Final = f"{PREFIX}.timers.fired.>"
"""Every fired timer (stream ``TIMERS``)."""
EVENTS_ALL: Final = f"{PREFIX}.events.>"
"""Every external event (stream ``EVENTS``)."""
OUT_ALL: Final = f"{PREFIX}.out.>"
"""Every message published by a ``publish`` step (stream ``OUT``)."""


def flow_event(tenant_id: str, event: str) -> str:
    """``fm.flows.{t}.<event>``: a flow lifecycle announcement."""
    return f"{PREFIX}.flows.{tenant_token(tenant_id)}.{event}"


def run_event(tenant_id: str, flow_id: str, run_id: str, event_type: str) -> str:
    """``fm.runs.{t}.{flowId}.{runId}.<event>``: one run event."""
    return f"{PREFIX}.runs.{tenant_token(tenant_id)}.{flow_id}.{run_id}.{event_type}"


def run_events_of_type(event_type: str) -> str:
    """Filter subject for every run event of one type (``run.queued``, ``step.succeeded``, …)."""
    return f"{PREFIX}.runs.*.*.*.{event_type}"


def run_events_of_run(tenant_id: str, flow_id: str, run_id: str) -> str:
    """Filter subject for every event of one run."""
    return f"{PREFIX}.runs.{tenant_token(tenant_id)}.{flow_id}.{run_id}.>"


def run_events_of_flow(tenant_id: str, flow_id: str) -> str:
    """Filter subject for every event of every run of one flow."""
    return f"{PREFIX}.runs.{tenant_token(tenant_id)}.{flow_id}.>"


def timer_fired(owner: str) -> str:
    """``fm.timers.fired.<owner>``: a durable timer of ``owner`` came due."""
    return f"{PREFIX}.timers.fired.{owner}"


def external_event(tenant_id: str, event_type: str) -> str:
    """``fm.events.{t}.<eventType>``: an event from an integrator."""
    return f"{PREFIX}.events.{tenant_token(tenant_id)}.{event_type}"


def out_message(tenant_id: str, name: str) -> str:
    """``fm.out.{t}.<name>``: a message a flow publishes."""
    return f"{PREFIX}.out.{tenant_token(tenant_id)}.{name}"
