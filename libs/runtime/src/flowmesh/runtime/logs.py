"""Logging: one JSON object per line (or plain text for the dev supervisor).

Each line carries what is known of the work it belongs to: ``traceId`` (the current trace context
of :mod:`flowmesh.runtime.tracing`), ``runId`` and ``tenant`` (set by :func:`log_context` where a
request, a message or a step attempt knows them). Context variables carry them, so a line logged
anywhere below (a repo, a client) has them without being passed anything.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Final

from pythonjsonlogger.json import JsonFormatter

from flowmesh.runtime.tracing import current_traceparent

_fields: ContextVar[dict[str, str] | None] = ContextVar("flowmesh_log_fields", default=None)

RUN_ID: Final = "runId"
TENANT: Final = "tenant"


@contextmanager
def log_context(*, run_id: str | None = None, tenant: str | None = None) -> Iterator[None]:
    """Tag the log lines of the block with a run id and a tenant (those given and not empty)."""
    added = {k: v for k, v in ((RUN_ID, run_id), (TENANT, tenant)) if v}
    if not added:
        yield
        return
    token = _fields.set({**(_fields.get() or {}), **added})
    try:
        yield
    finally:
        _fields.reset(token)


def bind_log(*, run_id: str | None = None, tenant: str | None = None) -> None:
    """Tag the rest of this task's log lines (a task of its own: a message's handler, a request)."""
    added = {k: v for k, v in ((RUN_ID, run_id), (TENANT, tenant)) if v}
    if added:
        _fields.set({**(_fields.get() or {}), **added})


class ContextFilter(logging.Filter):
    """Adds ``traceId``, ``runId`` and ``tenant`` of the current context to each record (when known)."""

    def filter(self, record: logging.LogRecord) -> bool:
        tp = current_traceparent()
        if tp is not None:
            record.traceId = tp[3:35]
        fields = _fields.get()
        if fields:
            for key, value in fields.items():
                setattr(record, key, value)
        return True


def configure_logging(service: str, *, level: str = "INFO", fmt: str = "json") -> None:
    """Route every logger to stderr in the chosen format, tagged with the service name."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "ts", "levelname": "level", "name": "logger"},
                static_fields={"service": service},
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(levelname)-5s %(name)s: %(message)s"))
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # per-message logs of the broker and per-request access logs are noise at INFO
    for noisy in ("aiohttp.access", "faststream.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
