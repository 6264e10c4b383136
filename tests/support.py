"""What the tests share besides fixtures: an edge and a worker in this process,
waiting on a condition, word error rate."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import msgspec
import nats
from aiohttp import web
from nats.aio.client import Client as NATS

from jetstream import subjects
from loadtest.corpus import word_errors
from schemas import device as ev
from services.edge.app import create_app
from services.edge.server import serve
from services.edge.settings import EdgeSettings
from services.worker.engines import WhisperEngine
from services.worker.micro import register
from services.worker.service import Worker
from services.worker.settings import WorkerSettings

T = TypeVar("T")

# Light settings for worker processes sharing 2 cores with the test itself.
LIGHT_WORKER_ENV = {"ESCAPEMENT_CPU_THREADS": "1", "ESCAPEMENT_BEAM_SIZE": "1"}


async def until(
    predicate: Callable[[], T | Awaitable[T]],
    within: float = 10.0,
    message: str = "condition",
    every: float = 0.05,
) -> T:
    """Poll `predicate` (plain or async) until it returns something truthy; return that.
    Fails the test, saying `message`, after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        assert time.monotonic() < deadline, f"{message}: not within {within:g} s"
        await asyncio.sleep(every)


def until_sync(
    predicate: Callable[[], T], within: float = 10.0, message: str = "condition", every: float = 0.1
) -> T:
    """`until` for tests without an event loop."""
    return asyncio.run(until(predicate, within, message, every))


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate, case and punctuation ignored (the load generator's measure)."""
    errors, words = word_errors(reference, hypothesis)
    return errors / max(1, words)


NO_SESSION_CAP = {"max_sessions_per_worker": 0, "session_load": 0}  # edges in tests


@dataclass
class RunningEdge:
    url: str
    app: web.Application
    settings: EdgeSettings  # with the port it listens on


@contextlib.asynccontextmanager
async def run_edge(nats_url: str, **overrides: Any) -> AsyncIterator[RunningEdge]:
    """An edge in this process on a free port, auth off and no session cap unless overridden."""
    options: dict[str, Any] = {"auth_enabled": False, **NO_SESSION_CAP, **overrides}
    settings = EdgeSettings(nats_url=nats_url, host="127.0.0.1", port=0, **options)
    app = create_app(settings)
    async with serve(app) as port:
        listening = msgspec.structs.replace(settings, port=port)
        yield RunningEdge(f"http://127.0.0.1:{port}", app, listening)


async def active_sessions(http: aiohttp.ClientSession, edge: RunningEdge) -> int:
    """The sessions the edge counts open (`/v1/stats`); a closed socket is counted off late."""
    async with http.get(f"{edge.url}/v1/stats") as r:
        return int((await r.json())["sessions"]["active"])


async def first_segment_queued(nc: NATS) -> bool:
    """Whether a segment was ever queued: devices streaming speech are well into it."""
    stream = await nc.jetstream().stream_info(subjects.STREAM_SEGMENTS)
    return stream.state.last_seq >= 1


@contextlib.asynccontextmanager
async def run_worker(
    nats_url: str, engine: WhisperEngine, **overrides: Any
) -> AsyncIterator[Worker]:
    """A worker in this process on a shared engine, registered for discovery once it pulls."""
    conn = await nats.connect(
        servers=nats_url.split(","), max_reconnect_attempts=-1, reconnect_time_wait=0.5
    )
    worker = Worker(conn, lambda: engine, WorkerSettings(nats_url=nats_url, **overrides))
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


class Device:
    """A device holding a session open; reads every event (answering pings) meanwhile."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, session_id: str) -> None:
        self.ws = ws
        self.session_id = session_id
        self.events: list[ev.ServerEvent] = []
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, http: aiohttp.ClientSession, edge: RunningEdge, query: str = "") -> Device:
        ws = await http.ws_connect(f"{edge.url}/v1/stream?sample_rate=16000{query}")
        started = ev.decode_event((await ws.receive()).data)
        assert isinstance(started, ev.SessionStarted)
        return cls(ws, started.session_id)

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                self.events.append(ev.decode_event(msg.data))

    async def error(self, within: float = 30) -> ev.Error:
        """The next Error event not yet taken."""

        async def first() -> ev.Error | None:
            for event in self.events:
                if isinstance(event, ev.Error):
                    self.events.remove(event)
                    return event
            assert not self._reader.done(), f"socket closed ({self.ws.close_code})"
            return None

        return await until(first, within=within, message="an Error event")  # type: ignore[no-any-return]

    async def close(self) -> None:
        await self.ws.close()
        await self._reader
