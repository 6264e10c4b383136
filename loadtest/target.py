"""The system under test when the generator brings its own: `escapement up` as a child.

`SpawnedUp` runs `escapement up` on a free port (port 0: `up` binds one and
its banner says which) with a temporary data dir, waits for "Escapement is up"
(printed once a session would be admitted) and for all its workers, and learns
the edge URL and the NATS URL from what it prints. Its PID is the edge; its
children are the workers and the nats-server (see `loadtest.monitor.Targets`).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from services.runtime.procs import Child, ChildExited, StillRunning, spawn

_UP = re.compile(r"Escapement is up: (\S+)\s+\(NATS (\S+)\)")
_WORKERS_READY = re.compile(r"(\d+) worker\(s\) ready|no workers:")
NATS_URL_FILE = "nats.url"  # `up` keeps the embedded server's URL, with its credentials, here


class SpawnError(RuntimeError):
    pass


class SpawnedUp:
    def __init__(
        self,
        workers: int | str = "auto",
        model: str | None = None,
        port: int = 0,
        data_dir: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.workers = workers
        self.model = model
        self.port = port  # 0 until the banner names the one `up` bound
        self._own_dir = data_dir is None
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="escapement-loadtest-"))
        self.env = env
        self.child: Child | None = None
        self.url = ""
        self.nats_url = ""
        self.log_path = self.data_dir / "up.log"

    @property
    def layout(self) -> str:
        """What this `up` runs, e.g. "escapement up, 2 worker(s)" (auto resolved)."""
        from services.runtime.up import UpSettings, worker_layout

        count = worker_layout(UpSettings(workers=self.workers))[0]  # type: ignore[arg-type]
        return f"escapement up, {count} worker(s)"

    @property
    def pid(self) -> int:
        assert self.child is not None
        return self.child.pid

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "services.cli", "up", "--port", str(self.port)]
        cmd += ["--data-dir", str(self.data_dir), "--workers", str(self.workers)]
        if self.model:
            cmd += ["--model", self.model]
        return cmd

    def log_tail(self, chars: int = 3000) -> str:
        return self.child.tail(chars) if self.child is not None else ""

    def start(self, timeout: float = 120.0) -> None:
        """Blocking: returns once the edge admits sessions and the workers are all ready."""
        deadline = time.monotonic() + timeout
        env = {**os.environ, **(self.env or {})}
        self.child = spawn(self.command(), self.log_path, env=env, name="escapement up")
        try:
            up = self.child.wait_for(_UP, within=timeout)
            self.url, self.nats_url = up.group(1).rstrip("/"), up.group(2)
            self.port = int(self.url.rsplit(":", 1)[1])
            url_file = self.data_dir / NATS_URL_FILE
            if url_file.exists():  # the printed URL hides the credentials
                self.nats_url = url_file.read_text().strip()
            self.child.wait_for(_WORKERS_READY, within=max(0.0, deadline - time.monotonic()))
        except ChildExited as exc:
            raise SpawnError(str(exc)) from None
        except StillRunning as exc:
            if self.url:
                return  # it admits sessions; the other workers are slow to say they are ready
            self.stop()
            raise SpawnError(str(exc)) from None

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.child is None:
            return None
        code = self.child.stop(grace=timeout)
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        return code
