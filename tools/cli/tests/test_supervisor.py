"""The dev supervisor: prefixed output, restarts with backoff, and a stop that leaves no child."""

from __future__ import annotations

import asyncio
import io
import os
import sys
import time
from collections.abc import Callable

import psutil  # type: ignore[import-untyped]
import pytest

from flowmesh.cli.supervisor import ServiceSpec, Supervisor, colour_enabled


def _python(code: str, name: str) -> ServiceSpec:
    return ServiceSpec(name=name, argv=[sys.executable, "-c", code], env=dict(os.environ))


async def _until(condition: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


_FOREVER = "import time\nwhile True: time.sleep(1)"


async def test_each_line_is_prefixed_with_the_padded_service_name() -> None:
    out = io.StringIO()
    supervisor = Supervisor(
        [
            _python("print('one'); print('two', flush=True)\n" + _FOREVER, "gateway"),
            _python("import sys; sys.stderr.write('oops\\n'); sys.stderr.flush()\n" + _FOREVER, "usage"),
            _python("print('no newline', end='', flush=True)\nraise SystemExit(0)", "flows"),
        ],
        colour=False,
        stream=out,
    )
    await supervisor.start()
    try:
        await _until(
            lambda: all(
                expected in out.getvalue()
                for expected in ("gateway  | two", "usage    | oops", "flows    | no newline")
            ),
            what="every line",
        )
    finally:
        await supervisor.stop()
    lines = out.getvalue().splitlines()
    assert "gateway  | one" in lines
    assert "gateway  | two" in lines
    assert "usage    | oops" in lines, "stderr is shown too"
    assert "flows    | no newline" in lines, "a last line without newline is not lost"
    assert "\x1b[" not in out.getvalue()


async def test_prefixes_are_coloured_when_asked() -> None:
    out = io.StringIO()
    supervisor = Supervisor([_python("print('hi', flush=True)\n" + _FOREVER, "runner")], colour=True, stream=out)
    await supervisor.start()
    try:
        await _until(lambda: "hi" in out.getvalue(), what="output")
    finally:
        await supervisor.stop()
    assert "\x1b[36mrunner  \x1b[0m | hi" in out.getvalue()


def test_colour_is_off_for_pipes_and_with_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not colour_enabled(io.StringIO())

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert colour_enabled(Tty())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not colour_enabled(Tty())


async def test_a_child_that_exits_is_restarted_with_growing_backoff() -> None:
    out = io.StringIO()
    supervisor = Supervisor(
        [_python("print('started', flush=True); raise SystemExit(3)", "flaky")], colour=False, stream=out
    )
    began = time.monotonic()
    await supervisor.start()
    try:
        await _until(lambda: out.getvalue().count("flaky    | started") >= 3, what="two restarts")
    finally:
        await supervisor.stop()
    elapsed = time.monotonic() - began
    text = out.getvalue()
    assert supervisor.starts()["flaky"] >= 3
    assert "exited with code 3" in text
    assert "restarting in 0.5 s" in text
    assert "restarting in 1 s" in text
    assert elapsed >= 1.5, "the second restart waits 0.5 s + 1 s"


async def test_a_child_killed_from_outside_is_restarted() -> None:
    out = io.StringIO()
    supervisor = Supervisor([_python(_FOREVER, "runner")], colour=False, stream=out)
    await supervisor.start()
    try:
        first = supervisor.pids()["runner"]
        assert first is not None
        os.kill(first, 9)
        await _until(lambda: supervisor.pids()["runner"] not in (None, first), what="a new runner process")
        assert "exited with signal SIGKILL" in out.getvalue()
    finally:
        await supervisor.stop()


async def test_stop_leaves_no_child_alive_even_one_ignoring_sigterm() -> None:
    stubborn = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('up', flush=True)\n"
    out = io.StringIO()
    supervisor = Supervisor(
        [
            _python(stubborn + _FOREVER, "stubborn"),
            _python(_FOREVER, "polite"),
            _python("raise SystemExit(1)", "crashy"),
        ],
        colour=False,
        stream=out,
        stop_timeout=0.5,
    )
    await supervisor.start()
    await _until(lambda: "stubborn | up" in out.getvalue(), what="the SIGTERM handler to be installed")
    pids = supervisor.pids()
    procs = [psutil.Process(pids[name]) for name in ("stubborn", "polite")]
    await supervisor.stop()
    assert all(not proc.is_running() for proc in procs)
    assert supervisor.pids() == {"stubborn": None, "polite": None, "crashy": None}
    await supervisor.stop()  # idempotent


async def test_a_missing_program_is_reported_and_retried() -> None:
    out = io.StringIO()
    supervisor = Supervisor(
        [ServiceSpec("ghost", ["/nonexistent/program"], dict(os.environ))], colour=False, stream=out
    )
    await supervisor.start()
    try:
        await _until(lambda: out.getvalue().count("failure to start") >= 2, what="a retry")
    finally:
        await supervisor.stop()
    assert supervisor.starts() == {"ghost": 0}


def test_service_names_must_be_unique() -> None:
    with pytest.raises(ValueError, match="unique"):
        Supervisor([_python("", "a"), _python("", "a")], colour=False)
