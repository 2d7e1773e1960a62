"""Tenants for the OWASP API Security tests: two strangers on the session's stack (``tests/conftest.py``).

``victim`` owns things; ``attacker`` is another tenant with a valid token of its own, as anyone
who signs up is. Each module's tenants are new, so no module sees another's data.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest

from stack import ProcessStack


@pytest.fixture(scope="module")
def victim(stack: ProcessStack) -> Iterator[httpx.Client]:
    with stack.client(f"victim-{uuid.uuid4().hex[:8]}") as c:
        yield c


@pytest.fixture(scope="module")
def attacker(stack: ProcessStack) -> Iterator[httpx.Client]:
    with stack.client(f"attacker-{uuid.uuid4().hex[:8]}") as c:
        yield c
