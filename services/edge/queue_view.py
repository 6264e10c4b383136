"""The pipeline as this edge sees it, refreshed every second, for `/metrics`,
`/dashboard` and `escapement status`.

- The JetStream queue: each stream's messages and bytes, and the workers'
  consumers' pending, ack-pending (in flight), redelivered and waiting pull
  requests, read from the JetStream API (`read_queue`). The nats-server
  monitoring port speaks JSON, and its usual Prometheus exporter is a separate
  Go binary; reading the API here needs neither. Exposed as the gauges of
  `observability.metrics.QUEUE_GAUGES`.
- What decoding costs: this edge's own results (a second subscription on
  `asr.results.<edge>.>`, next to the router's) give the recent real-time
  factor, inference time and decoded audio per second, with no call to a
  worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field

import msgspec
from aiohttp import web
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from jetstream import subjects
from observability.metrics import ATTR_CONSUMER, ATTR_STREAM, Readings, Recent, observe_queue
from schemas.pipeline import ErrorResult, Result, decode_result
from services.common.discovery import lane_of, last_seen
from services.edge.admission import Admission

log = logging.getLogger(__name__)

STREAMS = (
    subjects.STREAM_SEGMENTS,
    subjects.STREAM_INTERIMS,
    subjects.STREAM_DEAD,
    subjects.STREAM_TRANSCRIPTS,
)
CONSUMERS = (
    (subjects.STREAM_SEGMENTS, subjects.CONSUMER_WORKERS),
    (subjects.STREAM_INTERIMS, subjects.CONSUMER_INTERIMS),
)


@dataclass(frozen=True, slots=True)
class StreamState:
    name: str
    messages: int
    bytes: int


@dataclass(frozen=True, slots=True)
class ConsumerState:
    stream: str
    name: str
    pending: int  # not yet delivered
    ack_pending: int  # delivered, not yet acknowledged: in flight on a worker
    redelivered: int  # delivered more than once, not yet acknowledged
    waiting: int  # pull requests waiting (idle workers)
    delivered: int  # deliveries so far (consumer sequence)
    acked: int  # acknowledged so far (the ack floor's consumer sequence)


@dataclass(frozen=True, slots=True)
class QueueState:
    streams: dict[str, StreamState] = field(default_factory=dict)
    consumers: dict[str, ConsumerState] = field(default_factory=dict)  # by consumer name
    at: float = 0.0  # unix seconds

    def consumer(self, name: str) -> ConsumerState | None:
        return self.consumers.get(name)

    @property
    def dead_letters(self) -> int:
        dead = self.streams.get(subjects.STREAM_DEAD)
        return dead.messages if dead else 0


async def _stream(js: JetStreamContext, name: str) -> StreamState | None:
    try:
        info = await js.stream_info(name)
    except NotFoundError:
        return None
    return StreamState(name, int(info.state.messages or 0), int(info.state.bytes or 0))


async def _consumer(js: JetStreamContext, stream: str, name: str) -> ConsumerState | None:
    try:
        info = await js.consumer_info(stream, name)
    except NotFoundError:
        return None
    return ConsumerState(
        stream=stream,
        name=name,
        pending=int(info.num_pending or 0),
        ack_pending=int(info.num_ack_pending or 0),
        redelivered=int(info.num_redelivered or 0),
        waiting=int(info.num_waiting or 0),
        delivered=int(info.delivered.consumer_seq or 0) if info.delivered else 0,
        acked=int(info.ack_floor.consumer_seq or 0) if info.ack_floor else 0,
    )


async def read_queue(js: JetStreamContext, lanes: Iterable[str] = ()) -> QueueState:
    """Every Escapement stream and workers' consumer (those of the model `lanes` too,
    jetstream/subjects.py), read at once; one that does not exist is left out. Raises
    NatsError / TimeoutError when JetStream does not answer (within `js`'s timeout)."""
    wanted = [
        *CONSUMERS,
        *(
            (stream, subjects.lane_consumer(name, lane))
            for lane in sorted(set(lanes) - {""})
            for stream, name in CONSUMERS
        ),
    ]
    streams = await asyncio.gather(*(_stream(js, name) for name in STREAMS))
    consumers = await asyncio.gather(*(_consumer(js, s, c) for s, c in wanted))
    return QueueState(
        streams={s.name: s for s in streams if s is not None},
        consumers={c.name: c for c in consumers if c is not None},
        at=time.time(),
    )


class Decoding:
    """What recent results say about decoding: RTF, inference time, audio per second."""

    def __init__(self, horizon_s: float = 60.0) -> None:
        self.rtf = Recent(horizon_s)
        self.inference_ms = Recent(horizon_s)
        self.audio_s = Recent(horizon_s)
        self.errors = Recent(horizon_s)
        self.engines: dict[str, float] = {}  # engine -> when it last answered (monotonic)

    def add(self, result: Result | ErrorResult) -> None:
        if isinstance(result, ErrorResult):
            self.errors.add(1)
            return
        audio_s = max(0, result.end_ms - result.start_ms) / 1000
        self.inference_ms.add(result.inference_ms)
        self.audio_s.add(audio_s)
        if audio_s > 0:
            self.rtf.add(result.inference_ms / 1000 / audio_s)
        if result.engine:
            self.engines[result.engine] = time.monotonic()

    def summary(self) -> dict[str, object]:
        horizon = self.rtf.horizon_s
        audio = self.audio_s.values()
        return {
            "window_s": horizon,
            "decoded": len(audio),
            "audio_s_per_s": round(sum(audio) / horizon, 3),
            "errors": len(self.errors.values()),
            "rtf": self.rtf.summary(),
            "inference_ms": self.inference_ms.summary(),
            "engines": sorted(e for e, t in self.engines.items() if time.monotonic() - t < horizon),
        }


class QueueView:
    """Keeps `state` (the queue) and `decoding` (recent results) fresh while running."""

    def __init__(
        self,
        nc: NATS,
        edge_id: str,
        workers: Callable[[], int] = lambda: 0,
        every_s: float = 1.0,
    ) -> None:
        self.nc = nc
        self.edge_id = edge_id
        self.workers = workers
        self.every_s = every_s
        self.state = QueueState()
        self.decoding = Decoding()
        self._task: asyncio.Task[None] | None = None
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(
            subjects.results_for_edge(self.edge_id), cb=self._on_result
        )
        with contextlib.suppress(NatsError, TimeoutError):
            await self.refresh()
        self._task = asyncio.create_task(self._loop())
        _live.add(self)
        _register_gauges()

    async def stop(self) -> None:
        _live.discard(self)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._sub is not None:
            with contextlib.suppress(NatsError):
                await self._sub.unsubscribe()

    async def refresh(self) -> None:
        lanes = {lane_of(r) for r in last_seen(self.nc, subjects.WORKER_SERVICE)}
        self.state = await read_queue(self.nc.jetstream(timeout=max(1.0, self.every_s)), lanes)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            if not self.nc.is_connected:
                continue
            try:
                await self.refresh()
            except (NatsError, TimeoutError) as exc:
                log.debug("queue view refresh failed: %r", exc)

    async def _on_result(self, msg: Msg) -> None:
        try:
            self.decoding.add(decode_result(msg.data))
        except (msgspec.DecodeError, msgspec.ValidationError):
            pass  # the router reports what it cannot read

    def readings(self) -> Readings:
        state = self.state
        out: dict[str, list[tuple[float, dict[str, str]]]] = {
            key: []
            for key in (
                "consumer.pending",
                "consumer.ack_pending",
                "consumer.redelivered",
                "consumer.waiting",
                "stream.messages",
                "stream.bytes",
            )
        }
        for c in state.consumers.values():
            attrs = {ATTR_STREAM: c.stream, ATTR_CONSUMER: c.name}
            out["consumer.pending"].append((c.pending, attrs))
            out["consumer.ack_pending"].append((c.ack_pending, attrs))
            out["consumer.redelivered"].append((c.redelivered, attrs))
            out["consumer.waiting"].append((c.waiting, attrs))
        for s in state.streams.values():
            out["stream.messages"].append((s.messages, {ATTR_STREAM: s.name}))
            out["stream.bytes"].append((s.bytes, {ATTR_STREAM: s.name}))
        if subjects.STREAM_DEAD in state.streams:
            out["dead_letters"] = [(state.dead_letters, {})]
        out["workers.alive"] = [(self.workers(), {})]
        return out


# The gauges are registered once per process and read every running view
# (one per edge; tests run several edges in one process).
_live: set[QueueView] = set()
_registered = False


def _readings() -> Readings:
    merged: dict[str, list[tuple[float, dict[str, str]]]] = {}
    for view in list(_live):
        for key, values in view.readings().items():
            merged.setdefault(key, []).extend(values)
    return merged


def _register_gauges() -> None:
    global _registered
    if not _registered:
        observe_queue(_readings)
        _registered = True


queue_view_key = web.AppKey("queue_view", QueueView)


def context(
    nats_key: web.AppKey[NATS], edge_id_key: web.AppKey[str], admission_key: web.AppKey[Admission]
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context running the app's QueueView; append it after the one that
    connects to NATS and starts admission (whose view of live workers it reports)."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        view = QueueView(
            app[nats_key], app[edge_id_key], workers=lambda: app[admission_key].workers
        )
        await view.start()
        app[queue_view_key] = view
        yield
        await view.stop()

    return ctx
