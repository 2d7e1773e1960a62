"""Helpers for the CLI tests: bounded waits on conditions, and checks that processes are gone."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import psutil  # type: ignore[import-untyped]
import pytest

WaitUntil = Callable[..., None]


def _wait_until(condition: Callable[[], object], *, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def _alive(proc: psutil.Process) -> bool:
    # A zombie has exited; only init can reap an orphaned one, so it does not count.
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _assert_gone(procs: Iterable[psutil.Process], timeout: float = 10.0) -> None:
    procs = list(procs)
    _wait_until(
        lambda: not any(_alive(proc) for proc in procs),
        timeout=timeout,
        what="processes to exit: " + ", ".join(str(proc.pid) for proc in procs if _alive(proc)),
    )


@pytest.fixture
def wait_until() -> WaitUntil:
    """``wait_until(condition, timeout=..., what=...)``: poll until true, fail after the timeout."""
    return _wait_until


@pytest.fixture
def assert_gone() -> Callable[..., None]:
    """``assert_gone(procs, timeout=...)``: fail unless every psutil.Process has exited in time."""
    return _assert_gone
