"""Real parts for the tests: nats-server, the edge, the worker, the model, speech.

Every test that needs NATS gets its own nats-server on a random port with a
temp store dir. The Whisper model is loaded once per test run and shared by
the in-process workers (one job at a time each, on their own executor).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import jiwer
import nats
import pytest
from aiohttp import web
from nats.aio.client import Client as NATS

from jetstream.setup import apply_all
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
        await conn.close()


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


_normalise = jiwer.Compose(
    [
        jiwer.ToLowerCase(),
        jiwer.RemovePunctuation(),
        jiwer.RemoveMultipleSpaces(),
        jiwer.Strip(),
        jiwer.ReduceToListOfListOfWords(),
    ]
)


def wer(reference: str, hypothesis: str) -> float:
    return float(
        jiwer.wer(
            reference,
            hypothesis or "<empty>",
            reference_transform=_normalise,
            hypothesis_transform=_normalise,
        )
    )
