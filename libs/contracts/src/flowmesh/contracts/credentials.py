"""What counts as a credential by its name: header names and query parameter names.

One rule for the runner (a redirect to another origin drops credential headers; a step's recorded
input hides their values) and for validation (a literal value under such a name is warned about).
"""

from __future__ import annotations

import re
from typing import Final

CREDENTIAL_HEADER: Final = re.compile(
    r"auth|cookie|token|secret|passw|session|credential|api[-_]?key|access[-_]?key|subscription[-_]?key|signature",
    re.I,
)
"""Header names that carry credentials: ``Authorization``, ``Proxy-Authorization``, ``Cookie``, and
API-key-like names (``X-Api-Key``, ``X-Auth-Token``, ``Private-Token``, ``X-Amz-Signature``, …)."""

CREDENTIAL_PARAM: Final = re.compile(rf"{CREDENTIAL_HEADER.pattern}|^(key|sig|code)$", re.I)
"""Query parameter names that carry credentials: those of :data:`CREDENTIAL_HEADER` (``api_key``,
``access_token``, ``X-Amz-Signature``, …) and exactly ``key``, ``sig`` or ``code``."""
