"""One device socket: frames in, the streaming core in the middle, events and segments out.

What the device sees is decided by `StreamCore` (services/edge/stream.py), which
does no I/O. This adapter reads the socket (paced to real time), feeds the core,
sends its events through a writer task (a slow socket never blocks result
routing), hands its segments to a `SegmentPublisher` task, saves the session's
record, and closes. Reading the socket never waits on NATS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import msgspec
from aiohttp import WSCloseCode, WSMsgType, web
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from observability.metrics import ATTR_KIND, ATTR_REASON, Metrics
from schemas import device as ev
from schemas.pipeline import ResultMessage, Segment, SessionRecord
from services.edge.params import StreamParams
from services.edge.publisher import PublishFailure, SegmentPublisher
from services.edge.settings import EdgeSettings
from services.edge.store import SessionStore
from services.edge.stream import BadAudio, Output, StreamCore, StreamStart, Withdraw

log = logging.getLogger(__name__)

# Close codes beyond RFC 6455's, in the 4000-4999 private range.
CLOSE_IDLE = 4008  # no audio and no KeepAlive within idle_timeout_s
CLOSE_SLOW_READER = 4009  # the client left outbox_max_frames / outbox_max_bytes unread
MAX_REASON = 120  # close reasons must fit in a control frame


class ProtocolError(Exception):
    """Bad input from the device: the socket is closed with `code` and `reason`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Dialect:
    """How a session speaks to its client; the default is the native protocol (`/v1/stream`).

    `/v1/listen` speaks Deepgram's with a subclass (services/edge/deepgram.py). Each hook
    returns the text frames to send, in order, on the session's one writer.
    """

    def render(self, event: ev.ServerEvent, core: StreamCore) -> list[str]:
        """Frames for one event of the streaming core (always `SessionStarted` first)."""
        return [ev.encode_event(event)]

    def control(self, text: str) -> ev.ControlMessage | list[str]:
        """A client text frame: a control message for the session to act on, or the
        frames that answer it in full. Raises msgspec's errors for a bad one."""
        return ev.decode_control(text)

    def audio(self, data: bytes, core: StreamCore) -> list[str]:
        """After a binary frame was fed to the core."""
        return []

    def finalized(self, core: StreamCore) -> list[str]:
        """After a `Finalize` cut the utterance in progress."""
        return []

    def closing(self, code: int, reason: str, core: StreamCore) -> tuple[int, str, list[str]]:
        """The close code and reason to send, and the frames to send before them."""
        return code, reason, []


@dataclass
class SessionCounters:
    bytes_in: int = 0
    frames_in: int = 0
    segments: int = 0
    finals: int = 0
    interims: int = 0
    errors: int = 0
    throttled_s: float = 0.0
    publish_retries: int = 0


class Session:
    def __init__(
        self,
        ws: web.WebSocketResponse,
        js: JetStreamContext,
        store: SessionStore,
        settings: EdgeSettings,
        params: StreamParams,
        record: SessionRecord,
        resume_token: str,
        metrics: Metrics | None = None,
        start: StreamStart | None = None,
        dialect: Dialect | None = None,
        nc: NATS | None = None,
    ) -> None:
        self.ws = ws
        self.dialect = dialect or Dialect()
        self.store = store
        self.settings = settings
        self.params = params
        self.record = record
        self.id = record.session_id
        self.tenant = record.tenant
        self.resume_token = resume_token
        self.counters = SessionCounters()
        self.metrics = metrics or Metrics()
        self._attrs = {"tenant": record.tenant}
        self.core = StreamCore(
            record.session_id,
            record.edge_id,
            record.tenant,
            params,
            settings.stream_config(params),
            start or StreamStart(next_segment=record.next_segment, position_ms=record.position_ms),
        )
        self.publisher = SegmentPublisher(
            js,
            outage_buffer_s=settings.outage_buffer_s,
            publish_timeout_s=settings.publish_timeout_s,
            buffer_bytes=settings.publish_buffer_bytes,
            on_failure=self._publish_failed,
            on_published=self._published,
            notify=nc.publish if nc is not None else None,
        )
        self._outbox: asyncio.Queue[str | None] = asyncio.Queue()  # text frames
        self._outbox_bytes = 0  # bounded by outbox_max_frames / _bytes: then closed 4009
        self.slow = ""  # why the client is being closed as a slow reader, once it is
        self._queued_ms: dict[int, int] = {}  # final segments published: audio ms charged
        self._changed = asyncio.Event()  # a result came in: the core may have settled
        self._tasks: list[asyncio.Task[None]] = []
        self.started = time.monotonic()
        self._audio_s = 0.0
        self._claimed_s = 0.0  # of it, silence filled in for claimed gaps
        self.closed_normally = False
        self.close_code: int | None = None  # the code this edge closed with, if it closed first
        self.superseded = False  # resumed on another socket: that one owns the record now
        self.finished = asyncio.Event()  # set once closed, its segments queued and record saved

    # --- what the router needs -------------------------------------------------

    def on_result(self, result: ResultMessage) -> None:
        self._dispatch(self.core.result(result, time.monotonic()))
        self._changed.set()

    def owes(self, number: int) -> bool:
        return self.core.owes(number)

    def stale(self, older_than_s: float) -> bool:
        return self.core.stale(older_than_s, time.monotonic())

    @property
    def owing(self) -> bool:
        return bool(self.core.outstanding)

    def supersede(self) -> None:
        """Resumed on a new socket: that one owns the record from now on."""
        self.superseded = True

    # --- core outputs -------------------------------------------------------------

    def send(self, event: ev.ServerEvent) -> None:
        self._queue(self.dialect.render(event, self.core))

    @property
    def queued_audio_s(self) -> float:
        """Audio of this session's final segments queued and not yet answered (at least
        1 s each: a decode costs that much however short the segment), for admission."""
        return sum(ms for n, ms in self._queued_ms.items() if self.core.owes(n)) / 1000

    def _queue(self, frames: list[str]) -> None:
        for frame in frames:
            if self.slow:
                return  # closing 4009: what it missed is stored, a resume replays it
            self._outbox.put_nowait(frame)
            self._outbox_bytes += len(frame)

    def _overfull(self) -> int:
        """The frames waiting for the socket when over the outbox's bounds, else 0."""
        n, settings = self._outbox.qsize(), self.settings
        over = n > settings.outbox_max_frames or self._outbox_bytes > settings.outbox_max_bytes
        return n if over else 0

    async def _check_reader(self) -> None:
        """Give the writer its turn; still over the bounds, the client is not reading."""
        if not self._overfull():
            return
        await asyncio.sleep(0)
        if unread := self._overfull():
            self.slow = f"slow reader: {unread} events unread"
            self.metrics.slow_readers.add(1, self._attrs)

    def _dispatch(self, outputs: list[Output]) -> None:
        for item in outputs:
            if isinstance(item, Segment):
                self.publisher.enqueue(item)
                continue
            if isinstance(item, Withdraw):
                self.publisher.withdraw(item.number, item.revision)
                continue
            if isinstance(item, ev.Final):
                self.counters.finals += 1
                self.metrics.results_delivered.add(1, self._attrs)
            elif isinstance(item, ev.Interim):
                self.counters.interims += 1
            elif isinstance(item, ev.Error | ev.Overloaded):
                self.counters.errors += 1
            self.send(item)
        for latency in self.core.latencies_s:  # from the endpoint (confirmed) to the Final
            self.metrics.final_latency_ms.record(latency * 1000, self._attrs)
        self.core.latencies_s.clear()

    def _publish_failed(self, failure: PublishFailure) -> None:
        log.warning("session %s: %s", self.id, failure.message)
        self.metrics.segments_failed.add(1, {ATTR_REASON: failure.code, **self._attrs})
        self._dispatch(
            self.core.failed_segment(
                failure.segment, failure.code, failure.message, failure.overloaded
            )
        )
        self._changed.set()

    async def _published(self, segment: Segment) -> None:
        if segment.final:
            owed = {n: ms for n, ms in self._queued_ms.items() if self.core.owes(n)}
            owed[segment.segment] = max(1000, segment.end_ms - segment.start_ms)
            self._queued_ms = owed
        self.counters.segments += 1
        self.metrics.segments_published.add(1, self._attrs)
        if not self.superseded:
            await self._save()

    async def _writer(self) -> None:
        while True:
            frame = await self._outbox.get()
            if frame is None:
                return
            self._outbox_bytes -= len(frame)
            if self.ws.closed:
                continue  # keep draining so nobody waits on a dead socket
            try:
                await self.ws.send_str(frame)
            except ConnectionError:
                log.info("session %s: socket gone while sending", self.id)

    # --- lifecycle ------------------------------------------------------------

    async def run(self, before_read: list[ResultMessage] | None = None) -> None:
        """Serve the socket until it closes; always leaves it closed.

        `before_read`: stored results a resumed device missed, sent first, in order.
        """
        self._tasks = [
            asyncio.create_task(self.publisher.run(), name=f"publisher-{self.id}"),
            asyncio.create_task(self._writer(), name=f"writer-{self.id}"),
        ]
        self.send(
            ev.SessionStarted(
                session_id=self.id,
                resume_token=self.resume_token,
                sample_rate=self.params.sample_rate,
                language=self.params.language,
            )
        )
        for result in before_read or []:
            self.on_result(result)
        code, reason = WSCloseCode.OK, "bye"
        try:
            code, reason = await self._read_loop()
        except ProtocolError as exc:
            log.info("session %s: closing %d: %s", self.id, exc.code, exc.reason)
            self.metrics.bad_input.add(1, {ATTR_KIND: str(exc.code), **self._attrs})
            code, reason = exc.code, exc.reason
        finally:
            await self._close(code, reason)

    async def _read_loop(self) -> tuple[int, str]:
        idle = self.settings.idle_timeout_s
        while True:
            await self._check_reader()
            if self.slow:
                return CLOSE_SLOW_READER, self.slow
            left = self.settings.max_session_s - (time.monotonic() - self.started)
            if left <= 0:
                self._flush()
                await self._wait_settled()
                return (
                    WSCloseCode.POLICY_VIOLATION,
                    f"max session length {self.settings.max_session_s:g} s reached",
                )
            try:
                msg = await self.ws.receive(timeout=min(idle, left))
            except TimeoutError:
                if left <= idle:
                    continue  # the session's time is up: handled at the top
                return CLOSE_IDLE, f"idle: no audio or KeepAlive for {idle:g} s"
            if msg.type == WSMsgType.BINARY:
                await self._on_audio(msg.data)
            elif msg.type == WSMsgType.TEXT:
                if await self._on_control(msg.data):
                    self.closed_normally = True
                    return WSCloseCode.OK, "CloseStream: all finals sent"
            elif msg.type == WSMsgType.ERROR:
                exc = self.ws.exception()
                code = getattr(exc, "code", WSCloseCode.PROTOCOL_ERROR)
                raise ProtocolError(code, f"bad frame: {exc}")
            else:  # CLOSE, CLOSING, CLOSED: the device hung up
                return WSCloseCode.OK, "closed by client"

    async def _close(self, code: int, reason: str) -> None:
        try:
            # What was heard is queued even if the device is gone: it may resume.
            self._flush_quietly()
            self._dispatch(self.core.release(time.monotonic(), everything=True))
            self.publisher.close()
            publisher, writer = self._tasks
            await _finish(
                publisher, self.settings.outage_buffer_s + self.settings.publish_timeout_s
            )
            self.counters.publish_retries = self.publisher.retries
            if not self.superseded:
                await self._save(state="closed" if self.closed_normally else "detached")
            code, reason, last = self.dialect.closing(code, reason, self.core)
            self._queue(last)
            self._outbox.put_nowait(None)
            await _finish(writer, 0.0 if self.slow else 5.0)  # a slow reader's would block
            await self.abort(code, reason)
        finally:
            self.finished.set()

    async def drain(self, deadline_s: float) -> None:
        """Edge shutdown: queue what was heard, deliver what is owed (bounded), then 1001."""
        self._flush_quietly()
        await self._until_settled(deadline_s)
        await self.abort(WSCloseCode.GOING_AWAY, "edge shutting down")

    async def abort(
        self, code: int = WSCloseCode.GOING_AWAY, reason: str = "edge shutting down"
    ) -> None:
        if not self.ws.closed:
            self.close_code = code  # ws.close_code would be the device's echo of it
            await self.ws.close(
                code=code, message=reason.encode()[:MAX_REASON], drain=not self.slow
            )

    async def _save(self, state: str = "open") -> None:
        record = self.record
        core = self.core
        record.next_segment = core.next_segment
        record.position_ms = core.position_ms
        record.failed = list(core.failed)
        record.revisions = dict(core.confirmed)
        record.state = state
        record.detached_at = time.time() if state == "detached" else 0.0
        await self.store.put(record)

    # --- inbound --------------------------------------------------------------

    async def _pace(self, n_bytes: int, filled_ms: float = 0.0) -> None:
        """Hold a device that sends faster than real time (beyond a burst) to the rate limit.

        Counted on the repaired timeline (silence filled in for lost chunks included),
        so a chunk claiming a long gap costs its claim, not its size. `pace=fast` (a
        file upload) is exempt for the audio it sends, never for the silence it only
        claims (`filled_ms`): no session claims more gap than wall time allows. Not
        reading the socket lets TCP push back on the sender; nothing is dropped.
        """
        self._audio_s += n_bytes / 2 / self.params.sample_rate
        self._claimed_s += filled_ms / 1000
        limit = self.settings.max_audio_rate
        if limit <= 0:
            return
        allowed = (time.monotonic() - self.started) * limit + self.settings.audio_burst_s
        ahead = (self._claimed_s if self.params.fast else self._audio_s) - allowed
        if ahead > 0:
            self.counters.throttled_s += ahead / limit
            await asyncio.sleep(ahead / limit)

    async def _on_audio(self, data: bytes) -> None:
        self.counters.frames_in += 1
        self.counters.bytes_in += len(data)
        fed, filled = self.core.fed_bytes, self._filled_ms()
        self._feed(data)
        self._queue(self.dialect.audio(data, self.core))
        await self._pace(self.core.fed_bytes - fed, self._filled_ms() - filled)

    def _filled_ms(self) -> float:
        """Silence the timeline filled in for chunks claimed lost, so far."""
        timeline = self.core.timeline
        return timeline.stats.silence_ms if timeline is not None else 0.0

    def _feed(self, data: bytes) -> None:
        try:
            self._dispatch(self.core.frame(data, time.monotonic()))
        except BadAudio as exc:
            raise ProtocolError(WSCloseCode.INVALID_TEXT, str(exc)) from None

    async def _on_control(self, text: str) -> bool:
        """Handle a control message; True when the session should close (CloseStream)."""
        try:
            message = self.dialect.control(text)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.send(
                ev.Error(code="bad_control", message=f"unknown or malformed control message: {exc}")
            )
            return False
        if isinstance(message, list):  # answered in full by the dialect
            self._queue(message)
        elif isinstance(message, ev.Finalize):
            self._finalize()
            self._queue(self.dialect.finalized(self.core))
        elif isinstance(message, ev.CloseStream):
            self._flush()
            await self._wait_settled()
            return True
        elif isinstance(message, ev.Interrupt):
            self.core.interrupt()
            await self.publisher.purge_interims(self.id, self.record.edge_id, self.params.model)
        # KeepAlive: receiving it reset the idle timer.
        return False

    def _finalize(self) -> None:
        ignored = self.core.finalizes_ignored
        try:
            self._dispatch(self.core.finalize(time.monotonic()))
        except BadAudio as exc:
            raise ProtocolError(WSCloseCode.INVALID_TEXT, str(exc)) from None
        if self.core.finalizes_ignored > ignored:
            self.metrics.finalize_limited.add(1, self._attrs)

    def _flush_quietly(self) -> None:
        """Closing: what was heard goes out; audio the timeline cannot place is only logged."""
        try:
            self._flush()
        except ProtocolError as exc:
            log.info("session %s: unflushable audio at close: %s", self.id, exc.reason)

    def _flush(self) -> None:
        try:
            self._dispatch(self.core.flush(time.monotonic()))
        except BadAudio as exc:
            raise ProtocolError(WSCloseCode.INVALID_TEXT, str(exc)) from None

    async def _until_settled(self, within_s: float) -> bool:
        """Wait for every owed result; held segments are released as their wait runs out."""
        deadline = time.monotonic() + within_s
        while not self.core.settled:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=min(0.25, left))
            self._dispatch(self.core.release(time.monotonic()))
        return True

    async def _wait_settled(self) -> None:
        if not await self._until_settled(self.settings.close_wait_s):
            missing = sorted(self.core.outstanding)
            self.send(
                ev.Error(
                    code="finals_timeout",
                    message=f"no result within {self.settings.close_wait_s:g} s for segments {missing}",
                )
            )


async def _finish(task: asyncio.Task[None], within_s: float) -> None:
    """Let a session task end by itself within `within_s`, else cancel it."""
    try:
        await asyncio.wait_for(asyncio.shield(task), timeout=within_s)
    except TimeoutError:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    except Exception:  # noqa: BLE001 - a failed task must not stop the rest of the close
        log.exception("session task %s failed", task.get_name())
