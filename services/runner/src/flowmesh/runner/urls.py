"""The URL of an ``http`` step, rendered so a template value cannot rewrite it, and what a redirect keeps.

A ``{{ expr }}`` in the URL's path is placed as one percent-encoded path segment, in its query as one
percent-encoded query value (or key), in its fragment percent-encoded too: ``/` ``?`` ``#`` ``&``
``=`` and ``%`` in a value stay data, and a value of ``.`` or ``..`` is sent as ``%2E`` (never a dot
segment the URL would resolve). A ``{{ expr }}`` in the scheme or authority, or a template that is
the whole URL, is placed as written (a flow may hold its base URL in a variable). Which part a value
lands in is read from the text before it, as rendered so far.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping
from typing import Any, Final, Literal
from urllib.parse import quote

from yarl import URL

from flowmesh.contracts.credentials import CREDENTIAL_HEADER
from flowmesh.contracts.expressions import evaluate, render

_TEMPLATE: Final = re.compile(r"\{\{(.*?)\}\}", re.S)
_WHOLE: Final = re.compile(r"^\s*\{\{(.*?)\}\}\s*$", re.S)
_SCHEME_AUTHORITY: Final = re.compile(r"\s*[A-Za-z][A-Za-z0-9+.\-]*:(?://[^/?#]*)?")

Part = Literal["authority", "path", "query", "fragment"]


def render_url(template: str, context: Mapping[str, Any]) -> URL:
    """The URL of ``template`` with every ``{{ expr }}`` encoded for the part it lands in.

    Raises:
        ExpressionError: a template does not evaluate.
    """
    whole = _WHOLE.match(template)
    if (whole and "{{" not in whole.group(1)) or "{{" not in template:
        return URL(str(render(template, context)))
    # path, query and fragment values go in as placeholders, so parsing the URL (which normalizes
    # the author's text) never reads them; each is then replaced by its encoded text
    marker = "fm" + secrets.token_hex(8)
    text, end = "", 0
    placed: list[str] = []
    for match in _TEMPLATE.finditer(template):
        text += template[end : match.start()]
        end = match.end()
        value = _as_text(evaluate(match.group(1).strip(), context))
        part = url_part(text)
        if part == "authority":
            text += value
        else:
            text += f"{marker}x{len(placed)}x"
            placed.append(_encode(value, part))
    text += template[end:]
    if not placed:
        return URL(text)
    encoded = str(URL(text))
    for i, value in enumerate(placed):
        encoded = encoded.replace(f"{marker}x{i}x", value)
    return URL(encoded, encoded=True)


def url_part(prefix: str) -> Part:
    """Where the next character of a URL whose text so far is ``prefix`` lands."""
    start = _SCHEME_AUTHORITY.match(prefix)
    if start is None or start.end() == len(prefix):
        return "authority"
    rest = prefix[start.end() :]
    if "#" in rest:
        return "fragment"
    if "?" in rest:
        return "query"
    return "path"


def same_origin(a: URL, b: URL) -> bool:
    """The same scheme, host and port (a default port written out or not)."""
    return (a.scheme.lower(), (a.host or "").lower(), a.port) == (b.scheme.lower(), (b.host or "").lower(), b.port)


def without_credentials(headers: Mapping[str, str]) -> dict[str, str]:
    """``headers`` less those whose name says they carry credentials (``Authorization``, ``Cookie``,
    ``X-Api-Key``, …: :data:`flowmesh.contracts.credentials.CREDENTIAL_HEADER`)."""
    return {k: v for k, v in headers.items() if not CREDENTIAL_HEADER.search(k)}


def _encode(value: str, part: Part) -> str:
    if part == "path" and value and set(value) == {"."}:
        return "%2E" * len(value)
    return quote(value, safe="")


def _as_text(value: Any) -> str:
    """As :func:`render` places a value inside a string: a string as is, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
