"""The services' event loop: uvloop by default, asyncio's own when configured, chosen by a setting."""

from __future__ import annotations

import asyncio

import pytest
import uvloop
from pydantic import ValidationError

from flowmesh.runtime.loop import run
from flowmesh.runtime.settings import BaseServiceSettings


async def _loop_class() -> type:
    return type(asyncio.get_running_loop())


@pytest.fixture(autouse=True)
def _dev(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWMESH_ENV", "dev")  # production asks for NATS credentials first


def test_a_service_runs_on_uvloop_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLOWMESH_EVENT_LOOP", raising=False)
    default = BaseServiceSettings().event_loop
    assert default == "uvloop"
    assert run(_loop_class(), kind=default) is uvloop.Loop

    monkeypatch.setenv("FLOWMESH_EVENT_LOOP", "asyncio")
    kind = BaseServiceSettings().event_loop
    loop_class = run(_loop_class(), kind=kind)
    assert loop_class is not uvloop.Loop and issubclass(loop_class, asyncio.BaseEventLoop)


def test_an_unknown_event_loop_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWMESH_EVENT_LOOP", "trio")
    with pytest.raises(ValidationError, match=r"event_loop|FLOWMESH_EVENT_LOOP"):
        BaseServiceSettings()
