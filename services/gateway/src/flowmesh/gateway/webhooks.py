"""Public webhooks (``/hooks/{token}``, no JWT): signatures, run input, what a trigger accepts. Pure.

A signed trigger follows Standard Webhooks: ``webhook-signature`` carries one or more
space-separated ``v1,<base64 HMAC-SHA256 of "{webhook-id}.{webhook-timestamp}.{raw body}">``,
keyed with the bytes behind the trigger's ``whsec_<base64>`` secret; the timestamp must be within
five minutes of this server's clock, either way. Any valid signature under any of the trigger's
secrets is enough, so a sender can sign with an old and a new secret while it rotates (the flows
service keeps one secret per trigger today; its lookup answers a list, ready for a second one).

A delivery becomes the run input ``{body, headers, query}``: ``body`` is the parsed JSON or form,
else the text; ``headers`` leaves out credentials, transport headers and what changes from one
attempt of a delivery to the next (so a redelivery is the same input, which the runner's
idempotency key needs).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import parse_qsl

from pydantic import JsonValue

from flowmesh.contracts.errors import (
    BadRequest,
    Conflict,
    InvalidInput,
    NotFound,
    Unauthorized,
    UnsupportedMediaType,
)
from flowmesh.contracts.models import FieldError
from flowmesh.contracts.models.rpc import WebhookTarget
from flowmesh.gateway.body import number_problem, parse_constant

WEBHOOK_ID: Final = "webhook-id"
"""Standard Webhooks: the delivery's id, the same on every attempt (de-duplication key)."""
WEBHOOK_TIMESTAMP: Final = "webhook-timestamp"
"""Standard Webhooks: when this attempt was signed, in Unix seconds."""
WEBHOOK_SIGNATURE: Final = "webhook-signature"
"""Standard Webhooks: space-separated ``v1,<base64>`` signatures."""

SECRET_PREFIX: Final = "whsec_"
TOLERANCE_S: Final = 5 * 60
"""How far ``webhook-timestamp`` may be from this server's clock, into the past or the future."""
MAX_ID_LENGTH: Final = 200
"""Longest ``webhook-id``: the idempotency key ``hook:{triggerId}:{id}`` must fit in 255."""
MAX_DEPTH: Final = 64
"""Deepest nesting of a JSON body (the run input is stored and re-encoded on every step)."""
MAX_FORM_FIELDS: Final = 1000

_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,128}")
_ID = re.compile(r"[\x21-\x7e]+")
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
# PostgreSQL jsonb holds neither NUL nor a lone UTF-16 surrogate (JSON's "\ud800"; pairs arrive combined)
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
_JSON_TYPES: Final = frozenset({"application/json", "text/json"})
_FORM_TYPE: Final = "application/x-www-form-urlencoded"

# Left out of the run input's headers. Credentials: a flow's input is shown in the UI and kept
# with the run. Transport: about this hop, not the delivery. Per attempt: a redelivery must give
# the same input, or the runner would refuse its idempotency key as reused for another input.
_DROPPED_HEADERS: Final = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "host",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
        "content-length",
        "forwarded",
        "via",
        "x-real-ip",
        WEBHOOK_TIMESTAMP,
        "traceparent",
        "tracestate",
        "x-request-id",
    }
)
_CREDENTIAL_LIKE = re.compile(r"auth|token|secret|signature|passw|api-?key|session|cookie|csrf|xsrf")


# --- signatures ------------------------------------------------------------------------------------


def signing_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret: the decoded bytes.

    Raises:
        ValueError: not a ``whsec_`` secret of standard base64.
    """
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"a signing secret starts with {SECRET_PREFIX!r}")
    try:
        return base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except binascii.Error as exc:
        raise ValueError("a signing secret is whsec_ followed by standard base64") from exc


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """One ``webhook-signature`` entry: ``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``."""
    return "v1," + base64.b64encode(_digest(key, msg_id, str(timestamp), body)).decode()


def _digest(key: bytes, msg_id: str, timestamp: str, body: bytes) -> bytes:
    return hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()


def _given_signatures(header: str) -> list[bytes]:
    """The decoded ``v1`` signatures of a header; other versions and malformed entries are skipped."""
    found = []
    for entry in header.split():
        version, _, value = entry.partition(",")
        if version != "v1":
            continue
        try:
            found.append(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError):
            continue
    return found


def verify(
    keys: Sequence[bytes],
    *,
    msg_id: str | None,
    timestamp: str | None,
    signature: str | None,
    body: bytes,
    now: float,
) -> str:
    """Check a signed delivery; its ``webhook-id``.

    Every signature is compared with :func:`hmac.compare_digest` against every key's digest.

    Raises:
        Unauthorized: a header is missing, the timestamp is not within :data:`TOLERANCE_S` of
            ``now``, or no signature matches under any key.
        BadRequest: ``webhook-id`` is not 1 to 200 visible ASCII characters.
    """
    if not msg_id or not timestamp or not signature:
        missing = [
            name
            for name, value in ((WEBHOOK_ID, msg_id), (WEBHOOK_TIMESTAMP, timestamp), (WEBHOOK_SIGNATURE, signature))
            if not value
        ]
        raise Unauthorized(
            "this webhook is signed: send the Standard Webhooks headers webhook-id, webhook-timestamp and "
            f"webhook-signature (missing: {', '.join(missing)})"
        )
    if _TIMESTAMP.fullmatch(timestamp) is None:
        raise Unauthorized(f"{WEBHOOK_TIMESTAMP} must be the Unix time of signing, in whole seconds")
    skew = now - int(timestamp)
    if abs(skew) > TOLERANCE_S:
        when = "in the past" if skew > 0 else "in the future"
        raise Unauthorized(
            f"{WEBHOOK_TIMESTAMP} is {abs(skew):.0f} s {when}; a delivery is accepted within {TOLERANCE_S} s "
            "of this server's clock (sign each attempt afresh, and keep the sender's clock in sync)"
        )
    given = _given_signatures(signature)
    expected = [_digest(key, msg_id, timestamp, body) for key in keys]
    # no early exit on a match: the time taken does not depend on which entry matched
    matched = False
    for digest in expected:
        for candidate in given:
            matched |= hmac.compare_digest(digest, candidate)
    if not matched:
        raise Unauthorized(
            f"no signature in {WEBHOOK_SIGNATURE} matches: send v1,<base64 of HMAC-SHA256 over "
            '"{webhook-id}.{webhook-timestamp}.{raw body}"> keyed with the base64-decoded part of the '
            "trigger's whsec_ secret (space-separate several while rotating secrets)"
        )
    # checked once authenticated: an unauthenticated sender learns nothing but 401
    return _checked_id(msg_id)


def delivery_id(value: str | None) -> str | None:
    """A ``webhook-id`` header, checked; ``None`` when absent.

    Raises:
        BadRequest: not 1 to :data:`MAX_ID_LENGTH` visible ASCII characters.
    """
    return _checked_id(value) if value else None


def _checked_id(value: str) -> str:
    if len(value) > MAX_ID_LENGTH or _ID.fullmatch(value) is None:
        raise BadRequest(f"{WEBHOOK_ID} must be 1 to {MAX_ID_LENGTH} visible ASCII characters (no spaces)")
    return value


def idempotency_key(trigger_id: str, msg_id: str | None) -> str | None:
    """The runner's idempotency key of a delivery: a redelivery finds the run of the first attempt."""
    return None if msg_id is None else f"hook:{trigger_id}:{msg_id}"


# --- the run input ---------------------------------------------------------------------------------


def _text(value: str) -> str:
    """A header or query value as valid Unicode (undecodable bytes from the HTTP parser become ``?``)."""
    return value.encode("utf-8", "replace").decode("utf-8")


def _grouped(pairs: Iterable[tuple[str, str]]) -> dict[str, JsonValue]:
    """Name/value pairs as a dict: a repeated name gets the list of its values, in order."""
    out: dict[str, JsonValue] = {}
    for name, value in pairs:
        seen = out.get(name)
        if seen is None:
            out[name] = value
        elif isinstance(seen, list):
            seen.append(value)
        else:
            out[name] = [seen, value]
    return out


def safe_headers(items: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The headers a flow sees: lower-case names, repeated ones joined with ``", "``.

    Credentials (``Authorization``, cookies, anything named like a token, key, secret or
    signature), transport headers and per-attempt headers are left out.
    """
    out: dict[str, str] = {}
    for raw_name, raw_value in items:
        name = raw_name.lower()
        if name in _DROPPED_HEADERS or name.startswith("x-forwarded-") or _CREDENTIAL_LIKE.search(name):
            continue
        value = _text(raw_value)
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out


def query_values(items: Iterable[tuple[str, str]]) -> dict[str, JsonValue]:
    """The query string as a dict (a repeated parameter gets a list)."""
    return _grouped((_text(k), _text(v)) for k, v in items)


def parse_body(raw: bytes, content_type: str, charset: str | None) -> JsonValue:
    """A delivery's body: parsed JSON or form by its ``Content-Type``, else text; ``None`` when empty.

    Raises:
        BadRequest: sent as JSON but not JSON, or a form that cannot be read.
        UnsupportedMediaType: neither JSON nor form, and not text in its charset (default UTF-8).
        InvalidInput: deeper than :data:`MAX_DEPTH`, or holding a NUL character (neither can be stored).
    """
    if not raw:
        return None
    if content_type in _JSON_TYPES or content_type.endswith("+json"):
        value = _json(raw)
    elif content_type == _FORM_TYPE:
        value = _form(_decoded(raw, charset, content_type))
    else:
        value = _decoded(raw, charset, content_type)
    _check_storable(value, "body")
    return value


def _json(raw: bytes) -> JsonValue:
    try:
        value: JsonValue = json.loads(raw, parse_constant=parse_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is sent as JSON but is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise InvalidInput(
            f"the body is nested too deeply (at most {MAX_DEPTH} levels)",
            errors=[FieldError(path="/body", message="nested too deeply")],
        ) from exc
    return value


def _decoded(raw: bytes, charset: str | None, content_type: str) -> str:
    try:
        return raw.decode(charset or "utf-8")
    except LookupError as exc:
        raise UnsupportedMediaType(f"unknown charset {charset!r} in Content-Type") from exc
    except UnicodeDecodeError as exc:
        raise UnsupportedMediaType(
            f"the {content_type} body is not text in {charset or 'UTF-8'}: send JSON, a form or text "
            "(binary bodies are not accepted)"
        ) from exc


def _form(text: str) -> dict[str, JsonValue]:
    try:
        pairs = parse_qsl(text, keep_blank_values=True, errors="strict", max_num_fields=MAX_FORM_FIELDS)
    except UnicodeDecodeError as exc:
        raise BadRequest("the form body has percent-encoded bytes that are not UTF-8") from exc
    except ValueError as exc:
        raise BadRequest(f"the form body has more than {MAX_FORM_FIELDS} fields") from exc
    return _grouped(pairs)


def _check_storable(value: JsonValue, where: str) -> None:
    """Refuse what PostgreSQL ``jsonb`` cannot hold (NUL), numbers not finite or beyond 64 bits, deep nesting."""
    stack: list[tuple[JsonValue, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if _UNSTORABLE.search(item):
                raise InvalidInput(
                    f"the {where} holds a NUL character (\\u0000) or an unpaired surrogate, which cannot be stored; "
                    "remove it",
                    errors=[FieldError(path=f"/{where}", message="contains \\u0000")],
                )
        elif (problem := number_problem(item)) is not None:
            raise InvalidInput(
                f"the {where} holds a number that {problem}", errors=[FieldError(path=f"/{where}", message=problem)]
            )
        elif isinstance(item, dict | list):
            if depth >= MAX_DEPTH:
                raise InvalidInput(
                    f"the {where} is nested too deeply (at most {MAX_DEPTH} levels)",
                    errors=[FieldError(path=f"/{where}", message="nested too deeply")],
                )
            if isinstance(item, dict):
                stack.extend((k, depth + 1) for k in item)
                stack.extend((v, depth + 1) for v in item.values())
            else:
                stack.extend((v, depth + 1) for v in item)


def run_input(body: JsonValue, headers: dict[str, str], query: dict[str, JsonValue]) -> dict[str, JsonValue]:
    """The input of the run a delivery starts: the body, the headers and the query, as the flow's ``input``.

    Raises:
        InvalidInput: a header or query value holds a NUL character.
    """
    plain_headers: dict[str, JsonValue] = dict(headers)
    _check_storable(plain_headers, "headers")
    _check_storable(query, "query")
    return {"body": body, "headers": plain_headers, "query": query}


# --- the trigger behind a token --------------------------------------------------------------------


def plausible_token(token: str) -> bool:
    """Whether a URL token can be one Flowmesh issued (others are 404 without asking the flows service)."""
    return _TOKEN.fullmatch(token) is not None


@dataclass(frozen=True, slots=True)
class Hook:
    """What the gateway needs of a webhook trigger to accept a delivery."""

    trigger_id: str
    flow_id: str
    tenant_id: str
    enabled: bool
    flow_active: bool
    published: bool
    signed: bool
    keys: tuple[bytes, ...]

    @classmethod
    def of(cls, target: WebhookTarget) -> Hook:
        """From the flows service's answer; a signed trigger without a usable secret accepts nothing."""
        keys = []
        for secret in target.signing_secrets:
            try:
                keys.append(signing_key(secret))
            except ValueError:
                continue
        return cls(
            trigger_id=target.trigger.id,
            flow_id=target.trigger.flow_id,
            tenant_id=target.tenant_id,
            enabled=target.trigger.enabled,
            flow_active=target.flow_active,
            published=target.published,
            # fail closed: a trigger with a secret is signed whatever its config says
            signed=bool(target.trigger.config.get("signed")) or bool(target.signing_secrets),
            keys=tuple(keys),
        )

    def check_accepting(self) -> None:
        """Whether deliveries may start runs now.

        Raises:
            Conflict: the trigger is disabled, or its flow is deactivated or unpublished.
        """
        if not self.enabled:
            raise Conflict(
                "this webhook's trigger is disabled; its owner can enable it with PATCH /api/v1/triggers/{id} "
                '{"enabled": true}'
            )
        if not self.published:
            raise Conflict("this webhook's flow has no published version; its owner must publish it first")
        if not self.flow_active:
            raise Conflict(
                "this webhook's flow is deactivated; its owner can activate it with POST /api/v1/flows/{id}/activate"
            )


def not_found() -> NotFound:
    """The answer for a token that names no webhook (the same whatever the reason)."""
    return NotFound("no webhook has this URL; check it, or create a webhook trigger to get one")
