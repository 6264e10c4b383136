"""`escapement up`: the embedded default.

Starts a nats-server with JetStream on loopback (unless `NATS_URL` names one),
applies the stream definitions, runs one edge in this process and N worker
processes, restarts a worker that dies (with back-off), and on Ctrl-C or
SIGTERM stops everything: edge first (sessions get 1001), then workers
(they finish or hand back in-flight segments), then nats-server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import platformdirs
from aiohttp import web
from nats.errors import Error as NatsError

from jetstream.setup import IncompatibleDefinition, JetStreamUnavailable, apply_all
from observability.logging import setup_logging
from observability.metrics import setup_metrics, shutdown_metrics
from observability.tracing import setup_tracing, shutdown_tracing
from services.config import from_env
from services.edge.app import LOOPBACK, EdgeConfigError, admission_key, create_app, make_runner
from services.edge.settings import EdgeSettings
from services.natsconn import connect, redact
from services.natsserver import NatsServer, NatsServerError

log = logging.getLogger("escapement.up")


@dataclass(frozen=True)
class UpOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path | None = None
    workers: int = 1
    model: str = "tiny.en"
    nats_port: int = -1
    restart_backoff_s: float = 1.0
    restart_backoff_max_s: float = 30.0


class WorkerProcess:
    """One supervised `python -m services.worker` process."""

    def __init__(self, index: int, env: dict[str, str], opts: UpOptions) -> None:
        self.index = index
        self.env = env
        self.opts = opts
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.worker", env=self.env, stdin=asyncio.subprocess.DEVNULL
        )
        log.info("worker %d started (pid %d)", self.index, self.proc.pid)

    async def supervise(self, stopping: asyncio.Event) -> None:
        backoff = self.opts.restart_backoff_s
        while True:
            assert self.proc is not None
            started = asyncio.get_running_loop().time()
            code = await self.proc.wait()
            if stopping.is_set():
                return
            log.warning(
                "worker %d (pid %d) exited with %s; restarting in %.1fs",
                self.index,
                self.proc.pid,
                code,
                backoff,
            )
            lived = asyncio.get_running_loop().time() - started
            if lived > 60:
                backoff = self.opts.restart_backoff_s  # it ran fine for a while
            await asyncio.sleep(backoff)
            if stopping.is_set():
                return
            backoff = min(backoff * 2, self.opts.restart_backoff_max_s)
            self.restarts += 1
            await self.start()

    async def stop(self, grace: float) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout=grace)
        except TimeoutError:
            log.warning("worker %d did not stop in %.0fs; killing", self.index, grace)
            proc.kill()
            await proc.wait()


async def _up(opts: UpOptions) -> int:
    data_dir = opts.data_dir or default_data_dir()
    data_dir.mkdir(parents=True, exist_ok=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)

    server: NatsServer | None = None
    nats_url = os.environ.get("NATS_URL", "")
    if not nats_url:
        # loopback only, with credentials made for this run
        server = NatsServer(
            data_dir / "nats",
            port=opts.nats_port,
            host="127.0.0.1",
            user="escapement",
            password=secrets.token_urlsafe(18),
        )
        try:
            nats_url = await asyncio.to_thread(server.start)
        except NatsServerError as exc:
            log.error("%s", exc)
            return 1
        url_file = data_dir / "nats.url"
        _write_private(url_file, nats_url)
        log.info("nats-server %s (store %s)", server.public_url, server.store_dir)
    workers: list[WorkerProcess] = []
    supervisors: set[asyncio.Task[None]] = set()
    runner: web.AppRunner | None = None
    nc = None
    try:
        nc = await connect(nats_url, "escapement-up")
        replicas = int(os.environ.get("ESCAPEMENT_STREAM_REPLICAS", "0") or 0)
        try:
            await apply_all(nc.jetstream(), replicas=replicas)
        except (IncompatibleDefinition, JetStreamUnavailable) as exc:
            log.error("%s", exc)
            return 1

        cores = os.cpu_count() or 1
        env = {
            **os.environ,
            "NATS_URL": nats_url,
            "ESCAPEMENT_MODEL": opts.model,
            "ESCAPEMENT_CPU_THREADS": os.environ.get(
                "ESCAPEMENT_CPU_THREADS", str(max(1, cores // max(1, opts.workers)))
            ),
        }
        for i in range(opts.workers):
            worker = WorkerProcess(i, env, opts)
            await worker.start()
            workers.append(worker)
            task = asyncio.create_task(worker.supervise(stopping))
            supervisors.add(task)
            task.add_done_callback(supervisors.discard)

        loopback = opts.host in LOOPBACK
        settings = from_env(
            EdgeSettings,
            nats_url=nats_url,
            host=opts.host,
            port=opts.port,
            # auth defaults to off on loopback only; the environment can say otherwise
            auth_enabled=None if "ESCAPEMENT_AUTH_ENABLED" in os.environ else not loopback,
            auth_secret=None
            if "ESCAPEMENT_AUTH_SECRET" in os.environ
            else load_or_make_secret(data_dir),
        )
        try:
            app = create_app(settings)
            runner = make_runner(app)
        except EdgeConfigError as exc:
            log.error("%s", exc)
            return 1
        await runner.setup()
        site = web.TCPSite(runner, opts.host, opts.port, backlog=settings.listen_backlog)
        try:
            await site.start()
        except OSError as exc:
            log.error("cannot listen on %s:%d: %s", opts.host, opts.port, exc)
            return 1
        shown = "127.0.0.1" if opts.host in ("0.0.0.0", "") else opts.host
        print(
            f"Escapement is up: http://{shown}:{opts.port}/  (NATS {redact(nats_url)})", flush=True
        )
        if server is not None:
            print(f"  NATS with credentials: {data_dir / 'nats.url'}", flush=True)
            print(f'  e.g. nats --server "$(cat {data_dir / "nats.url"})" stream ls', flush=True)
        print(
            f"  transcribe a file: escapement transcribe FILE.wav --url http://{shown}:{opts.port}",
            flush=True,
        )
        print("  Ctrl-C to stop", flush=True)
        waiter = asyncio.create_task(_announce_workers(app, opts.workers, stopping))
        await stopping.wait()
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiter
        log.info("stopping")
        return 0
    finally:
        stopping.set()
        if runner is not None:
            await runner.cleanup()
        for task in list(supervisors):
            task.cancel()
        await asyncio.gather(*supervisors, return_exceptions=True)
        await asyncio.gather(*(w.stop(grace=25) for w in workers))
        if nc is not None:
            await nc.close()
        if server is not None:
            await asyncio.to_thread(server.stop)
        log.info("stopped")


async def _announce_workers(app: web.Application, expected: int, stopping: asyncio.Event) -> None:
    """Say when the workers are up, once the edge's admission has seen them too."""
    admission = app[admission_key]
    if expected == 0:
        log.info("no workers: new sessions are refused (no_workers)")
        return
    while not stopping.is_set():
        with contextlib.suppress(NatsError, TimeoutError):  # NATS busy: ask again
            await admission.refresh_workers()
        if admission.workers >= expected:
            log.info("%d worker(s) ready", admission.workers)
            return
        await asyncio.sleep(0.5)


SECRET_FILE = "auth-secret"


def load_or_make_secret(data_dir: Path) -> str:
    """The edge's token secret, kept in the data dir (0600) so minted tokens survive restarts."""
    path = data_dir / SECRET_FILE
    if not path.exists():
        _write_private(path, secrets.token_urlsafe(32))
    return path.read_text().strip()


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, atomically."""
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    tmp.replace(path)


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("escapement"))


def run_up(opts: UpOptions) -> int:
    setup_logging(os.environ.get("ESCAPEMENT_LOG_LEVEL", "INFO"))
    setup_tracing("escapement-edge")  # the edge runs in this process
    setup_metrics("escapement-edge")
    try:
        return asyncio.run(_up(opts))
    finally:
        shutdown_metrics()
        shutdown_tracing()
