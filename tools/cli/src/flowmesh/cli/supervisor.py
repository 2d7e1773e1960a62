"""A small process supervisor for the dev stack, in the spirit of a Kubernetes Deployment.

Each service runs as a child process whose output (stdout and stderr, merged) is printed line by
line behind a coloured, padded name; a child that exits while the supervisor is running is
started again after an exponential backoff. One asyncio loop reads every pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TextIO

from flowmesh.cli.embedded import die_with_parent

__all__ = [
    "BACKOFF_INITIAL",
    "BACKOFF_MAX",
    "BACKOFF_RESET_AFTER",
    "SUPERVISOR_COLOUR",
    "SUPERVISOR_NAME",
    "ServiceSpec",
    "Supervisor",
    "colour_enabled",
    "prefix",
    "prefix_width",
]

BACKOFF_INITIAL = 0.5
"""Seconds before the first restart of a service that exited."""
BACKOFF_MAX = 10.0
"""Upper bound of the restart delay, which doubles on every quick exit."""
BACKOFF_RESET_AFTER = 30.0
"""A service that stayed up this long restarts after ``BACKOFF_INITIAL`` again."""
STOP_TIMEOUT = 10.0
"""Seconds a child gets between SIGTERM and SIGKILL."""

# A line longer than this is printed in pieces.
_LINE_LIMIT = 1024 * 1024
# Once the child has exited, how long to keep reading output that is still in the pipe: a
# grandchild holding the pipe open must not stall the restart.
_DRAIN_TIMEOUT = 2.0
_COLOURS = ("36", "33", "32", "35", "34", "96", "93", "92", "95", "94")
SUPERVISOR_NAME = "flowmesh"
"""Name in front of the supervisor's own lines."""
SUPERVISOR_COLOUR = "1"
"""ANSI style of the supervisor's own name: bold, apart from the services' colours."""


def prefix(name: str, *, width: int, colour: str | None) -> str:
    """Format the ``name | `` prefix of an output line.

    Args:
        name: Service (or supervisor) name.
        width: Width the name is padded to, so that the bars line up.
        colour: ANSI SGR code (e.g. ``"36"``), or None for plain text.

    Returns:
        The prefix, ending with ``" | "``.
    """
    padded = name.ljust(width)
    return (f"\x1b[{colour}m{padded}\x1b[0m" if colour else padded) + " | "


def prefix_width(names: Sequence[str]) -> int:
    """Width that lines up the prefixes of ``names`` and the supervisor's own."""
    return max([len(name) for name in names] + [len(SUPERVISOR_NAME)])


def colour_enabled(stream: TextIO) -> bool:
    """Whether output to ``stream`` should be coloured.

    Args:
        stream: Where the lines go.

    Returns:
        True when ``stream`` is a terminal and ``NO_COLOR`` is unset (https://no-color.org).
    """
    if os.environ.get("NO_COLOR"):
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


@dataclass(frozen=True)
class ServiceSpec:
    """How to run one service.

    Attributes:
        name: Short name shown in front of each line of its output.
        argv: Program and arguments.
        env: The child's complete environment (not merged with ours).
    """

    name: str
    argv: list[str]
    env: dict[str, str]


@dataclass
class _Child:
    spec: ServiceSpec
    transport: asyncio.SubprocessTransport | None = None
    starts: int = 0
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class Supervisor:
    """Runs services as child processes, prefixes their output and restarts them when they exit.

    Use ``await start()`` once, then ``await stop()``; ``stop()`` leaves no child running.
    """

    def __init__(
        self,
        specs: Sequence[ServiceSpec],
        *,
        colour: bool,
        stream: TextIO | None = None,
        stop_timeout: float = STOP_TIMEOUT,
    ) -> None:
        """Prepare the supervisor; nothing starts until ``start()``.

        Args:
            specs: The services, with unique names.
            colour: Colour the name prefixes (see ``colour_enabled``).
            stream: Where lines are written; ``sys.stdout`` (looked up at write time) when None.
            stop_timeout: Seconds between SIGTERM and SIGKILL in ``stop()``.
        """
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names) or SUPERVISOR_NAME in names:
            raise ValueError(f"service names must be unique and not {SUPERVISOR_NAME!r}: {names}")
        self._children = {spec.name: _Child(spec) for spec in specs}
        self._stream = stream
        self._stop_timeout = stop_timeout
        self._stopping = asyncio.Event()
        self._started = False
        width = prefix_width(names)
        self._prefixes = {
            name: prefix(name, width=width, colour=_COLOURS[i % len(_COLOURS)] if colour else None)
            for i, name in enumerate(names)
        }
        self._prefixes[SUPERVISOR_NAME] = prefix(
            SUPERVISOR_NAME, width=width, colour=SUPERVISOR_COLOUR if colour else None
        )

    # -- public ----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every service; returns once each child process has been spawned (or failed to)."""
        if self._started:
            raise RuntimeError("supervisor already started")
        self._started = True
        spawned = []
        for child in self._children.values():
            ready = asyncio.Event()
            name = f"supervise {child.spec.name}"
            child.task = asyncio.create_task(self._keep_running(child, ready), name=name)
            spawned.append(ready.wait())
        await asyncio.gather(*spawned)

    async def stop(self) -> None:
        """Stop every child: SIGTERM by PID, wait up to the stop timeout, then SIGKILL. Idempotent."""
        self._stopping.set()
        tasks = [child.task for child in self._children.values() if child.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def stopping(self) -> bool:
        """Whether ``stop()`` has been called."""
        return self._stopping.is_set()

    def pids(self) -> dict[str, int | None]:
        """PID of each service's current process, None while it is not running."""
        pids: dict[str, int | None] = {}
        for name, child in self._children.items():
            transport = child.transport
            running = transport is not None and transport.get_returncode() is None
            pids[name] = transport.get_pid() if transport is not None and running else None
        return pids

    def starts(self) -> dict[str, int]:
        """How many times each service has been started (1 + restarts)."""
        return {name: child.starts for name, child in self._children.items()}

    def log(self, message: str) -> None:
        """Print a line under the supervisor's own prefix."""
        self._write(SUPERVISOR_NAME, message)

    # -- internals -------------------------------------------------------------------------------

    def _write(self, name: str, line: str) -> None:
        stream = self._stream if self._stream is not None else sys.stdout
        try:
            stream.write(f"{self._prefixes[name]}{line}\n")
            stream.flush()
        except (BrokenPipeError, ValueError):
            # Nobody reads our output any more (`flowmesh dev | head`, a closed terminal): keep
            # supervising, which matters more than the lost lines.
            pass

    async def _keep_running(self, child: _Child, spawned: asyncio.Event) -> None:
        """Run one service until ``stop()``, restarting it with backoff whenever it exits."""
        name = child.spec.name
        delay = BACKOFF_INITIAL
        try:
            while not self._stopping.is_set():
                started_at = time.monotonic()
                code = await self._run_once(child, spawned)
                if self._stopping.is_set():
                    break
                uptime = time.monotonic() - started_at
                if uptime >= BACKOFF_RESET_AFTER:
                    delay = BACKOFF_INITIAL
                how = f"exited with {_describe(code)} after {uptime:.1f} s"
                self._write(name, f"{how}, restarting in {delay:g} s")
                # The delay also covers the case where a Ctrl-C reached the whole process group:
                # the children die at once, and by the time it elapses stop() has been called.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                delay = min(delay * 2, BACKOFF_MAX)
        finally:
            spawned.set()

    async def _until_stopping(self) -> None:
        await self._stopping.wait()

    async def _run_once(self, child: _Child, spawned: asyncio.Event) -> int | str:
        """Start the child, print its output until it exits or ``stop()``; return its exit code."""
        spec = child.spec
        loop = asyncio.get_running_loop()
        protocol = _ChildProtocol(loop, lambda line: self._write(spec.name, line))
        try:
            transport, _ = await loop.subprocess_exec(
                lambda: protocol,
                *spec.argv,
                env=spec.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
        except OSError as exc:
            spawned.set()
            return f"failure to start ({exc})"
        child.transport = transport
        child.starts += 1
        spawned.set()
        pid = transport.get_pid()
        stopping = asyncio.ensure_future(self._until_stopping())
        try:
            await asyncio.wait([protocol.exited, stopping], return_when=asyncio.FIRST_COMPLETED)
            if not protocol.exited.done():
                _kill(pid, signal.SIGTERM)
                try:
                    await asyncio.wait_for(asyncio.shield(protocol.exited), self._stop_timeout)
                except TimeoutError:
                    _kill(pid, signal.SIGKILL)
                    await protocol.exited
            # Output written just before exiting may still be in the pipe; a grandchild holding
            # the pipe open must not stall the restart, hence the bound.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(protocol.drained), _DRAIN_TIMEOUT)
        finally:
            stopping.cancel()
            if transport.get_returncode() is None:  # only when cancelled: never leave the child behind
                _kill(pid, signal.SIGKILL)
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(protocol.exited)
            protocol.flush()
            transport.close()
        code = transport.get_returncode()
        assert code is not None
        return code


class _ChildProtocol(asyncio.SubprocessProtocol):
    """Splits a child's merged stdout/stderr into lines and reports its exit.

    A protocol rather than ``asyncio.subprocess.Process``: on Python 3.11 ``Process.wait()`` only
    returns once every pipe is closed, so a grandchild keeping the pipe open would hide the exit.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, on_line: Callable[[str], None]) -> None:
        self._on_line = on_line
        self._buffer = bytearray()
        self.exited: asyncio.Future[None] = loop.create_future()
        self.drained: asyncio.Future[None] = loop.create_future()

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        self._buffer += data
        while (end := self._buffer.find(b"\n")) >= 0:
            self._emit(self._buffer[:end])
            del self._buffer[: end + 1]
        if len(self._buffer) > _LINE_LIMIT:
            # A runaway line without newline is printed in pieces rather than held in memory.
            self.flush()

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        self.flush()
        if not self.drained.done():
            self.drained.set_result(None)

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)

    def flush(self) -> None:
        """Emit a trailing line that has no newline yet."""
        if self._buffer:
            self._emit(self._buffer)
            self._buffer.clear()

    def _emit(self, raw: bytes | bytearray) -> None:
        self._on_line(bytes(raw).decode("utf-8", errors="replace").rstrip("\r"))


def _kill(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _describe(code: int | str) -> str:
    if isinstance(code, str):
        return code
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"
