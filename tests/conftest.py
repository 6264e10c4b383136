"""Real parts for the tests: nats-server, the edge, the worker, the model, speech.

Every test that needs NATS gets its own nats-server on a random port with a
temp store dir. The Whisper model is loaded once per test run and shared by
the in-process workers (one job at a time each, on their own executor).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import nats
import pytest
from aiohttp import web
from nats.aio.client import Client as NATS

from jetstream.setup import apply_all
from loadtest.corpus import word_errors
from loadtest.speech import Speech, make_speech
from services.edge.app import create_app, make_runner
from services.edge.settings import EdgeSettings
from services.natsserver import NatsServer
from services.worker.engines import WhisperEngine
from services.worker.micro import register
from services.worker.models import resolve_model
from services.worker.service import Worker
from services.worker.settings import WorkerSettings


@pytest.fixture(scope="session")
def speech_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("speech")


@pytest.fixture(scope="session")
def make_test_speech(speech_dir: Path):  # type: ignore[no-untyped-def]
    def make(sentences: list[str], sample_rate: int = 16000, gap_s: float = 1.0) -> Speech:
        return make_speech(sentences, speech_dir, sample_rate=sample_rate, gap_s=gap_s)

    return make


@pytest.fixture(scope="session")
def engine() -> WhisperEngine:
    return WhisperEngine(resolve_model("tiny.en"), cpu_threads=2, beam_size=5)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[NATS]:
    conn = await nats.connect(nats_server.url)
    await apply_all(conn.jetstream())
    try:
        yield conn
    finally:
        await asyncio.wait_for(conn.close(), timeout=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningEdge:
    url: str
    app: web.Application
    settings: EdgeSettings


@contextlib.asynccontextmanager
async def run_edge(nats_url: str, **overrides: object) -> AsyncIterator[RunningEdge]:
    options: dict[str, object] = {"auth_enabled": False, "max_sessions_per_worker": 0, **overrides}
    settings = EdgeSettings(nats_url=nats_url, port=free_port(), **options)  # type: ignore[arg-type]
    app = create_app(settings)
    runner = make_runner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", settings.port, backlog=settings.listen_backlog)
    await site.start()
    try:
        yield RunningEdge(f"http://127.0.0.1:{settings.port}", app, settings)
    finally:
        await runner.cleanup()


@pytest.fixture
async def edge(nc: NATS, nats_server: NatsServer) -> AsyncIterator[RunningEdge]:
    """An edge that admits sessions whether or not a worker runs (segments wait in the queue)."""
    async with run_edge(nats_server.url, require_workers=False) as running:
        yield running


@contextlib.asynccontextmanager
async def run_worker(
    nats_url: str, engine: WhisperEngine, **overrides: object
) -> AsyncIterator[Worker]:
    conn = await nats.connect(
        servers=nats_url.split(","), max_reconnect_attempts=-1, reconnect_time_wait=0.5
    )
    worker = Worker(conn, lambda: engine, WorkerSettings(nats_url=nats_url, **overrides))  # type: ignore[arg-type]
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    await asyncio.wait_for(worker.ready.wait(), timeout=30)
    service = await register(conn, worker)
    try:
        yield worker
    finally:
        await service.stop()
        stop.set()
        await asyncio.wait_for(task, timeout=30)
        await worker.close()
        await conn.close()


@pytest.fixture
async def worker(nc: NATS, nats_server: NatsServer, engine: WhisperEngine) -> AsyncIterator[Worker]:
    async with run_worker(nats_server.url, engine) as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate, case and punctuation ignored (the load generator's measure)."""
    errors, words = word_errors(reference, hypothesis)
    return errors / max(1, words)


# --- worker processes (reliability tests) -------------------------------------


class WorkerProcess:
    """`python -m services.worker` in a process of its own, configured by environment
    as in production; its log goes to a file the test can read."""

    def __init__(self, nats_url: str, log_path: Path, env: dict[str, str]) -> None:
        self.log_path = log_path
        self.env = {**os.environ, "NATS_URL": nats_url, **env}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.worker"],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def ready(self, within: float = 60) -> WorkerProcess:
        """Wait for its "worker ready" line (consumer bound, about to pull)."""
        deadline = time.monotonic() + within
        while "worker ready" not in self.log():
            assert self.proc is not None and self.proc.poll() is None, f"worker died:\n{self.log()}"
            assert time.monotonic() < deadline, f"worker not ready in {within}s:\n{self.log()}"
            await asyncio.sleep(0.05)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def terminate(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    async def wait(self, within: float) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + within
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, (
                f"worker still running after {within}s:\n{self.log()}"
            )
            await asyncio.sleep(0.05)
        return self.proc.returncode


# Light settings for worker processes sharing 2 cores with the test itself.
LIGHT_WORKER_ENV = {"ESCAPEMENT_CPU_THREADS": "1", "ESCAPEMENT_BEAM_SIZE": "1"}


@pytest.fixture
def spawn_worker(nats_server: NatsServer, tmp_path: Path):  # type: ignore[no-untyped-def]
    """`spawn_worker(**env)` starts a worker process on this test's nats-server;
    every one still running is killed at teardown."""
    spawned: list[WorkerProcess] = []

    def spawn(**env: str) -> WorkerProcess:
        log_path = tmp_path / f"worker-{len(spawned)}.log"
        process = WorkerProcess(nats_server.url, log_path, {**LIGHT_WORKER_ENV, **env})
        spawned.append(process.start())
        return process

    try:
        yield spawn
    finally:
        for process in spawned:
            process.kill()
