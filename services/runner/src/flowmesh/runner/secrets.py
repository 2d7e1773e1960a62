"""Tenant secrets in ``http`` and ``llm`` steps, and what a step records instead of credentials.

A step's templates read a secret as ``{{ secrets.NAME }}``. Its values are asked of the usage
service (``fm.rpc.usage.secrets.reveal``, as the runner's role) on every attempt, put in the
context of that attempt only, and never recorded: :class:`Redactor` replaces each value (and the
encoded forms a URL, a JSON text or a Basic header give it) with ``[secret:NAME]`` in everything the
attempt reports, whatever an echoing server sent back.

Literal credentials are kept out of records too (:func:`redact_request`): the recorded value of a
header with a credential's name (``Authorization``, ``Cookie``, ``Proxy-Authorization``,
``X-Api-Key``, …) and of a query parameter with a key-like name (``api_key``, ``access_token``,
``key``, …; both rules in :mod:`flowmesh.contracts.credentials`) is ``[redacted]``, unless it holds
secrets (then it shows their ``[secret:NAME]``).
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final
from urllib.parse import quote, quote_plus

from yarl import URL

from flowmesh.contracts.credentials import CREDENTIAL_HEADER, CREDENTIAL_PARAM
from flowmesh.contracts.errors import FlowmeshError, GatewayTimeout, ServiceUnavailable
from flowmesh.contracts.expressions import iter_templates, referenced_secrets
from flowmesh.contracts.models.usage import KEYS_REVEAL_ROLE, RevealedSecrets, RevealSecrets
from flowmesh.contracts.subjects import UsageOp
from flowmesh.runner.outcome import Outcome
from flowmesh.runtime.rpc import RpcClient

REDACTED: Final = "[redacted]"
_PLACEHOLDER: Final = "[secret:"
MIN_LITERAL: Final = 8
"""Literal credentials shorter than this are hidden in the recorded request only: removing every
occurrence of a short string from a response would garble it (secrets are removed whatever their size)."""

SecretReveal = Callable[[str, list[str]], Awaitable[RevealedSecrets]]
"""``(tenant, names) -> values and missing names``: the tenant's stored secrets."""


def usage_secret_reveal(client: RpcClient, *, timeout: float | None = None) -> SecretReveal:
    """Secrets from the usage service's vault (``fm.rpc.usage.secrets.reveal``, as the runner's role)."""

    async def reveal(tenant: str, names: list[str]) -> RevealedSecrets:
        answer = await client.call(
            UsageOp.SECRETS_REVEAL,
            RevealSecrets(names=names),
            tenant=tenant,
            role=KEYS_REVEAL_ROLE,
            timeout=timeout,
        )
        return RevealedSecrets.model_validate(answer)

    return reveal


def step_secrets(data: Any) -> list[str]:
    """The secret names a step's data reads (``secrets.NAME`` in its templates), sorted.

    Validation refuses any other use of ``secrets`` before a flow is published.
    """
    found: set[str] = set()
    for _, source in iter_templates(data):
        found |= referenced_secrets(source) or frozenset()
    return sorted(found)


def _forms(value: str) -> Iterable[str]:
    """How a value may appear in a record: as is, percent-encoded, as JSON text, base64."""
    yield value
    yield quote(value, safe="")
    yield quote_plus(value)
    yield URL.build(query={"q": value}).raw_query_string[2:]
    yield URL.build(path="/" + value).raw_path[1:]
    yield json.dumps(value)[1:-1]
    yield base64.b64encode(value.encode()).decode()


@dataclass(frozen=True, slots=True)
class Redactor:
    """Replaces the values of a step's secrets with ``[secret:NAME]`` in whatever it is given."""

    values: Mapping[str, str] = field(default_factory=dict)
    literals: tuple[str, ...] = ()
    """Literal credentials the step sent (written in its definition): replaced with ``[redacted]``."""
    _placeholders: dict[str, str] = field(default_factory=dict, init=False)
    _pattern: list[re.Pattern[str]] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        for name, value in self.values.items():
            for form in _forms(value):
                if form:
                    self._placeholders.setdefault(form, f"[secret:{name}]")
        for literal in self.literals:
            for form in _forms(literal):
                if len(form) >= MIN_LITERAL:
                    self._placeholders.setdefault(form, REDACTED)
        if self._placeholders:
            # one pass, longest first: a value holding another secret's value is replaced whole, and
            # a placeholder already put in is never read again (a one-letter secret cannot garble it)
            ordered = sorted(self._placeholders, key=len, reverse=True)
            self._pattern.append(re.compile("|".join(map(re.escape, ordered))))

    def text(self, value: str) -> str:
        """``value`` with every form of every secret replaced."""
        if not self._pattern:
            return value
        return self._pattern[0].sub(lambda m: self._placeholders[m.group(0)], value)

    def scrub(self, value: Any) -> Any:
        """A JSON value with every string (keys too) redacted."""
        if not self._pattern:
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.text(str(k)): self.scrub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.scrub(v) for v in value]
        return value

    def _scrub_record(self, record: Any) -> Any:
        """A recorded request redacted, its own keys (``url``, ``headers``, …) kept as they are."""
        if isinstance(record, dict):
            return {k: self.scrub(v) for k, v in record.items()}
        return self.scrub(record)

    def outcome(self, outcome: Outcome) -> Outcome:
        """The outcome with its output, input and message redacted (a server may echo a secret).

        The literal credentials of the request (see :func:`redact_request`) are removed from the
        output and the message too, as ``[redacted]``.
        """
        literals = tuple(v for v in credential_literals(outcome.input) if not self._holds(v))
        redactor = Redactor(self.values, literals) if literals else self
        return replace(
            outcome,
            output=redactor.scrub(outcome.output),
            input=redact_request(redactor._scrub_record(outcome.input)),
            message=redactor.text(outcome.message),
        )

    def _holds(self, value: str) -> bool:
        return bool(self._pattern) and self._pattern[0].search(value) is not None


def redact_request(record: Any) -> Any:
    """A recorded request with literal credentials hidden: credential headers, key-like query values.

    A credential whose secrets were already replaced keeps its placeholders: the record then shows
    which secret went there (``Bearer [secret:TOKEN]``) rather than ``[redacted]``.
    """
    if not isinstance(record, dict):
        return record
    found = dict(record)
    if isinstance(found.get("headers"), dict):
        found["headers"] = {k: _hidden(v) if CREDENTIAL_HEADER.search(k) else v for k, v in found["headers"].items()}
    if isinstance(found.get("query"), dict):
        found["query"] = {k: _hidden(v) if CREDENTIAL_PARAM.search(k) else v for k, v in found["query"].items()}
    if isinstance(found.get("url"), str):
        found["url"] = redact_url(found["url"])
    return found


def credential_literals(record: Any) -> list[str]:
    """The values a recorded request sent as credentials: credential headers (and the token after
    an ``Authorization`` scheme), key-like query parameters, in its query or in its URL."""
    if not isinstance(record, dict):
        return []
    found: list[str] = []
    headers = record.get("headers")
    for name, value in headers.items() if isinstance(headers, dict) else ():
        if CREDENTIAL_HEADER.search(name) and isinstance(value, str):
            found += [value, value.partition(" ")[2]]
    query = record.get("query")
    pairs = list(query.items()) if isinstance(query, dict) else []
    if isinstance(record.get("url"), str):
        with contextlib.suppress(ValueError):
            pairs += list(URL(record["url"]).query.items())
    found += [v for k, v in pairs if CREDENTIAL_PARAM.search(k) and isinstance(v, str)]
    return [v for v in found if len(v) >= MIN_LITERAL]


def redact_url(url: str) -> str:
    """A URL with its password and the values of key-like query parameters hidden."""
    try:
        parsed = URL(url, encoded=True)
    except ValueError:
        return url
    if parsed.raw_password is not None and _PLACEHOLDER not in parsed.raw_password:
        parsed = parsed.with_password("redacted")
    if not any(CREDENTIAL_PARAM.search(k) for k in parsed.query):
        return str(parsed)
    pairs = [p.partition("=") for p in parsed.raw_query_string.split("&")]
    raw = "&".join(k + s + (_hidden(v) if CREDENTIAL_PARAM.search(k) else v) for k, s, v in pairs)
    base = str(parsed.with_query(None).with_fragment(None))
    return base + "?" + raw + (f"#{parsed.raw_fragment}" if parsed.raw_fragment else "")


def _hidden(value: Any) -> Any:
    """A credential's recorded value: as is when made of secrets (already replaced), else ``[redacted]``."""
    if isinstance(value, str) and _PLACEHOLDER in value:
        return value
    return REDACTED


async def resolve(reveal: SecretReveal | None, tenant: str, names: list[str]) -> Redactor | Outcome:
    """The values of a step's secrets (as the redactor of its attempt), or the failure to record.

    A name the tenant has not stored fails the step for good (``secret-missing``); a vault that cannot
    answer now is worth another attempt (``secret-unavailable``).
    """
    if not names:
        return Redactor()
    if reveal is None:
        return Outcome.failure("this runner cannot read secrets (no vault configured)", "configuration")
    try:
        found = await reveal(tenant, names)
    except (ServiceUnavailable, GatewayTimeout) as exc:
        return Outcome.failure(
            f"the step's secrets cannot be read now: {exc.detail}", "secret-unavailable", retryable=True
        )
    except FlowmeshError as exc:
        return Outcome.failure(f"the step's secrets cannot be used: {exc.detail}", "configuration")
    if found.missing:
        missing = ", ".join(found.missing)
        return Outcome.failure(
            f"secret(s) {missing} not stored for this tenant; add them with POST /api/v1/secrets", "secret-missing"
        )
    return Redactor(found.values)
