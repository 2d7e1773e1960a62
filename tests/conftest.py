"""One stack of service processes for the whole session: the end-to-end and the security tests share it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest

from stack import ProcessStack
from upstream import Upstream


@pytest.fixture(scope="session")
def stack(infra, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessStack]:  # type: ignore[no-untyped-def]
    with ProcessStack(infra.nats_url, infra.database_url, tmp_path_factory.mktemp("stack")) as s:
        yield s


@pytest.fixture
def alice(stack: ProcessStack) -> Iterator[httpx.Client]:
    with stack.client(f"alice-{uuid.uuid4().hex[:8]}") as c:
        yield c


@pytest.fixture
def mallory(stack: ProcessStack) -> Iterator[httpx.Client]:
    with stack.client(f"mallory-{uuid.uuid4().hex[:8]}") as c:
        yield c


@pytest.fixture(scope="session")
def upstream() -> Iterator[Upstream]:
    u = Upstream()
    yield u
    u.close()
