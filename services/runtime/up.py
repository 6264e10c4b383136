"""`escapement up`: the embedded default.

Starts a nats-server with JetStream on loopback (unless `NATS_URL` names one),
applies the stream definitions, runs one edge in this process and N worker
processes, and prints its banner once a session would be admitted (the
streams exist and a worker has its model loaded). It restarts a worker that
dies (with back-off), and on Ctrl-C or SIGTERM stops everything: edge first
(sessions get what they are owed, then 1001), then workers (they finish or
hand back in-flight segments), then nats-server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import msgspec
import platformdirs
from aiohttp import web
from nats.errors import Error as NatsError

from jetstream.setup import IncompatibleDefinition, JetStreamUnavailable, apply_all
from observability import telemetry
from services.common.config import SettingsError, from_env
from services.common.host import usable_cores
from services.common.natsconn import connect, redact
from services.edge.app import LOOPBACK, EdgeConfigError, admission_key, create_app
from services.edge.health import readiness
from services.edge.server import serve
from services.edge.settings import EdgeSettings
from services.runtime.natsserver import NatsServer, NatsServerError, NatsUsers, write_private
from services.runtime.procs import Child, spawn
from services.worker.settings import WorkerSettings

log = logging.getLogger("escapement.up")

WORKER_READY = "worker ready"  # what a worker logs once it is about to pull segments


class UpSettings(msgspec.Struct, frozen=True, kw_only=True):
    """`escapement up`'s settings: `ESCAPEMENT_<FIELD>` (and `NATS_URL`); its options win."""

    host: str = "127.0.0.1"
    port: int = 8080  # 0: any free port (the banner says which)
    data_dir: str = ""  # the JetStream store, secrets; "": the user data dir
    # "auto": one single-threaded worker per core (`worker_layout`); a number: that many,
    # sharing the cores
    workers: int | Literal["auto"] = "auto"
    model: str = "tiny.en"
    nats_url: str = ""  # "": an embedded nats-server
    nats_port: int = -1  # the embedded nats-server's; -1: any free port
    stream_replicas: int = 0  # 0: as in jetstream/streams/*.json
    cpu_threads: int = 0  # per worker; 0: the cores shared among the workers
    # interim-look-only workers at idle CPU priority ("auto": one per worker on a CPU)
    look_workers: int | Literal["auto"] = "auto"
    auth_enabled: bool | None = None  # None: off on a loopback host, on elsewhere
    auth_secret: str = ""  # "": one kept in the data dir
    ready_timeout_s: float = 600.0  # give up when no session could be admitted by then
    restart_backoff_s: float = 1.0
    restart_backoff_max_s: float = 30.0
    log_level: str = "INFO"


class UpError(RuntimeError):
    """What keeps `up` from coming up, said plainly."""


class WorkerProcess:
    """`python -m services.worker` as a child, configured by its environment as in
    production; its output goes to `log_path`, or to this process's when None."""

    def __init__(
        self, env: Mapping[str, str], log_path: Path | None = None, name: str = "worker"
    ) -> None:
        self.env = dict(env)
        self.log_path = log_path
        self.name = name
        self.child: Child | None = None
        self.restarts = 0

    def start(self) -> WorkerProcess:
        self.child = spawn(
            [sys.executable, "-m", "services.worker"], self.log_path, env=self.env, name=self.name
        )
        log.info("%s started (pid %d)", self.name, self.child.pid)
        return self

    @property
    def running(self) -> Child:
        if self.child is None:
            raise RuntimeError(f"{self.name} was not started")
        return self.child

    @property
    def pid(self) -> int:
        return self.running.pid

    @property
    def returncode(self) -> int | None:
        return self.running.returncode

    def log(self) -> str:
        return self.child.log() if self.child is not None else ""

    async def ready(self, within: float = 60.0) -> WorkerProcess:
        """Once it logs "worker ready" (its log_path is needed for that)."""
        await self.running.wait_for_async(WORKER_READY, within)
        return self

    def terminate(self) -> None:
        self.running.terminate()

    async def wait(self, within: float | None = None) -> int:
        return await self.running.wait_async(within)

    def kill(self) -> None:
        if self.child is not None:
            self.child.kill()

    async def stop(self, grace: float) -> None:
        if self.child is not None:
            await self.child.stop_async(grace)

    async def supervise(
        self, stopping: asyncio.Event, backoff_s: float, backoff_max_s: float
    ) -> None:
        """Start it again whenever it exits, until `stopping` is set; the back-off
        doubles up to `backoff_max_s` and starts over after a good run."""
        loop = asyncio.get_running_loop()
        backoff = backoff_s
        while True:
            started = loop.time()
            code = await self.running.wait_async()
            if stopping.is_set():
                return
            if loop.time() - started > 60:
                backoff = backoff_s  # it ran fine for a while
            log.warning(
                "%s (pid %d) exited with %s; restarting in %.1fs",
                self.name,
                self.pid,
                code,
                backoff,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=backoff)
            if stopping.is_set():
                return
            backoff = min(backoff * 2, backoff_max_s)
            self.restarts += 1
            self.start()


async def _up(settings: UpSettings) -> int:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    code = 0
    async with contextlib.AsyncExitStack() as stack:  # stops what started, in reverse
        stack.callback(log.info, "stopped")
        try:
            await _run(settings, stopping, stack)
        except UpError as exc:
            log.error("%s", exc)
            code = 1
        finally:
            stopping.set()  # before anything stops: no worker is restarted from here on
    return code


async def _run(
    settings: UpSettings, stopping: asyncio.Event, stack: contextlib.AsyncExitStack
) -> None:
    """Start everything, each part's stop pushed on `stack`; return when asked to stop."""
    data_dir = Path(settings.data_dir) if settings.data_dir else default_data_dir()
    private_dir(data_dir)
    nats_url = settings.nats_url
    edge_url = worker_url = nats_url  # a server of the deployment's: its own credentials
    server: NatsServer | None = None
    if not nats_url:
        server = NatsServer(
            data_dir / "nats",
            port=settings.nats_port,
            host="127.0.0.1",  # loopback only; edge, workers and operator each their own user
            users=NatsUsers.load_or_make(data_dir / NATS_USERS_FILE),
        )
        try:
            nats_url = await asyncio.to_thread(server.start)
        except NatsServerError as exc:
            raise UpError(str(exc)) from None
        stack.push_async_callback(asyncio.to_thread, server.stop)
        edge_url, worker_url = server.url_for("edge"), server.url_for("worker")
        write_private(data_dir / "nats.url", nats_url)  # the operator's, for the CLI
        log.info("nats-server %s (store %s)", server.public_url, server.store_dir)
    nc = await connect(nats_url, "escapement-up")
    stack.push_async_callback(nc.close)
    try:
        await apply_all(nc.jetstream(), replicas=settings.stream_replicas)
    except (IncompatibleDefinition, JetStreamUnavailable) as exc:
        raise UpError(str(exc)) from None

    count, threads = worker_layout(settings)
    lookers = look_workers(settings, count)
    log.info(
        "%d worker(s), %d CPU thread(s) each; %d interim-look worker(s) at idle priority",
        count, threads, lookers,
    )  # fmt: skip
    role = "finals" if lookers else "all"
    board = await asyncio.to_thread(_fresh_board, data_dir / "decode-board")
    workers = [
        WorkerProcess(_worker_env(settings, worker_url, threads, role, board), name=f"worker {i}")
        for i in range(count)
    ]
    processes = workers + [
        WorkerProcess(_worker_env(settings, worker_url, threads, "looks", board), name=f"looks {i}")
        for i in range(lookers)
    ]
    stack.push_async_callback(_stop_workers, processes, 25.0)
    for worker in processes:
        worker.start()
    tasks: set[asyncio.Task[None]] = set()
    stack.push_async_callback(_cancel, tasks)

    try:
        app = create_app(_edge_settings(settings, edge_url, data_dir))
        port = await stack.enter_async_context(serve(app))
    except EdgeConfigError as exc:
        raise UpError(str(exc)) from None
    except OSError as exc:
        raise UpError(f"cannot listen on {settings.host}:{settings.port}: {exc}") from None
    if not await _wait_ready(app, settings, workers, stopping, processes):
        return  # asked to stop before it was up
    for worker in processes:
        _own(
            tasks,
            worker.supervise(stopping, settings.restart_backoff_s, settings.restart_backoff_max_s),
        )
    _banner(settings.host, port, nats_url, data_dir if server is not None else None)
    _own(tasks, _announce_workers(app, len(workers), stopping))
    await stopping.wait()
    log.info("stopping")


# what "auto" allows each worker with its look worker (tiny.en ~0.3, base ~0.5 GB RSS each)
WORKER_MEMORY_BYTES = 1 << 30


def worker_layout(settings: UpSettings) -> tuple[int, int]:
    """(worker processes, CPU threads each). "auto" is the measured best on a CPU: one
    single-threaded worker per core (loadtest/README.md "Capacity": on 2 cores, 2 x 1
    thread beat 1 x 2 threads with one session, 648 / 826 against 700 / 1,237 ms p50 /
    p95 to the Final, since a final no longer waits behind an interim look, and beat
    2 x 2 threads at 8 sessions, 0.19 against 0.24 CPU-s per audio-s), as many as
    memory allows. A GPU gets one worker: its streams, not processes, are what scale."""
    cores = usable_cores()
    if settings.workers == "auto":
        if _workers_settings().device != "cpu":
            count = 1
        else:
            memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            count = max(1, min(cores, memory // WORKER_MEMORY_BYTES))
    else:
        count = max(0, settings.workers)  # 0: an edge and NATS without workers
    threads = settings.cpu_threads or max(1, cores // max(1, count))
    return count, threads


def look_workers(settings: UpSettings, workers: int) -> int:
    """Interim-look-only workers (services/worker/settings.py `role`): "auto" runs one per
    worker on a CPU, at idle priority, so that a final never waits for a look to end
    (none with ESCAPEMENT_DEVICE=cuda, or without workers)."""
    if settings.look_workers != "auto":
        return max(0, settings.look_workers)
    worker = _workers_settings()
    return workers if worker.device == "cpu" and worker.interims else 0


def _workers_settings() -> WorkerSettings:
    """What the workers will read from this environment (their device, interims)."""
    try:
        return from_env(WorkerSettings)
    except SettingsError as exc:  # the workers refuse it at start, saying why
        raise UpError(f"worker settings: {exc}") from None


def _fresh_board(folder: Path) -> Path:
    """The workers' decode board (services/common/board.py), emptied of an earlier run's
    marks: a pid reused since would read as a worker decoding."""
    folder.mkdir(parents=True, exist_ok=True)
    for mark in folder.iterdir():
        if mark.is_file():
            mark.unlink(missing_ok=True)
    return folder


def _worker_env(
    settings: UpSettings, nats_url: str, threads: int, role: str, board: Path | None = None
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NATS_USER", "NATS_PASSWORD")}
    if role == "looks" and env.get("ESCAPEMENT_METRICS_PORT", "0") != "0":
        env["ESCAPEMENT_METRICS_PORT"] = "0"  # a fixed port is the finals worker's; any free one
    if threads == 1 and usable_cores() >= 2:
        # one thread decodes, two encode (services/worker/engines.py _whisper_model), and
        # OpenMP threads sleep rather than spin while the other worker's want the cores
        env.setdefault("ESCAPEMENT_ENCODER_THREADS", "2")
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        if board is not None:  # ... and one only while another worker's final holds a core
            env.setdefault("ESCAPEMENT_DECODE_BOARD", str(board))
    return {
        **env,  # credentials travel in NATS_URL only: the worker's own
        "NATS_URL": nats_url,
        "ESCAPEMENT_MODEL": settings.model,
        "ESCAPEMENT_DEFAULT_MODEL": settings.model,  # up's workers serve the default lane
        "ESCAPEMENT_CPU_THREADS": str(threads),
        "ESCAPEMENT_ROLE": role,
    }


def _edge_settings(settings: UpSettings, nats_url: str, data_dir: Path) -> EdgeSettings:
    auth_enabled = settings.auth_enabled
    if auth_enabled is None:
        auth_enabled = settings.host not in LOOPBACK  # off by default on loopback only
    return from_env(
        EdgeSettings,
        nats_url=nats_url,
        host=settings.host,
        port=settings.port,
        stream_replicas=settings.stream_replicas,
        default_model=settings.model,
        auth_enabled=auth_enabled,
        auth_secret=settings.auth_secret or load_or_make_secret(data_dir),
    )


async def _wait_ready(
    app: web.Application,
    settings: UpSettings,
    workers: list[WorkerProcess],
    stopping: asyncio.Event,
    processes: list[WorkerProcess] | None = None,
) -> bool:
    """True once a session would be admitted (with no workers to run: once the streams
    exist); False when asked to stop first. UpError if a worker (of `processes`, all the
    workers' processes: `workers` are those that take finals) exits before that."""
    admission = app[admission_key]
    loop = asyncio.get_running_loop()
    started = loop.time()
    said, said_at = "", 0.0
    while not stopping.is_set():
        with contextlib.suppress(NatsError, TimeoutError):  # NATS busy: ask again
            await admission.refresh_workers()
        state = await readiness(admission)
        waiting = [w for w in state.waiting_for if workers or w != "workers"]
        if not waiting:
            return True
        for worker in processes or workers:
            if worker.returncode is not None:
                raise UpError(
                    f"{worker.name} exited with {worker.returncode} before it was ready "
                    "(its log is above)"
                )
        waited = loop.time() - started
        if waited >= settings.ready_timeout_s:
            raise UpError(f"not ready after {waited:.0f} s: {state.message}")
        if waiting == ["workers"]:
            line = f"Loading the model ({settings.model}) in {len(workers)} worker(s)..."
        else:
            line = f"Waiting: {state.message}..."
        if line != said or waited - said_at >= 15:
            print(line if line != said else f"  still waiting ({waited:.0f} s)", flush=True)
            said, said_at = line, waited
        await asyncio.sleep(0.25)
    return False


def _banner(host: str, port: int, nats_url: str, data_dir: Path | None) -> None:
    shown = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
    print(f"Escapement is up: {shown}/  (NATS {redact(nats_url)})", flush=True)
    if data_dir is not None:  # the embedded server: its URL with credentials is kept here
        print(f"  NATS with credentials: {data_dir / 'nats.url'}", flush=True)
        print(f'  e.g. nats --server "$(cat {data_dir / "nats.url"})" stream ls', flush=True)
    print(f"  transcribe a file: escapement transcribe FILE.wav --url {shown}", flush=True)
    print("  Ctrl-C to stop", flush=True)


async def _announce_workers(app: web.Application, expected: int, stopping: asyncio.Event) -> None:
    """Say when all the workers are up, once the edge's admission has seen them too."""
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


def _own(tasks: set[asyncio.Task[None]], coro) -> None:  # type: ignore[no-untyped-def]
    task = asyncio.create_task(coro)
    tasks.add(task)
    task.add_done_callback(tasks.discard)


async def _cancel(tasks: set[asyncio.Task[None]]) -> None:
    for task in list(tasks):
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _stop_workers(workers: list[WorkerProcess], grace: float) -> None:
    await asyncio.gather(*(w.stop(grace) for w in workers))


SECRET_FILE = "auth-secret"
NATS_USERS_FILE = "nats-users.json"  # the embedded nats-server's passwords, by role


def load_or_make_secret(data_dir: Path) -> str:
    """The edge's token secret, kept in the data dir (0600) so minted tokens survive restarts."""
    path = data_dir / SECRET_FILE
    if not path.exists():
        write_private(path, secrets.token_urlsafe(32))
    return path.read_text().strip()


def private_dir(path: Path) -> Path:
    """The data dir, made if missing, readable by its owner only (0700): it holds secrets."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)
    return path


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("escapement"))


def run_up(settings: UpSettings) -> int:
    with telemetry("escapement-edge", settings.log_level):  # the edge runs in this process
        return asyncio.run(_up(settings))
