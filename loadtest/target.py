"""The system under test when the generator brings its own: `escapement up` as a child.

`SpawnedUp` runs `escapement up` on a free port with a temporary data dir,
waits for "Escapement is up" (and for its workers), and learns the edge URL
and the NATS URL from what it prints. Its PID is the edge; its children are
the workers and the nats-server (see `loadtest.monitor.Targets`).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_UP = re.compile(r"Escapement is up: (\S+)\s+\(NATS (\S+)\)")
_WORKERS_READY = re.compile(r"(\d+) worker\(s\) ready|no workers:")
NATS_URL_FILE = "nats.url"  # `up` keeps the embedded server's URL, with its credentials, here


class SpawnError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class SpawnedUp:
    def __init__(
        self,
        workers: int = 1,
        model: str | None = None,
        port: int | None = None,
        data_dir: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.workers = workers
        self.model = model
        self.port = port or free_port()
        self._own_dir = data_dir is None
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="escapement-loadtest-"))
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.nats_url = ""
        self.log_path = self.data_dir / "up.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "services.cli", "up", "--port", str(self.port)]
        cmd += ["--data-dir", str(self.data_dir), "--workers", str(self.workers)]
        if self.model:
            cmd += ["--model", self.model]
        return cmd

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def start(self, timeout: float = 120.0) -> None:
        """Blocking: returns once the edge listens and the workers are ready."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                self.command(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **(self.env or {})},
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            if not self.url and (m := _UP.search(text)):
                self.url, self.nats_url = m.group(1).rstrip("/"), m.group(2)
                url_file = self.data_dir / NATS_URL_FILE
                if url_file.exists():  # the printed URL hides the credentials
                    self.nats_url = url_file.read_text().strip()
            if self.url and _WORKERS_READY.search(text):
                return  # `up` says so once its edge admits sessions
            if self.proc.poll() is not None:
                raise SpawnError(
                    f"escapement up exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            time.sleep(0.1)
        if self.url:
            return  # listening; the workers are slow to say so, the queue holds what comes meanwhile
        self.stop()
        raise SpawnError(f"escapement up not ready within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 60.0) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        return proc.returncode
