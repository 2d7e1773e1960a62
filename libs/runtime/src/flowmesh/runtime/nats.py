"""NATS and JetStream: the broker every service uses, and idempotent provisioning of streams."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import Annotated, Any, TypeVar

import nats.errors
from faststream._internal.context import Context  # the class behind faststream.Context()
from faststream.nats import NatsBroker, NatsCredentials, NatsSecurity, NatsUserPassword
from faststream.nats.message import NatsMessage as _NatsMessage
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError, BucketNotFoundError
from nats.js.kv import KeyValue

from flowmesh.contracts.permissions import service_permissions
from flowmesh.contracts.streams import ALL_STREAMS, StreamSpec
from flowmesh.runtime.settings import NatsLogin

log = logging.getLogger(__name__)

_T = TypeVar("_T")

JS_SETUP_TIMEOUT_S = 20.0
"""Timeout of the JetStream API calls that set a service up (creating its durable consumers): on an
R3 cluster that just formed, with every replica starting at once, one was seen to take over 5 s."""


class _MessageContext(Context):
    """FastStream's message injection, resolved on the event loop.

    ``Context.use`` is synchronous, so fast-depends runs it on a worker thread for every message
    (a thread hop and a GIL hand-over per delivery); an async ``use`` is awaited in place.
    """

    async def use(self, /, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        resolved: dict[str, Any] = super().use(**kwargs)
        return resolved


# the delivered message, for FastStream handler signatures: ``async def h(body: ..., msg: Message)``.
# Durable consumers use flowmesh.runtime.consumers instead; this alias, its private FastStream
# import and the two patches below serve FastStream pull subscribers only, and go with the last one.
Message = Annotated[_NatsMessage, _MessageContext("message")]


def _fetch_times_out_as_nats_says() -> None:
    """Make a pull ``fetch`` that got nothing raise nats-py's ``TimeoutError``, never asyncio's.

    nats-py 2.x raises either, depending on where the deadline passes; FastStream 0.7.8's pull loop
    suppresses only nats-py's, so asyncio's escaped it: an ERROR with a traceback in the logs and a
    restart of the consuming task, on an idle subscription. (nats-py's error subclasses asyncio's,
    so every other caller catches it as before.)
    """
    fetch = JetStreamContext.PullSubscription.fetch
    if getattr(fetch, "__flowmesh__", False):
        return

    @functools.wraps(fetch)
    async def fetch_or_timeout(self: JetStreamContext.PullSubscription, *args: Any, **kwargs: Any) -> Any:
        try:
            return await fetch(self, *args, **kwargs)
        except nats.errors.TimeoutError:
            raise
        except TimeoutError as exc:
            raise nats.errors.TimeoutError from exc

    fetch_or_timeout.__flowmesh__ = True  # type: ignore[attr-defined]
    JetStreamContext.PullSubscription.fetch = fetch_or_timeout  # type: ignore[method-assign]


_fetch_times_out_as_nats_says()


def _pull_inboxes_follow_the_connection() -> None:
    """Give FastStream's pull subscriptions the connection's inbox prefix, not a hard-coded ``_INBOX.``.

    FastStream 0.7.8 passes ``inbox_prefix=b"_INBOX."`` to every ``pull_subscribe`` unless a
    subscriber sets its own, while each Flowmesh user may only subscribe under ``_INBOX.<user>``
    (so nobody reads another user's replies): with the default left to nats-py, a pull
    subscription uses the connection's prefix like every other inbox.
    """
    pull_subscribe = JetStreamContext.pull_subscribe
    if getattr(pull_subscribe, "__flowmesh__", False):
        return

    @functools.wraps(pull_subscribe)
    async def pull_subscribe_in_own_inbox(self: JetStreamContext, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("inbox_prefix") == b"_INBOX.":
            kwargs["inbox_prefix"] = None
        return await pull_subscribe(self, *args, **kwargs)

    pull_subscribe_in_own_inbox.__flowmesh__ = True  # type: ignore[attr-defined]
    JetStreamContext.pull_subscribe = pull_subscribe_in_own_inbox  # type: ignore[method-assign]


_pull_inboxes_follow_the_connection()


class NatsRefusals:
    """The permission violations NATS reported on a connection, logged as they come.

    NATS answers a publish or subscribe that a user may not make with an asynchronous error, not a
    failure of the call: the call that needed it then times out. The services read these at
    start-up to say which subject their user lacks, rather than failing later with a timeout.
    """

    def __init__(self, user: str) -> None:
        self.user = user
        self.seen: list[str] = []

    async def on_error(self, error: Exception) -> None:
        """nats-py's ``error_cb``: record and log a permissions violation (other errors are logged elsewhere)."""
        text = str(error).removeprefix("nats: ")
        if "permissions violation" in text.lower():
            text = _SUBJECT_IN_ERROR.sub(lambda m: f'"{restore_case(m.group(1))}"', text)
            self.seen.append(text)
            log.error(
                "NATS refused user %r: %s (its permissions come from flowmesh.contracts.permissions, deploy/nats/)",
                self.user,
                text,
            )


_SUBJECT_IN_ERROR = re.compile(r'"([^"]+)"')


@functools.cache
def _known_subjects() -> tuple[tuple[str, ...], ...]:
    patterns = {p for perms in service_permissions().values() for p in (*perms.publish, *perms.subscribe)}
    return tuple(tuple(p.split(".")) for p in sorted(patterns))


def restore_case(subject: str) -> str:
    """A subject as it was sent, from nats-py's lower-cased report of a server error.

    Tokens are taken from the first permission pattern of any service that the subject matches
    (ignoring case); wildcard parts stay as reported.
    """
    tokens = subject.split(".")
    for pattern in _known_subjects():
        if _matches([t.lower() for t in pattern], [t.lower() for t in tokens]):
            out = [p if p not in ("*", ">") else t for p, t in zip(pattern, tokens, strict=False)]
            if pattern[-1] == ">":
                out[-1:] = tokens[len(pattern) - 1 :]
            return ".".join(out)
    return subject


def _matches(pattern: list[str], tokens: list[str]) -> bool:
    for i, p in enumerate(pattern):
        if p == ">":
            return len(tokens) > i
        if i >= len(tokens) or (p != "*" and p != tokens[i]):
            return False
    return len(tokens) == len(pattern)


def server_authenticates(broker: NatsBroker) -> bool:
    """Whether the NATS server the broker is connected to requires clients to authenticate."""
    info: dict[str, Any] = getattr(broker.connection, "_server_info", {}) or {}
    return bool(info.get("auth_required"))


def _security(login: NatsLogin) -> NatsSecurity | None:
    context = login.ssl_context()
    if login.user is not None:
        return NatsUserPassword(login.user, login.password or "", ssl_context=context)
    if login.creds is not None:
        return NatsCredentials(str(login.creds), ssl_context=context)
    return NatsSecurity(ssl_context=context) if context is not None else None


def create_broker(
    nats_url: str,
    *,
    name: str,
    login: NatsLogin | None = None,
    refusals: NatsRefusals | None = None,
    graceful_timeout: float = 10.0,
) -> NatsBroker:
    """A FastStream NATS broker that reconnects for ever (a restarted NATS must not kill a service).

    Args:
        nats_url: Server URL(s), comma-separated.
        name: Connection name (``flowmesh-<name>``), seen in the server's monitoring.
        login: Credentials, TLS and inbox prefix; anonymous with ``_INBOX.<name>`` inboxes when None.
        refusals: Where permission violations are recorded.
        graceful_timeout: How long stopping waits for handlers in flight.
    """
    login = login or NatsLogin(inbox_user=name)
    return NatsBroker(
        servers=[u.strip() for u in nats_url.split(",") if u.strip()],
        name=f"flowmesh-{name}",
        inbox_prefix=login.inbox_prefix,
        security=_security(login),
        error_cb=refusals.on_error if refusals is not None else None,
        max_reconnect_attempts=-1,
        reconnect_time_wait=1,
        connect_timeout=2,
        graceful_timeout=graceful_timeout,
        # The subscribers' JetStream context creates their durable consumers at start-up: on an R3
        # cluster that just formed, with every replica starting at once on a busy machine, that was
        # seen to take over nats-py's default 5 s, and the replica exited. Only those API calls use
        # this context (fetches carry their own timeout; services publish on their own contexts).
        js_options={"timeout": JS_SETUP_TIMEOUT_S},
        # our logging setup (JSON lines) instead of FastStream's own coloured handler;
        # per-message "Received/Processed" lines are debug detail, not operations logs
        logger=logging.getLogger("flowmesh.broker"),
        log_level=logging.DEBUG,
    )


async def stop_broker(broker: NatsBroker, *, timeout: float = 10.0) -> None:
    """Stop taking messages, let in-flight handlers finish, close; bounded even when NATS is gone.

    With NATS unreachable, draining waits for a reconnection that may never come: a process told
    to stop must stop all the same.
    """
    try:
        await asyncio.wait_for(broker.stop(), timeout)
    except TimeoutError:
        log.warning("NATS did not drain within %ss; closing without it", timeout)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(broker.connection.close(), 1.0)


def stream_config(spec: StreamSpec, *, replicas: int = 1) -> StreamConfig:
    """The nats-py config of a contract stream spec."""
    return StreamConfig(
        name=spec.name,
        description=spec.description or None,
        subjects=list(spec.subjects),
        retention=RetentionPolicy(spec.retention),
        storage=StorageType.FILE,
        max_age=spec.max_age_s or None,
        duplicate_window=spec.duplicate_window_s,
        num_replicas=replicas,
    )


async def provision_streams(
    js: JetStreamContext, specs: Iterable[StreamSpec] = ALL_STREAMS, *, replicas: int = 1
) -> None:
    """Create each stream, or bring an existing one to its spec. Safe to run from every replica at once."""
    for spec in specs:
        config = stream_config(spec, replicas=replicas)

        async def create(config: StreamConfig = config) -> None:
            try:
                await js.add_stream(config)
            except BadRequestError:
                # exists with another configuration (an older spec): update it in place
                await js.update_stream(config)

        await _patiently(create, f"stream {spec.name}")
        log.debug("stream %s ready", spec.name)


PROVISION_ATTEMPTS = 4
"""Tries of one idempotent JetStream API call at start-up before giving up."""


async def _patiently(call: Callable[[], Awaitable[_T]], what: str) -> _T:
    """An idempotent JetStream API call, tried again when it times out.

    Why: creating an R3 stream or bucket is a Raft proposal of the meta leader; when every replica
    of every service starts at once against a cluster that just formed (``make cluster``, a rollout)
    on a busy machine, one such call was seen to take over nats-py's 5 s API timeout, and the
    replica exited at start-up. Asking again is safe (the same config is accepted as it stands).
    """
    for attempt in range(1, PROVISION_ATTEMPTS + 1):
        try:
            return await call()
        except nats.errors.TimeoutError:
            if attempt == PROVISION_ATTEMPTS:
                raise
            log.warning("creating %s timed out (attempt %d of %d); asking again", what, attempt, PROVISION_ATTEMPTS)
    raise AssertionError("unreachable")


async def ensure_bucket(
    js: JetStreamContext, bucket: str, *, ttl_s: float, history: int = 1, replicas: int = 1
) -> KeyValue:
    """A JetStream KV bucket whose entries expire after ``ttl_s``; created if missing (any replica may race)."""

    async def find_or_create() -> KeyValue:
        try:
            return await js.key_value(bucket)
        except BucketNotFoundError:
            pass
        config = KeyValueConfig(bucket=bucket, ttl=ttl_s, history=history, replicas=replicas)
        try:
            return await js.create_key_value(config)
        except BadRequestError:
            return await js.key_value(bucket)  # another replica created it first

    return await _patiently(find_or_create, f"bucket {bucket}")
