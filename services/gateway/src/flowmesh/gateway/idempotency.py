"""``Idempotency-Key`` on creating POSTs, shared by every gateway replica through JetStream KV.

A key is scoped per (tenant, route template) and remembers the first request's fingerprint (method,
path, query and canonical JSON body). Its record in ``fm_idempotency`` goes through two states:

* **in flight** ``{fingerprint, deadline}``: claimed with KV ``create``, which fails when the key
  exists, so exactly one request of any replica runs. A duplicate meanwhile is a 409. A replica that
  died mid-request leaves the marker behind; after ``deadline`` (beyond the request timeout, so never
  while the first can still answer) a retry takes it over with a compare-and-set ``update``.
* **completed** ``{fingerprint, status, headers, body}``: the response, replayed for the same request
  for 24 h (the bucket's TTL), 422 for another request with the same key.

A 5xx deletes the marker: the client may retry with the same key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web
from nats.errors import Error as NatsError
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from flowmesh.contracts.errors import BadRequest, Conflict, InvalidInput, ServiceUnavailable
from flowmesh.contracts.subjects import tenant_token

log = logging.getLogger(__name__)

KEY_HEADER: Final = "Idempotency-Key"
REPLAYED_HEADER: Final = "Idempotent-Replayed"
"""Set to ``true`` on a response replayed from the store."""
MAX_KEY_LENGTH: Final = 255
STORED_HEADERS: Final = ("Content-Type", "Location", "ETag")
"""The response headers a replay repeats (the rest, like ``X-Request-Id``, belong to each request)."""
CLAIM_ATTEMPTS: Final = 3


# --- pure parts ---------------------------------------------------------------------------------


def checked_key(raw: str) -> str:
    """The client's key.

    Raises:
        BadRequest: longer than 255 characters, or not printable ASCII (a header's bytes that are not
            UTF-8 arrive as lone surrogates, which no key can hold).
    """
    if len(raw) > MAX_KEY_LENGTH:
        raise BadRequest(f"the Idempotency-Key header is over {MAX_KEY_LENGTH} characters")
    if not all(" " <= c <= "~" for c in raw):
        raise BadRequest("the Idempotency-Key header must be printable ASCII, e.g. a UUID")
    return raw


def canonical_body(raw: bytes) -> bytes:
    """A JSON body with sorted keys and no insignificant whitespace; an empty one reads as ``{}``.

    A body that is not JSON is kept as it is (the route refuses it anyway, the same way each time).
    """
    if not raw.strip():
        return b"{}"
    try:
        doc = json.loads(raw)
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    except (ValueError, RecursionError):  # also too deep, or a lone surrogate that UTF-8 cannot encode
        return raw


def fingerprint(method: str, path: str, query: Iterable[tuple[str, str]], body: bytes) -> str:
    """What makes two requests "the same": method, concrete path, query and canonical body."""
    h = hashlib.sha256()
    for part in (method.encode(), path.encode(), json.dumps(sorted(query)).encode()):
        h.update(part)
        h.update(b"\0")
    h.update(canonical_body(body))
    return h.hexdigest()


def storage_key(tenant: str, route: str, key: str) -> str:
    """The KV key of a client's key: ``<tenant token>.<sha-256 of route and key>`` (any key is KV-safe)."""
    digest = hashlib.sha256(f"{route}\n{key}".encode()).hexdigest()
    return f"{tenant_token(tenant)}.{digest}"


@dataclass(frozen=True, slots=True)
class InFlight:
    """The first request is running (or died before ``deadline``, epoch seconds)."""

    fingerprint: str
    deadline: float


@dataclass(frozen=True, slots=True)
class Completed:
    """The first request's response."""

    fingerprint: str
    status: int
    headers: Mapping[str, str]
    body: bytes

    @classmethod
    def of(cls, fp: str, response: web.Response) -> Completed:
        """The storable part of a response."""
        body = response.body
        data = bytes(body) if isinstance(body, bytes | bytearray | memoryview) else b""
        headers = {h: response.headers[h] for h in STORED_HEADERS if h in response.headers}
        return cls(fingerprint=fp, status=response.status, headers=headers, body=data)

    def replay(self) -> web.Response:
        """The stored response again, marked as a replay."""
        return web.Response(status=self.status, body=self.body, headers={**self.headers, REPLAYED_HEADER: "true"})


Record = InFlight | Completed


def encode(record: Record) -> bytes:
    """A record as the JSON stored in KV."""
    doc: dict[str, Any]
    if isinstance(record, InFlight):
        doc = {"state": "inFlight", "fingerprint": record.fingerprint, "deadline": record.deadline}
    else:
        doc = {
            "state": "completed",
            "fingerprint": record.fingerprint,
            "status": record.status,
            "headers": dict(record.headers),
            "body": base64.b64encode(record.body).decode(),
        }
    return json.dumps(doc, separators=(",", ":")).encode()


def decode(raw: bytes) -> Record | None:
    """A stored record; None when it cannot be read (then it is treated as an abandoned claim)."""
    try:
        doc = json.loads(raw)
        if doc["state"] == "inFlight":
            return InFlight(fingerprint=doc["fingerprint"], deadline=float(doc["deadline"]))
        return Completed(
            fingerprint=doc["fingerprint"],
            status=int(doc["status"]),
            headers=dict(doc["headers"]),
            body=base64.b64decode(doc["body"]),
        )
    except (ValueError, KeyError, TypeError):
        return None


def judge(record: Record | None, fp: str, now: float) -> Completed | None:
    """What an existing record means for a request: its response to replay, or None to take the key over.

    Raises:
        InvalidInput: the key was used for a different request (422).
        Conflict: the first request with this key is still in flight (409).
    """
    if record is None:
        return None
    if record.fingerprint != fp:
        raise InvalidInput(
            f"this {KEY_HEADER} was already used for a different request (method, path or body); "
            "use a new key for a new request"
        )
    if isinstance(record, Completed):
        return record
    if record.deadline > now:
        raise Conflict(f"a request with this {KEY_HEADER} is still in progress; retry in a moment")
    return None  # its replica died mid-request: the key is free again


# --- the store ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Claim:
    """This request owns the key at KV ``revision``."""

    key: str
    fingerprint: str
    revision: int


class IdempotencyStore:
    """Claims, completes and releases keys in the ``fm_idempotency`` bucket."""

    def __init__(self, kv: KeyValue, *, in_flight_s: float, clock: Callable[[], float] = time.time) -> None:
        self._kv = kv
        self._in_flight_s = in_flight_s
        self._clock = clock

    async def claim(self, key: str, fp: str) -> Claim | Completed:
        """Own ``key`` for this request, or learn the stored response of the same request.

        Raises:
            InvalidInput: the key was used for another request.
            Conflict: the first request with this key is still in flight.
            ServiceUnavailable: the KV store cannot be reached.
        """
        try:
            for _ in range(CLAIM_ATTEMPTS):
                marker = encode(InFlight(fingerprint=fp, deadline=self._clock() + self._in_flight_s))
                try:
                    return Claim(key, fp, await self._kv.create(key, marker))
                except KeyWrongLastSequenceError:
                    pass
                try:
                    entry = await self._kv.get(key)
                except KeyNotFoundError:
                    continue  # released (a 5xx) between our create and get: try again
                stored = judge(decode(entry.value or b""), fp, self._clock())
                if stored is not None:
                    return stored
                try:
                    return Claim(key, fp, await self._kv.update(key, marker, last=entry.revision))
                except KeyWrongLastSequenceError:
                    continue  # another retry took it over first
        except (NatsError, TimeoutError) as exc:
            log.warning("idempotency store unavailable: %r", exc)
            raise ServiceUnavailable("the idempotency store is unavailable; retry with the same key") from exc
        raise Conflict(f"a request with this {KEY_HEADER} is still in progress; retry in a moment")

    async def complete(self, claim: Claim, response: web.Response) -> None:
        """Store the response for replays; if that fails, release the key so retries are not blocked."""
        try:
            await self._kv.update(claim.key, encode(Completed.of(claim.fingerprint, response)), last=claim.revision)
        except Exception as exc:
            log.warning("could not store the response of idempotency key %s: %r; releasing it", claim.key, exc)
            await self.release(claim)

    async def release(self, claim: Claim) -> None:
        """Forget the key (a 5xx, or a response that could not be stored): the client may retry."""
        try:
            await self._kv.delete(claim.key, last=claim.revision)
        except Exception as exc:
            # the marker expires at its deadline all the same
            log.warning("could not release idempotency key %s: %r", claim.key, exc)


SERVICE_ANSWERS_REPEATS: Final = frozenset({"/api/v1/flows/{flow_id}/runs"})
"""Routes whose service de-duplicates by the same key itself, durably, and answers a repeat on its own.

A run start passes the key to the runner, which keeps it with the run for ever and answers a repeat
200 with the run as it is now (a retried start must never start a second run). Here the gateway
record only guards the key: a concurrent duplicate is a 409 and another request with the key a 422;
a completed one is forwarded, not replayed.
"""
IN_FLIGHT_MARGIN_S: Final = 10.0
"""An in-flight claim lasts this much longer than the request timeout (replicas' clocks may differ a little)."""
