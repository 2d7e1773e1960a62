"""NATS header names: who a message acts for, its contract version, its trace, its de-duplication id."""

from typing import Final

TENANT: Final = "Flowmesh-Tenant"
"""The tenant the message acts for (set from a verified token, never from a body)."""
SCHEMA: Final = "Flowmesh-Schema"
"""Contract version of the payload."""
TRACEPARENT: Final = "traceparent"
"""W3C trace context."""
MSG_ID: Final = "Nats-Msg-Id"
"""JetStream de-duplication id."""
ROLE: Final = "Flowmesh-Role"
"""Role of the caller (``member`` or ``admin``), for operations that need it."""
SUBJECT: Final = "Flowmesh-Subject"
"""The ``sub`` of the verified token that caused the message."""

SCHEMA_VERSION: Final = "1"
"""The contract version this package speaks."""
