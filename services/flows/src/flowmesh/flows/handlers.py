"""Request/reply handlers of ``fm.rpc.flows.*``: parse the contract model, call domain and repo.

Every change that other services must learn about queues a ``fm.flows.{t}.<event>`` announcement
in the outbox within the same transaction; the relay publishes it once the transaction committed.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from flowmesh.contracts.errors import Conflict, InvalidInput, NotFound, QuotaExceeded
from flowmesh.contracts.ids import is_uuid, new_id, utcnow
from flowmesh.contracts.models import (
    FieldError,
    Flow,
    FlowCreate,
    FlowDeleteRequest,
    FlowListQuery,
    FlowPatchRequest,
    FlowRef,
    FlowReplaceRequest,
    FlowUpdate,
    FlowVersion,
    Page,
    PageQuery,
    Trigger,
    TriggerUpdate,
)
from flowmesh.contracts.models.audit import AuditAction, AuditEntries, AuditRead, AuditTarget
from flowmesh.contracts.models.definition import STEP_TYPES
from flowmesh.contracts.models.flows import CatalogStep, FlowEvent, FlowExport, Rollback, ValidationReport
from flowmesh.contracts.models.rpc import (
    PublishResult,
    RunnableFlow,
    TriggerCreateRequest,
    TriggerPatchRequest,
    TriggerRef,
    VersionRef,
    WebhookLookup,
    WebhookTarget,
)
from flowmesh.contracts.models.schedules import ScheduleSources, ScheduleSourcesQuery
from flowmesh.contracts.models.usage import TenantQuota
from flowmesh.contracts.subjects import FlowEventType, FlowsOp, flow_event
from flowmesh.flows import domain, repo, triggers
from flowmesh.flows.deps import FlowsDeps
from flowmesh.flows.validation import credential_warnings, referenced_flows, validate_flow
from flowmesh.runtime import audit as audit_log
from flowmesh.runtime.db import Connection
from flowmesh.runtime.rpc import RpcContext, RpcRouter

router: RpcRouter[FlowsDeps] = RpcRouter()
"""Every flows operation; served with the service's :class:`FlowsDeps`."""


class VersionsQuery(FlowRef, PageQuery):
    """A flow, and which page of its versions to read."""


class RollbackRequest(FlowRef, Rollback):
    """A flow, and the version to make active again."""


CATALOG = [
    CatalogStep(
        type=s.type,
        title=s.title,
        description=s.description,
        handles=s.handles,
        data_schema=s.model.model_json_schema(by_alias=True),
    )
    for s in STEP_TYPES.values()
]


def _not_found(flow_id: str) -> NotFound:
    return NotFound(f"flow {flow_id} not found")


async def _flow(conn: Connection, ctx: RpcContext, flow_id: str, *, lock: bool = False) -> Flow:
    flow = await repo.get_flow(conn, tenant=ctx.tenant, flow_id=flow_id, for_update=lock) if is_uuid(flow_id) else None
    if flow is None:
        raise _not_found(flow_id)
    return flow


async def _trigger(conn: Connection, ctx: RpcContext, trigger_id: str) -> Trigger:
    found = (
        await repo.get_trigger(conn, tenant=ctx.tenant, trigger_id=trigger_id, for_update=True)
        if is_uuid(trigger_id)
        else None
    )
    if found is None:
        raise NotFound(f"trigger {trigger_id} not found")
    return found


async def _announce(
    conn: Connection, flow: Flow, event: str, *, trigger: Trigger | None = None, trigger_deleted: bool = False
) -> None:
    msg_id = new_id()
    payload = FlowEvent(
        id=msg_id,
        type=event,
        ts=utcnow(),
        tenant_id=flow.tenant_id,
        flow_id=flow.id,
        active=flow.active,
        active_version=flow.active_version,
        trigger=trigger,
        trigger_deleted=trigger_deleted,
    )
    await repo.announce(
        conn, tenant=flow.tenant_id, subject=flow_event(flow.tenant_id, event), payload=payload.wire(), msg_id=msg_id
    )


async def _audit(
    conn: Connection, ctx: RpcContext, action: AuditAction, target: Flow | Trigger, **details: Any
) -> None:
    """Record the change in the audit log, in its transaction; ``details`` are names and numbers, never a secret."""
    kind = "flow" if isinstance(target, Flow) else "trigger"
    await repo.audit(
        conn,
        tenant=ctx.tenant,
        actor=ctx.subject,
        action=action,
        target=AuditTarget(type=kind, id=target.id, name=target.name),
        details=details,
        now=utcnow(),
    )


async def _validate(conn: Connection, ctx: RpcContext, flow: Flow) -> list[FieldError]:
    targets = await repo.published_flow_ids(
        conn, tenant=ctx.tenant, ids={i for i in referenced_flows(flow.definition) if is_uuid(i)}
    )
    return validate_flow(flow.definition, flow.input_schema, flow_id=flow.id, published_flows=targets)


# --- drafts ----------------------------------------------------------------------------------


async def _quota(ctx: RpcContext, deps: FlowsDeps) -> TenantQuota | None:
    # asked before the transaction: no connection is held while the usage service answers
    return await deps.quotas.get(ctx.tenant) if deps.quotas is not None else None


async def _new_flow(
    conn: Connection, ctx: RpcContext, quota: TenantQuota | None, values: dict[str, Any], now: datetime
) -> Flow:
    limit = quota.flows_limit if quota is not None else None
    if quota is not None and limit is not None and await repo.count_flows_locked(conn, tenant=ctx.tenant) >= limit:
        raise QuotaExceeded(
            f"the {quota.plan} plan allows {limit} flow{'s' if limit != 1 else ''} and this tenant has "
            f"{'them' if limit != 1 else 'it'}; delete a flow or upgrade the plan"
        )
    return await repo.insert_flow(conn, flow_id=new_id(), tenant=ctx.tenant, values=values, now=now)


@router.handler(FlowsOp.CREATE)
async def create(flow: FlowCreate, ctx: RpcContext, deps: FlowsDeps) -> Flow:
    quota = await _quota(ctx, deps)
    async with deps.db.transaction() as conn:
        created = await _new_flow(conn, ctx, quota, domain.draft_values(flow), utcnow())
        await _audit(conn, ctx, "flow.created", created)
    return _warned(created)


def _warned(flow: Flow) -> Flow:
    """The flow with the warnings its draft deserves (literal credentials), as create and update answer."""
    warnings = credential_warnings(flow.definition)
    return flow.model_copy(update={"warnings": warnings}) if warnings else flow


@router.handler(FlowsOp.LIST)
async def list_(q: FlowListQuery, ctx: RpcContext, deps: FlowsDeps) -> Page[Any]:
    async with deps.db.reading() as conn:
        items, total = await repo.list_flows(
            conn, tenant=ctx.tenant, status=q.status, q=q.q, offset=q.offset, limit=q.page_size
        )
    return q.page_of(items, total)


@router.handler(FlowsOp.GET)
async def get(ref: FlowRef, ctx: RpcContext, deps: FlowsDeps) -> Flow:
    async with deps.db.reading() as conn:
        return await _flow(conn, ctx, ref.flow_id)


@router.handler(FlowsOp.UPDATE)
async def update(req: FlowPatchRequest, ctx: RpcContext, deps: FlowsDeps) -> Flow:
    values = domain.patch_values(FlowUpdate.model_validate(req.patch))
    async with deps.db.transaction() as conn:
        flow = await _flow(conn, ctx, req.flow_id, lock=True)
        domain.check_if_match(req.if_match, flow.revision)
        if not values:
            return _warned(flow)
        return _warned(await _updated(conn, ctx, flow, values))


@router.handler(FlowsOp.REPLACE)
async def replace(req: FlowReplaceRequest, ctx: RpcContext, deps: FlowsDeps) -> Flow:
    async with deps.db.transaction() as conn:
        flow = await _flow(conn, ctx, req.flow_id, lock=True)
        domain.check_if_match(req.if_match, flow.revision)
        return _warned(await _updated(conn, ctx, flow, domain.draft_values(req.flow)))


async def _updated(conn: Connection, ctx: RpcContext, flow: Flow, values: dict[str, Any]) -> Flow:
    after = await repo.update_flow(conn, tenant=ctx.tenant, flow_id=flow.id, values=values, now=utcnow())
    await _audit(conn, ctx, "flow.updated", after, fields=domain.changed_fields(flow, after), revision=after.revision)
    return after


@router.handler(FlowsOp.DELETE)
async def delete(req: FlowDeleteRequest, ctx: RpcContext, deps: FlowsDeps) -> None:
    async with deps.db.transaction() as conn:
        flow = await _flow(conn, ctx, req.flow_id, lock=True)
        domain.check_if_match(req.if_match, flow.revision)
        if flow.latest_version is not None and not req.force:
            raise Conflict(
                f"flow {flow.id} has published versions; deactivate it, or delete with ?force=true "
                "(keeps its run history)"
            )
        await repo.delete_flow(conn, tenant=ctx.tenant, flow_id=flow.id, now=utcnow())
        await _announce(conn, flow.model_copy(update={"active": False}), FlowEventType.DELETED)
        await _audit(conn, ctx, "flow.deleted", flow, force=req.force)
    await deps.relay.publish_now()


@router.handler(FlowsOp.DUPLICATE)
async def duplicate(ref: FlowRef, ctx: RpcContext, deps: FlowsDeps) -> Flow:
    quota = await _quota(ctx, deps)
    async with deps.db.transaction() as conn:
        flow = await _flow(conn, ctx, ref.flow_id)
        values = {
            "name": domain.copy_name(flow.name),
            "description": flow.description,
            "definition": flow.definition,
            "input_schema": flow.input_schema,
            "settings": flow.settings,
        }
        copy = await _new_flow(conn, ctx, quota, values, utcnow())
        await _audit(conn, ctx, "flow.created", copy, duplicateOf=flow.id)
    return copy


# --- validation, versions ----------------------------------------------------------------------


@router.handler(FlowsOp.VALIDATE)
async def validate(ref: FlowRef, ctx: RpcContext, deps: FlowsDeps) -> ValidationReport:
    async with deps.db.reading() as conn:
        flow = await _flow(conn, ctx, ref.flow_id)
        errors = await _validate(conn, ctx, flow)
    return ValidationReport(valid=not errors, errors=errors, warnings=credential_warnings(flow.definition))


@router.handler(FlowsOp.PUBLISH)
async def publish(ref: FlowRef, ctx: RpcContext, deps: FlowsDeps) -> PublishResult:
    async with deps.db.transaction() as conn:
        flow = await _flow(conn, ctx, ref.flow_id, lock=True)
        errors = await _validate(conn, ctx, flow)
        if errors:
            raise InvalidInput(f"the flow has {len(errors)} problem(s); fix them and publish again", errors=errors)
        if flow.active_version is not None:
            active = await repo.get_version(conn, tenant=ctx.tenant, flow_id=flow.id, version=flow.active_version)
            if active is not None and domain.same_content(flow, active):
                return PublishResult(version=active, created=False)
        number = (flow.latest_version or 0) + 1
        version = await repo.insert_version(conn, flow=flow, version=number, now=utcnow())
        flow = await repo.update_flow(
            conn,
            tenant=ctx.tenant,
            flow_id=flow.id,
            values={"latest_version": number, "active_version": number},
            now=utcnow(),
        )
        await _announce(conn, flow, FlowEventType.PUBLISHED)
        await _audit(conn, ctx, "flow.published", flow, version=number)
    await deps.relay.publish_now()
    return PublishResult(version=version, created=True)


@router.handler(FlowsOp.VERSIONS)
async def versions(q: VersionsQuery, ctx: RpcContext, deps: FlowsDeps) -> Page[FlowVersion]:
    async with deps.db.snapshot() as conn:
        await _flow(conn, ctx, q.flow_id)
        items, total = await repo.list_versions(
            conn, tenant=ctx.tenant, flow_id=q.flow_id, offset=q.offset, limit=q.page_size
        )
    return q.page_of(items, total)


@router.handler(FlowsOp.VERSION)
async def version(ref: VersionRef, ctx: RpcContext, deps: FlowsDeps) -> FlowVersion:
    async with deps.db.reading() as conn:
        flow = await _flow(conn, ctx, ref.flow_id)
        number = ref.version or flow.active_version
        found = await repo.get_version(conn, tenant=ctx.tenant, flow_id=flow.id, version=number) if number else None
    if found is None:
        raise NotFound(f"flow {flow.id} has no version {ref.version or '(none published)'}")
    return found


@router.handler(FlowsOp.ROLLBACK)
async def rollback(ref: RollbackRequest, ctx: RpcContext, deps: FlowsDeps) -> Flow:
    target = ref.version
    async with deps.db.transaction() as conn:
        flow = await _flow(conn, ctx, ref.flow_id, lock=True)
        if await repo.get_version(conn, tenant=ctx.tenant, flow_id=flow.id, version=target) is None:
            raise NotFound(f"flow {flow.id} has no version {target}")
        if flow.active_version == target:
            return flow
        previous = flow.active_version
        flow = await repo.update_flow(
            conn, tenant=ctx.tenant, flow_id=flow.id, values={"active_version": target}, now=utcnow()
        )
        await _announce(conn, flow, FlowEventType.ROLLED_BACK)
        await _audit(conn, ctx, "flow.rolledBack", flow, version=target, previousVersion=previous)
    await deps.relay.publish_now()
    return flow


async def _set_active(ref: FlowRef, ctx: RpcContext, deps: FlowsDeps, active: bool) -> Flow:
    async with deps.db.transaction() as conn:
        flow = await _flow(conn, ctx, ref.flow_id, lock=True)
        if flow.active == active:
            return flow
        flow = await repo.update_flow(conn, tenant=ctx.tenant, flow_id=flow.id, values={"active": active}, now=utcnow())
        await _announce(conn, flow, FlowEventType.ACTIVATED if active else FlowEventType.DEACTIVATED)
        await _audit(conn, ctx, "flow.activated" if active else "flow.deactivated", flow)
    await deps.relay.publish_now()
    return flow


@router.handler(FlowsOp.ACTIVATE)
async def activate(ref: FlowRef, ctx: RpcContext, deps: FlowsDeps) -> Flow:
    return await _set_active(ref, ctx, deps, True)


@router.handler(FlowsOp.DEACTIVATE)
async def deactivate(ref: FlowRef, ctx: RpcContext, deps: FlowsDeps) -> Flow:
    return await _set_active(ref, ctx, deps, False)


# --- export, import, catalog -------------------------------------------------------------------


@router.handler(FlowsOp.EXPORT)
async def export(ref: FlowRef, ctx: RpcContext, deps: FlowsDeps) -> FlowExport:
    async with deps.db.reading() as conn:
        flow = await _flow(conn, ctx, ref.flow_id)
        return domain.export_document(flow, await repo.list_triggers(conn, tenant=ctx.tenant, flow_id=flow.id))


@router.handler(FlowsOp.IMPORT)
async def import_(doc: FlowExport, ctx: RpcContext, deps: FlowsDeps) -> dict[str, Any]:
    configs = []
    errors: list[FieldError] = []
    quota = await _quota(ctx, deps)
    for i, t in enumerate(doc.flow.triggers):
        try:
            configs.append(config := triggers.check_config(t.type, t.config))
            _check_cron(quota, t.type, config)
        except InvalidInput as exc:
            errors += [FieldError(path=f"/flow/triggers/{i}{e.path}", message=e.message) for e in exc.errors or []]
    if errors:
        raise InvalidInput("the document has invalid triggers", errors=errors)
    draft = FlowCreate(
        name=doc.flow.name,
        description=doc.flow.description,
        definition=doc.flow.definition,
        input_schema=doc.flow.input_schema,
        settings=doc.flow.settings,
    )
    async with deps.db.transaction() as conn:
        flow = await _new_flow(conn, ctx, quota, domain.draft_values(draft), utcnow())
        _check_trigger_room(quota, flow, 0, len(doc.flow.triggers))
        await _audit(conn, ctx, "flow.created", flow, imported=True)
        created = [
            await _insert_trigger(conn, ctx, flow, t.type, t.name, config, t.enabled)
            for t, config in zip(doc.flow.triggers, configs, strict=True)
        ]
    if created:
        await deps.relay.publish_now()
    return {**flow.wire(), "triggers": [t.wire(exclude_none=True) for t in created]}


@router.handler(FlowsOp.CATALOG, tenant_required=False)
async def catalog(_: object, __: RpcContext, deps: FlowsDeps) -> dict[str, Any]:
    return {"items": [c.wire() for c in CATALOG]}


# --- triggers ----------------------------------------------------------------------------------


async def _insert_trigger(
    conn: Connection, ctx: RpcContext, flow: Flow, type_: str, name: str, config: dict[str, Any], enabled: bool
) -> Trigger:
    values: dict[str, Any] = {"type": type_, "name": name, "config": config, "enabled": enabled}
    token = secret = None
    if type_ == "webhook":
        token = triggers.new_webhook_token()
        values["token_hash"] = triggers.hash_token(token)
        if config.get("signed"):
            secret = values["signing_secret"] = triggers.new_signing_secret()
    trigger = await repo.insert_trigger(
        conn, trigger_id=new_id(), tenant=ctx.tenant, flow_id=flow.id, values=values, now=utcnow()
    )
    await _announce(conn, flow, FlowEventType.TRIGGER_CHANGED, trigger=trigger)
    await _audit(conn, ctx, "trigger.created", trigger, flowId=flow.id, type=type_)
    return trigger.model_copy(update={"url": triggers.WEBHOOK_PATH + token if token else None, "secret": secret})


def _cron_problems(quota: TenantQuota | None, type_: str, config: dict[str, Any]) -> list[FieldError]:
    """A schedule that fires more often than the plan's shortest cron interval (at ``/config/cron``)."""
    if quota is None or type_ != "schedule":
        return []
    problem = triggers.cron_interval_problem(config, quota.plan, quota.caps.cron_min_interval_s)
    return [problem] if problem is not None else []


def _check_cron(quota: TenantQuota | None, type_: str, config: dict[str, Any]) -> None:
    if problems := _cron_problems(quota, type_, config):
        raise InvalidInput("the schedule fires more often than the plan allows", errors=problems)


def _check_trigger_room(quota: TenantQuota | None, flow: Flow, has: int, adding: int) -> None:
    """403 ``quota-exceeded`` when ``adding`` triggers to the ``has`` of ``flow`` is over the plan's cap."""
    cap = quota.caps.triggers_per_flow if quota is not None else None
    if quota is None or cap is None or has + adding <= cap:
        return
    raise QuotaExceeded(
        f"the {quota.plan} plan allows {cap} trigger{'s' if cap != 1 else ''} per flow and flow {flow.id} "
        f"would have {has + adding}; delete a trigger or upgrade the plan"
    )


@router.handler(FlowsOp.TRIGGERS)
async def list_triggers(ref: FlowRef, ctx: RpcContext, deps: FlowsDeps) -> dict[str, Any]:
    async with deps.db.reading() as conn:
        flow = await _flow(conn, ctx, ref.flow_id)
        items = await repo.list_triggers(conn, tenant=ctx.tenant, flow_id=flow.id)
    return {"items": [t.wire(exclude_none=True) for t in items]}


@router.handler(FlowsOp.TRIGGER_CREATE)
async def create_trigger(req: TriggerCreateRequest, ctx: RpcContext, deps: FlowsDeps) -> Trigger:
    config = triggers.check_config(req.trigger.type, req.trigger.config)
    quota = await _quota(ctx, deps)
    _check_cron(quota, req.trigger.type, config)
    async with deps.db.transaction() as conn:
        flow = await _flow(conn, ctx, req.flow_id, lock=True)  # the lock: one count of its triggers at a time
        _check_trigger_room(quota, flow, await repo.count_triggers(conn, tenant=ctx.tenant, flow_id=flow.id), 1)
        created = await _insert_trigger(
            conn, ctx, flow, req.trigger.type, req.trigger.name, config, req.trigger.enabled
        )
    await deps.relay.publish_now()
    return created


@router.handler(FlowsOp.TRIGGER_UPDATE)
async def update_trigger(req: TriggerPatchRequest, ctx: RpcContext, deps: FlowsDeps) -> Trigger:
    patch = TriggerUpdate.model_validate(req.patch)
    quota = await _quota(ctx, deps) if patch.config is not None else None
    async with deps.db.transaction() as conn:
        trigger = await _trigger(conn, ctx, req.trigger_id)
        values: dict[str, Any] = {}
        if patch.name is not None:
            values["name"] = patch.name
        if patch.enabled is not None:
            values["enabled"] = patch.enabled
        if patch.config is not None:
            values["config"] = triggers.check_config(trigger.type, patch.config)
            _check_cron(quota, trigger.type, values["config"])
            if trigger.type == "webhook" and values["config"].get("signed") != trigger.config.get("signed"):
                raise InvalidInput(
                    "a webhook cannot change between signed and unsigned; create a new trigger",
                    errors=[FieldError(path="/config/signed", message="cannot be changed")],
                )
        if not values:
            return trigger
        trigger = await repo.update_trigger(conn, tenant=ctx.tenant, trigger_id=trigger.id, values=values, now=utcnow())
        await _announce(conn, await _flow(conn, ctx, trigger.flow_id), FlowEventType.TRIGGER_CHANGED, trigger=trigger)
        await _audit(conn, ctx, "trigger.updated", trigger, flowId=trigger.flow_id, fields=sorted(values))
    await deps.relay.publish_now()
    return trigger


@router.handler(FlowsOp.TRIGGER_DELETE)
async def delete_trigger(ref: TriggerRef, ctx: RpcContext, deps: FlowsDeps) -> None:
    async with deps.db.transaction() as conn:
        trigger = await _trigger(conn, ctx, ref.trigger_id)
        await repo.delete_trigger(conn, tenant=ctx.tenant, trigger_id=trigger.id)
        await _announce(
            conn,
            await _flow(conn, ctx, trigger.flow_id),
            FlowEventType.TRIGGER_CHANGED,
            trigger=trigger,
            trigger_deleted=True,
        )
        await _audit(conn, ctx, "trigger.deleted", trigger, flowId=trigger.flow_id, type=trigger.type)
    await deps.relay.publish_now()


# --- audit ----------------------------------------------------------------------------------------


@router.handler(FlowsOp.AUDIT)
async def audit(q: AuditRead, ctx: RpcContext, deps: FlowsDeps) -> AuditEntries:
    async with deps.db.reading() as conn:
        items = await repo.read_audit(conn, tenant=audit_log.scope(tenant=ctx.tenant, role=ctx.role, q=q), q=q)
    return AuditEntries(items=items)


# --- lookups for other services ----------------------------------------------------------------


@router.handler(FlowsOp.RUNNABLE)
async def runnable(ref: VersionRef, ctx: RpcContext, deps: FlowsDeps) -> RunnableFlow:
    async with deps.db.reading() as conn:
        flow = await _flow(conn, ctx, ref.flow_id)
        if flow.active_version is None:
            raise Conflict(f"flow {flow.id} has no published version; publish it first")
        number = ref.version or flow.active_version
        found = await repo.get_version(conn, tenant=ctx.tenant, flow_id=flow.id, version=number)
    if found is None:
        raise NotFound(f"flow {flow.id} has no version {number}")
    return RunnableFlow(flow_id=flow.id, tenant_id=flow.tenant_id, active=flow.active, version=found)


@router.handler(FlowsOp.WEBHOOK, tenant_required=False)
async def webhook(lookup: WebhookLookup, _: RpcContext, deps: FlowsDeps) -> WebhookTarget:
    async with deps.db.reading() as conn:
        found = await repo.webhook_by_token_hash(conn, token_hash=triggers.hash_token(lookup.token))
    if found is None or found[1]["deleted_at"] is not None:
        raise NotFound("no webhook has this URL")
    trigger, row = found
    return WebhookTarget(
        trigger=trigger,
        tenant_id=row["tenant_id"],
        flow_active=row["active"],
        published=row["latest_version"] is not None,
        signing_secrets=[row["signing_secret"]] if row["signing_secret"] else [],
    )


@router.handler(FlowsOp.SCHEDULES, tenant_required=False)
async def schedules(q: ScheduleSourcesQuery, _: RpcContext, deps: FlowsDeps) -> ScheduleSources:
    async with deps.db.reading() as conn:
        if q.flow_ids is not None:
            return ScheduleSources(flows=await repo.flow_states(conn, flow_ids=[i for i in q.flow_ids if is_uuid(i)]))
        ids = None if q.trigger_ids is None else [i for i in q.trigger_ids if is_uuid(i)]
        after = q.after if q.after is not None and is_uuid(q.after) else None
        return ScheduleSources(items=await repo.schedule_sources(conn, trigger_ids=ids, after=after, limit=q.limit))
