"""One device session: socket frames in, segments out, events back.

The session owns its timeline (chunk repair), its segmenter (VAD), the
segments it queued and still waits on, and two tasks: a writer that drains the
outbox to the socket (a slow socket never blocks result routing) and a
publisher that queues segments on JetStream in order, retrying through a NATS
outage for up to `outage_buffer_s` (the device is told which segment failed if
the outage outlasts that). Reading the socket never waits on NATS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass

import msgspec
from aiohttp import WSCloseCode, WSMsgType, web
from nats.errors import Error as NatsError
from nats.errors import MaxPayloadError
from nats.js import JetStreamContext
from nats.js.errors import APIError

from jetstream import subjects
from observability.metrics import ATTR_KIND, ATTR_REASON, Metrics
from observability.tracing import get_tracer, inject_headers
from schemas import device as ev
from schemas.pipeline import (
    ErrorResult,
    Result,
    ResultMessage,
    Segment,
    SessionRecord,
    encode_segment,
)
from services.edge.params import StreamParams
from services.edge.settings import EdgeSettings
from services.edge.store import SessionStore
from services.edge.timeline import Timeline, TimelineGap
from services.edge.vad import Discarded, Segmenter, SpeechStart, Utterance, VadConfig

log = logging.getLogger(__name__)
tracer = get_tracer("escapement.edge")

# Close codes beyond RFC 6455's, in the 4000-4999 private range.
CLOSE_IDLE = 4008  # no audio and no KeepAlive within idle_timeout_s
MAX_REASON = 120  # close reasons must fit in a control frame


class ProtocolError(Exception):
    """Bad input from the device: the socket is closed with `code` and `reason`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass
class SessionCounters:
    bytes_in: int = 0
    frames_in: int = 0
    segments: int = 0
    finals: int = 0
    errors: int = 0
    throttled_s: float = 0.0
    publish_retries: int = 0


class Delivered:
    """Which segments the device has been given, in bounded memory.

    Everything below `floor` was delivered; `above` holds the few delivered
    out of order beyond it. Memory stays O(segments in flight), not O(session).
    """

    def __init__(self, floor: int = 0) -> None:
        self.floor = floor
        self.above: set[int] = set()

    def __contains__(self, number: int) -> bool:
        return number < self.floor or number in self.above

    def add(self, number: int) -> None:
        if number < self.floor:
            return
        self.above.add(number)
        while self.floor in self.above:
            self.above.discard(self.floor)
            self.floor += 1


@dataclass(frozen=True, slots=True)
class _Queued:
    number: int
    segment: Segment
    queued_at: float


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
        delivered_below: int = 0,
    ) -> None:
        self.ws = ws
        self.js = js
        self.store = store
        self.settings = settings
        self.params = params
        self.record = record
        self.id = record.session_id
        self.edge_id = record.edge_id
        self.tenant = record.tenant
        self.resume_token = resume_token
        self.counters = SessionCounters()
        self.metrics = metrics or Metrics()
        self._attrs = {"tenant": record.tenant}
        self.offset_ms = record.position_ms  # a resumed session goes on where it stopped
        self.segmenter = Segmenter(
            params.sample_rate,
            VadConfig(
                mode=settings.vad_mode,
                preroll_ms=settings.preroll_ms,
                endpoint_ms=settings.endpoint_ms,
                trailing_pad_ms=settings.trailing_pad_ms,
                min_speech_ms=settings.min_speech_ms,
                # a segment must fit a NATS message: at 48 kHz that is ~9 s, not 15
                max_utterance_ms=min(
                    settings.max_utterance_ms,
                    settings.max_segment_bytes * 1000 // (2 * params.sample_rate),
                ),
            ),
        )
        self.timeline = (
            Timeline(params.sample_rate, settings.reorder_chunks)
            if params.framing == "msgpack"
            else None
        )
        self._next_segment = record.next_segment
        self.outstanding: dict[int, float] = {}  # segment -> when it was queued (monotonic)
        self.delivered = Delivered(delivered_below)
        self._errored: set[int] = set()  # answered with an Error; a replayed Final may follow
        self._settled = asyncio.Event()
        self._settled.set()
        self._recent: deque[str] = deque()
        self._recent_len = 0
        self._outbox: asyncio.Queue[ev.ServerEvent | None] = asyncio.Queue()
        self._pubq: asyncio.Queue[_Queued | None] = asyncio.Queue()
        self._pub_bytes = 0
        self._tasks: list[asyncio.Task[None]] = []
        self.started = time.monotonic()
        self._audio_s = 0.0
        self._fed_bytes = 0
        self.closed_normally = False
        self.close_code: int | None = None  # the code this edge closed with, if it closed first
        self.superseded = False  # resumed on another socket: that one owns the record now
        self.finished = asyncio.Event()  # set once closed, its segments queued and record saved

    # --- outbound -----------------------------------------------------------

    def send(self, event: ev.ServerEvent) -> None:
        self._outbox.put_nowait(event)

    async def _write_loop(self) -> None:
        while True:
            event = await self._outbox.get()
            if event is None:
                return
            if self.ws.closed:
                continue  # keep draining so nobody waits on a dead socket
            try:
                await self.ws.send_str(ev.encode_event(event))
            except ConnectionError:
                log.info("session %s: socket gone while sending", self.id)

    # --- results from workers (called by the router or a replay) -------------

    def on_result(self, result: ResultMessage) -> None:
        number = result.segment
        if number < 0:  # an error about a segment nobody could number (a dead letter)
            self.counters.errors += 1
            self.send(
                ev.Error(code=result.code, message=result.message)
                if isinstance(result, ErrorResult)
                else ev.Error(code="bad_result", message="a result without a segment number")
            )
            return
        if number in self.delivered:
            if not (isinstance(result, Result) and number in self._errored):
                return  # a redelivered segment transcribed twice: the device sees it once
            self._errored.discard(number)  # replayed from the dead letters: now it has a Final
        self.delivered.add(number)
        self.metrics.results_delivered.add(1, self._attrs)
        queued_at = self.outstanding.get(number)
        if queued_at:  # from the end of the utterance (when it was queued) to now
            self.metrics.final_latency_ms.record((time.monotonic() - queued_at) * 1000, self._attrs)
        if isinstance(result, Result):
            self.counters.finals += 1
            self.send(
                ev.Final(
                    segment=number,
                    text=result.text,
                    start_ms=result.start_ms,
                    end_ms=result.end_ms,
                    words=result.words,
                    engine=result.engine,
                    inference_ms=result.inference_ms,
                )
            )
            self.remember(result.text)
        elif isinstance(result, ErrorResult):
            self._errored.add(number)
            self.counters.errors += 1
            self.send(ev.Error(code=result.code, message=result.message, segment=number))
        self._settle(number)

    def expect(self, numbers: list[int], since: float = 0.0) -> None:
        """Results for these segments are owed to the device (a resumed session's in-flight ones)."""
        for n in numbers:
            if n not in self.delivered:
                self.outstanding[n] = since
        if self.outstanding:
            self._settled.clear()

    def stale(self, older_than_s: float) -> bool:
        """Some result has been owed for longer than this: worth looking it up in the store."""
        now = time.monotonic()
        return any(now - t > older_than_s for t in self.outstanding.values())

    def _settle(self, number: int) -> None:
        self.outstanding.pop(number, None)
        if not self.outstanding:
            self._settled.set()

    def remember(self, text: str) -> None:
        if not text:
            return
        self._recent.append(text)
        self._recent_len += len(text) + 1
        while self._recent_len > self.settings.prompt_chars and len(self._recent) > 1:
            self._recent_len -= len(self._recent.popleft()) + 1

    @property
    def prompt(self) -> str:
        return " ".join(self._recent)[-self.settings.prompt_chars :]

    @property
    def position_ms(self) -> int:
        return self.offset_ms + self._fed_bytes * 1000 // (2 * self.params.sample_rate)

    # --- lifecycle ------------------------------------------------------------

    async def run(self, before_read: list[ResultMessage] | None = None) -> None:
        """Serve the socket until it closes; always leaves it closed.

        `before_read`: stored results a resumed device missed, sent first, in order.
        """
        self._tasks = [
            asyncio.create_task(self._publish_loop(), name=f"publisher-{self.id}"),
            asyncio.create_task(self._write_loop(), name=f"writer-{self.id}"),
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
            left = self.settings.max_session_s - (time.monotonic() - self.started)
            if left <= 0:
                await self._flush()
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
            # Segments already heard are queued even if the device is gone: it may resume.
            self._pubq.put_nowait(None)
            publisher, writer = self._tasks
            await _finish(
                publisher, self.settings.outage_buffer_s + self.settings.publish_timeout_s
            )
            if not self.superseded:
                await self._save(state="closed" if self.closed_normally else "detached")
            self._outbox.put_nowait(None)
            await _finish(writer, 5.0)
            await self.abort(code, reason)
        finally:
            self.finished.set()

    async def drain(self, deadline_s: float) -> None:
        """Edge shutdown: queue what was heard, deliver what is owed (bounded), then 1001."""
        await self._flush()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._settled.wait(), timeout=deadline_s)
        await self.abort(WSCloseCode.GOING_AWAY, "edge shutting down")

    async def abort(
        self, code: int = WSCloseCode.GOING_AWAY, reason: str = "edge shutting down"
    ) -> None:
        if not self.ws.closed:
            self.close_code = code  # ws.close_code would be the device's echo of it
            await self.ws.close(code=code, message=reason.encode()[:MAX_REASON])

    async def _save(self, state: str = "open") -> None:
        record = self.record
        record.next_segment = self._next_segment
        record.position_ms = self.position_ms
        record.state = state
        record.detached_at = time.time() if state == "detached" else 0.0
        await self.store.put(record)

    # --- inbound --------------------------------------------------------------

    async def _pace(self, n_bytes: int) -> None:
        """Hold a device that sends faster than real time (beyond a burst) to the rate limit.

        Not reading the socket lets TCP push back on the sender; nothing is dropped.
        """
        self._audio_s += n_bytes / 2 / self.params.sample_rate
        limit = self.settings.max_audio_rate
        if self.params.fast or limit <= 0:
            return
        allowed = (time.monotonic() - self.started) * limit + self.settings.audio_burst_s
        ahead = self._audio_s - allowed
        if ahead > 0:
            self.counters.throttled_s += ahead / limit
            await asyncio.sleep(ahead / limit)

    async def _on_audio(self, data: bytes) -> None:
        self.counters.frames_in += 1
        self.counters.bytes_in += len(data)
        await self._pace(len(data))
        if self.timeline is None:
            if len(data) % 2:
                raise ProtocolError(
                    WSCloseCode.INVALID_TEXT,
                    f"odd-length PCM frame ({len(data)} bytes); need s16le samples",
                )
            self._feed(data)
            return
        try:
            chunk = ev.decode_chunk(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ProtocolError(
                WSCloseCode.INVALID_TEXT, f"invalid AudioChunk msgpack: {exc}"
            ) from None
        if len(chunk.pcm) % 2 or chunk.seq < 0:
            raise ProtocolError(
                WSCloseCode.INVALID_TEXT,
                f"invalid AudioChunk seq={chunk.seq} ({len(chunk.pcm)} bytes of pcm)",
            )
        try:
            pieces = self.timeline.push(chunk)
        except TimelineGap as exc:
            raise ProtocolError(WSCloseCode.INVALID_TEXT, str(exc)) from None
        for pcm in pieces:
            self._feed(pcm)

    def _feed(self, pcm: bytes) -> None:
        self._fed_bytes += len(pcm)
        for event in self.segmenter.feed(pcm):
            self._on_vad(event)

    def _on_vad(self, event: SpeechStart | Utterance | Discarded) -> None:
        offset = self.offset_ms
        if isinstance(event, SpeechStart):
            self.send(ev.SpeechStarted(t_ms=offset + event.t_ms))
        elif isinstance(event, Utterance):
            number = self._next_segment
            self._next_segment += 1
            if not event.cut:
                self.send(ev.SpeechEnded(t_ms=offset + event.end_ms, segment=number))
            self._enqueue(number, event)
        else:
            self.send(ev.SpeechEnded(t_ms=offset + event.end_ms, segment=None))

    def _enqueue(self, number: int, utt: Utterance) -> None:
        segment = Segment(
            session_id=self.id,
            edge_id=self.edge_id,
            segment=number,
            start_ms=self.offset_ms + utt.start_ms,
            end_ms=self.offset_ms + utt.end_ms,
            sample_rate=self.params.sample_rate,
            pcm=utt.pcm,
            language=self.params.language,
            prompt=self.prompt,
            tenant=self.tenant,
        )
        self.outstanding[number] = time.monotonic()
        self._settled.clear()
        if self._pub_bytes + len(utt.pcm) > self.settings.publish_buffer_bytes:
            self._failed(
                number, "publish_buffer_full", f"segment {number} could not be queued: buffer full"
            )
            return
        self._pub_bytes += len(utt.pcm)
        self._pubq.put_nowait(_Queued(number, segment, time.monotonic()))

    def _failed(self, number: int, code: str, message: str, overloaded: bool = False) -> None:
        """A segment this edge could not queue: the device is told, the record remembers."""
        log.warning("session %s: %s", self.id, message)
        self.metrics.segments_failed.add(1, {ATTR_REASON: code, **self._attrs})
        self.counters.errors += 1
        failed = self.record.failed
        failed.append(number)
        del failed[: max(0, len(failed) - 100)]  # bounded: a resume stops waiting for these
        if overloaded:
            self.send(ev.Overloaded(message=message, segment=number))
        else:
            self.send(ev.Error(code=code, message=message, segment=number))
        self._settle(number)

    async def _publish_loop(self) -> None:
        try:
            while True:
                item = await self._pubq.get()
                if item is None:
                    return
                try:
                    await self._publish(item)
                finally:
                    self._pub_bytes -= len(item.segment.pcm)
                if not self.superseded:
                    await self._save()
        except asyncio.CancelledError:
            # out of time (the session is closing): whatever is still waiting is told, not lost
            while not self._pubq.empty():
                left = self._pubq.get_nowait()
                if left is not None:
                    self._failed(
                        left.number, "publish_failed", f"segment {left.number} could not be queued"
                    )
            raise

    async def _publish(self, item: _Queued) -> None:
        """Queue one segment on JetStream; retry through an outage (dedup makes retries safe)."""
        number, segment = item.number, item.segment
        headers = {
            subjects.Header.MSG_ID: subjects.segment_msg_id(self.id, number),
            subjects.Header.TENANT: self.tenant,
            subjects.Header.SESSION: self.id,
        }
        payload = encode_segment(segment)
        subject = subjects.segments_subject(self.edge_id, self.id)
        with tracer.start_as_current_span(
            "segment.publish",
            attributes={
                "escapement.session": self.id,
                "escapement.segment": number,
                "escapement.tenant": self.tenant,
            },
        ):
            inject_headers(headers)
            while True:
                try:
                    left = self.settings.outage_buffer_s - (time.monotonic() - item.queued_at)
                    timeout = max(1.0, min(self.settings.publish_timeout_s, left))
                    await self.js.publish(subject, payload, headers=headers, timeout=timeout)
                    break
                except APIError as exc:  # JetStream's own limits (discard: new)
                    message = f"the queue refused segment {number}: {exc.description}"
                    self._failed(number, "queue_refused", message, overloaded=True)
                    return
                except MaxPayloadError as exc:  # not an outage: it will never fit
                    self._failed(number, "segment_too_large", f"segment {number}: {exc}")
                    return
                except (NatsError, TimeoutError) as exc:
                    waited = time.monotonic() - item.queued_at
                    if waited >= self.settings.outage_buffer_s:
                        why = type(exc).__name__
                        message = f"segment {number} could not be queued for {waited:.0f} s ({why})"
                        self._failed(number, "publish_failed", message)
                        return
                    self.counters.publish_retries += 1
                    await asyncio.sleep(min(0.5, self.settings.outage_buffer_s - waited))
        self.counters.segments += 1
        self.metrics.segments_published.add(1, self._attrs)

    async def _on_control(self, text: str) -> bool:
        """Handle a control message; True when the session should close (CloseStream)."""
        try:
            message = ev.decode_control(text)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.send(
                ev.Error(code="bad_control", message=f"unknown or malformed control message: {exc}")
            )
            return False
        if isinstance(message, ev.Finalize):
            await self._flush()
        elif isinstance(message, ev.CloseStream):
            await self._flush()
            await self._wait_settled()
            return True
        # KeepAlive: receiving it reset the idle timer. Interrupt: no interim
        # work is queued ahead of finals, so there is nothing to drop.
        return False

    async def _flush(self) -> None:
        if self.timeline is not None:
            try:
                pieces = self.timeline.flush()
            except TimelineGap as exc:
                raise ProtocolError(WSCloseCode.INVALID_TEXT, str(exc)) from None
            for pcm in pieces:
                self._feed(pcm)
        for event in self.segmenter.flush():
            self._on_vad(event)

    async def _wait_settled(self) -> None:
        try:
            await asyncio.wait_for(self._settled.wait(), timeout=self.settings.close_wait_s)
        except TimeoutError:
            missing = sorted(self.outstanding)
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
