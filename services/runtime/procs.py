"""Child processes: start one with its output in a log, wait for a line, stop it.

What `escapement up`, the tests and the load generator do with the processes
they start (nats-server, workers, an edge, a whole `escapement up`):

- `spawn(args, log_path)`: stdin from /dev/null, stdout and stderr appended
  to `log_path` (or inherited when it is None).
- `Child.wait_for(pattern, within)` (and `wait_for_async`): the first match
  of a regex in what the child wrote; `ChildExited`, with the log's tail, if
  it exits first.
- `Child.stop(grace)` (and `stop_async`): SIGTERM, wait `grace`, SIGKILL.
- Ports: a child that binds port 0 (nats-server's `-p -1`, the edge's port 0)
  and reports the port it got cannot race anyone for it. `free_port()` is for
  the few places that need a number before the child starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

POLL_S = 0.05
TAIL_CHARS = 3000


class ProcError(RuntimeError):
    """A child process did not do what was waited for."""

    def __init__(self, message: str, name: str, tail: str) -> None:
        super().__init__(f"{message}\n{tail}" if tail else message)
        self.name = name
        self.tail = tail


class ChildExited(ProcError):
    def __init__(self, name: str, returncode: int, tail: str) -> None:
        super().__init__(f"{name} exited with {returncode}", name, tail)
        self.returncode = returncode


class StillRunning(ProcError, TimeoutError):
    """Waited `waited_s` for a line or an exit that did not come."""

    def __init__(self, name: str, what: str, waited_s: float, tail: str) -> None:
        super().__init__(f"{name}: waited {waited_s:g} s for {what}", name, tail)
        self.waited_s = waited_s


class Child:
    """A started process and the log it writes to."""

    def __init__(
        self, proc: subprocess.Popen[bytes], log_path: Path | None, name: str, offset: int = 0
    ) -> None:
        self.proc = proc
        self.log_path = log_path
        self.name = name
        self._offset = offset  # where this child's output starts in a log shared with earlier runs

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        """None while it runs."""
        return self.proc.poll()

    def log(self) -> str:
        """What this child wrote to its log so far."""
        if self.log_path is None:
            return ""
        try:
            with self.log_path.open("rb") as f:
                f.seek(self._offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def tail(self, chars: int = TAIL_CHARS) -> str:
        return self.log()[-chars:]

    def _seen(self, pattern: re.Pattern[str] | str) -> re.Match[str] | None:
        """The pattern's first match in the log; ChildExited if it is not there and never will be."""
        exited = self.returncode  # before reading: what it wrote before exiting is in the log
        found = re.search(pattern, self.log())
        if found is None and exited is not None:
            raise ChildExited(self.name, exited, self.tail())
        return found

    def _late(self, deadline: float, what: str, within: float) -> None:
        if time.monotonic() >= deadline:
            raise StillRunning(self.name, what, within, self.tail())

    def wait_for(self, pattern: re.Pattern[str] | str, within: float) -> re.Match[str]:
        """Block until the log matches `pattern`; the match."""
        deadline = time.monotonic() + within
        while (found := self._seen(pattern)) is None:
            self._late(deadline, f"{_shown(pattern)} in its log", within)
            time.sleep(POLL_S)
        return found

    async def wait_for_async(self, pattern: re.Pattern[str] | str, within: float) -> re.Match[str]:
        """`wait_for` without blocking the event loop."""
        deadline = time.monotonic() + within
        while (found := self._seen(pattern)) is None:
            self._late(deadline, f"{_shown(pattern)} in its log", within)
            await asyncio.sleep(POLL_S)
        return found

    def wait(self, within: float | None = None) -> int:
        """Its exit status; StillRunning after `within` seconds."""
        try:
            return self.proc.wait(within)
        except subprocess.TimeoutExpired:
            raise StillRunning(self.name, "its exit", within or 0, self.tail()) from None

    async def wait_async(self, within: float | None = None) -> int:
        """`wait` without blocking the event loop (it polls: no thread is left waiting)."""
        deadline = None if within is None else time.monotonic() + within
        while (code := self.proc.poll()) is None:
            if deadline is not None:
                self._late(deadline, "its exit", within or 0)
            await asyncio.sleep(POLL_S)
        return code

    def terminate(self) -> None:
        """SIGTERM, if it still runs; does not wait."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def kill(self, group: bool = False) -> None:
        """SIGKILL and reap it; with `group`, its whole process group (see `spawn`),
        whatever is left of it even when the child itself is gone."""
        if group:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        elif self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def stop(self, grace: float = 10.0) -> int:
        """SIGTERM, `grace` seconds to exit, then SIGKILL; its exit status."""
        self.terminate()
        try:
            return self.wait(grace)
        except StillRunning:
            self._killed(grace)
        return self.proc.returncode

    async def stop_async(self, grace: float = 10.0) -> int:
        """`stop` without blocking the event loop."""
        self.terminate()
        try:
            return await self.wait_async(grace)
        except StillRunning:
            self._killed(grace)
        return self.proc.returncode

    def _killed(self, grace: float) -> None:
        log.warning("%s (pid %d) did not stop within %g s; killing it", self.name, self.pid, grace)
        self.kill()


def spawn(
    args: Sequence[str],
    log_path: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    new_session: bool = False,
    name: str | None = None,
) -> Child:
    """Start `args`, its output appended to `log_path` (inherited when None).

    `new_session`: its own session and process group, so it outlives a Ctrl-C
    meant for this process and `Child.kill(group=True)` takes its children too.
    """
    out = None if log_path is None else _open_log(log_path)
    try:
        offset = 0 if out is None else out.tell()
        proc = subprocess.Popen(
            list(args),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=None if out is None else subprocess.STDOUT,
            env=None if env is None else dict(env),
            cwd=cwd,
            start_new_session=new_session,
        )
    finally:
        if out is not None:
            out.close()
    return Child(proc, log_path, name or Path(args[0]).name, offset)


def _open_log(path: Path) -> BinaryIO:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("ab")


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on at this moment.

    Racy by nature (another process may take it before it is used): only for
    what needs a number before the child starts, such as a cluster's route
    ports or an address that must refuse connections.
    """
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _shown(pattern: re.Pattern[str] | str) -> str:
    return repr(pattern.pattern if isinstance(pattern, re.Pattern) else pattern)
