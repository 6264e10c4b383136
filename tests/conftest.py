"""Fixtures: real parts for the tests: nats-server, the edge, the worker, the model, speech.

Every test that needs NATS gets its own nats-server on a random port with a
temp store dir. The Whisper model is loaded once per test run and shared by
the in-process workers (one job at a time each, on their own executor).
Helpers the tests import are in tests/support.py.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import nats
import pytest
from nats.aio.client import Client as NATS

from jetstream.setup import apply_all
from loadtest.speech import Speech, make_speech
from services.runtime.natsserver import NatsServer
from services.runtime.up import WorkerProcess
from services.worker.engines import WhisperEngine
from services.worker.models import resolve_model
from services.worker.service import Worker
from tests.support import LIGHT_WORKER_ENV, RunningEdge, run_edge, run_worker


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
    return WhisperEngine(resolve_model("tiny.en"), cpu_threads=2)


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


@pytest.fixture
async def edge(nc: NATS, nats_server: NatsServer) -> AsyncIterator[RunningEdge]:
    """An edge that admits sessions whether or not a worker runs (segments wait in the queue)."""
    async with run_edge(nats_server.url, require_workers=False) as running:
        yield running


@pytest.fixture
async def worker(nc: NATS, nats_server: NatsServer, engine: WhisperEngine) -> AsyncIterator[Worker]:
    async with run_worker(nats_server.url, engine) as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def spawn_worker(nats_server: NatsServer, tmp_path: Path):  # type: ignore[no-untyped-def]
    """`spawn_worker(**env)` starts a worker process on this test's nats-server;
    every one still running is killed at teardown."""
    spawned: list[WorkerProcess] = []

    def spawn(**env: str) -> WorkerProcess:
        name = f"worker-{len(spawned)}"
        environ = {**os.environ, "NATS_URL": nats_server.url, **LIGHT_WORKER_ENV, **env}
        process = WorkerProcess(environ, tmp_path / f"{name}.log", name=name)
        spawned.append(process.start())
        return process

    try:
        yield spawn
    finally:
        for process in spawned:
            process.kill()
