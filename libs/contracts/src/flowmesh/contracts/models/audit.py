"""The audit log: who changed what, when. Each service that owns a change records it in its own table,
in the transaction of the change; ``GET /audit`` reads them all, newest first.
"""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal, get_args

from pydantic import AfterValidator, BeforeValidator, Field

from flowmesh.contracts.ids import format_time, is_uuid
from flowmesh.contracts.models.base import Timestamp, WireModel, rfc3339_only

AuditAction = Literal[
    "flow.created",
    "flow.updated",
    "flow.published",
    "flow.rolledBack",
    "flow.deleted",
    "flow.activated",
    "flow.deactivated",
    "trigger.created",
    "trigger.updated",
    "trigger.deleted",
    "apiKey.put",
    "apiKey.deleted",
    "plan.changed",
    "secret.put",
    "secret.deleted",
]
"""Every action the audit log records (a closed vocabulary: a new one is a contract change)."""

AUDIT_ACTIONS: Final[tuple[str, ...]] = get_args(AuditAction)

AuditTargetType = Literal["flow", "trigger", "apiKey", "tenant", "secret"]
"""What an entry is about: a flow or trigger (by id), a provider key (by provider), a tenant (its plan),
a secret (by name)."""

ADMIN_ROLE: Final = "admin"
"""The ``Flowmesh-Role`` of a platform operator: reads every tenant's entries (the gateway sets it from the token)."""

MAX_ID: Final = 255
"""The longest id a filter may name (a tenant id is at most this long)."""


class AuditTarget(WireModel):
    """What an entry is about: its type, its id (a provider or secret name for those) and, if it has one, its name."""

    type: AuditTargetType
    id: str
    name: str | None = None


class AuditEntry(WireModel):
    """One change, as recorded with it. ``details`` never holds a secret or key value."""

    id: str
    at: Timestamp
    tenant_id: str
    actor: str = Field(description="The `sub` of the token that made the change (empty for an internal caller).")
    action: AuditAction
    target: AuditTarget
    details: dict[str, Any] = Field(default_factory=dict)


def audit_time(now: datetime) -> datetime:
    """``now`` cut to the millisecond: an entry's time is stored as the wire shows it, so a cursor is exact."""
    return now.astimezone(UTC).replace(microsecond=now.microsecond // 1000 * 1000)


def _aware(value: datetime) -> datetime:
    # a time without an offset is read as UTC (the API's times are UTC)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


QueryTime = Annotated[Timestamp, BeforeValidator(rfc3339_only), AfterValidator(_aware)]


class AuditCursor(WireModel):
    """Where a page ended: the (``at``, ``id``) of its last entry; the next page is strictly older."""

    at: Timestamp
    id: str

    def encode(self) -> str:
        """The opaque ``cursor`` a client sends back."""
        return base64.urlsafe_b64encode(f"{format_time(self.at)}/{self.id}".encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> AuditCursor:
        """Read a ``cursor`` given by :meth:`encode`.

        Raises:
            ValueError: it is not one.
        """
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
            at, _, id_ = raw.partition("/")
            when = datetime.fromisoformat(at.replace("Z", "+00:00"))
        except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
            raise ValueError("not a cursor this API gave (use the `next` of a page)") from exc
        if when.tzinfo is None or not is_uuid(id_):
            raise ValueError("not a cursor this API gave (use the `next` of a page)")
        return cls(at=when, id=id_)


def _cursor(value: str | None) -> str | None:
    if value is not None:
        AuditCursor.decode(value)
    return value


class AuditQuery(WireModel):
    """Query of ``GET /audit``: newest first, a page at a time, optionally filtered."""

    page_size: int = Field(default=20, ge=1, le=100)
    cursor: Annotated[
        str | None, Field(max_length=200, description="The `next` of the previous page."), AfterValidator(_cursor)
    ] = None
    action: AuditAction | None = None
    target_id: Annotated[str | None, Field(max_length=MAX_ID, description="Entries about this flow, trigger, …")] = None
    since: Annotated[QueryTime | None, Field(description="Entries at or after this time (RFC 3339).")] = None
    until: Annotated[QueryTime | None, Field(description="Entries before this time (RFC 3339).")] = None
    tenant_id: Annotated[
        str | None,
        Field(
            max_length=MAX_ID,
            description="Platform admins: one tenant's entries (without it, every tenant's). Others: only their own.",
        ),
    ] = None


class AuditPage(WireModel):
    """A page of the audit log, newest first; ``next`` is the cursor of the following page (absent at the end)."""

    items: list[AuditEntry]
    page_size: int = Field(ge=1, le=100)
    next: str | None = None


class AuditRead(WireModel):
    """``fm.rpc.<service>.audit``: a service's entries strictly older than ``before``, newest first.

    The caller's tenant's entries; with ``Flowmesh-Role: admin``, those of ``tenantId``, or of every
    tenant when it is absent.
    """

    tenant_id: str | None = None
    action: AuditAction | None = None
    target_id: str | None = None
    since: Timestamp | None = None
    until: Timestamp | None = None
    before: AuditCursor | None = None
    limit: int = Field(default=21, ge=1, le=101)


class AuditEntries(WireModel):
    """Reply of ``fm.rpc.<service>.audit``."""

    items: list[AuditEntry]
