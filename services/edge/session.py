"""One device session: socket frames in, segments out, events back.

The session owns its timeline (chunk repair), its segmenter (VAD), the set of
segments it published and still waits on, and an outbox drained by one writer
task, so a slow socket never blocks the edge's result routing.
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
from nats.js import JetStreamContext
from nats.js.errors import APIError

from jetstream import subjects
from observability.tracing import get_tracer, inject_headers
from schemas import device as ev
from schemas.pipeline import ErrorResult, Result, ResultMessage, Segment, encode_segment
from services.edge.params import StreamParams
from services.edge.settings import EdgeSettings
from services.edge.timeline import Timeline
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


class Session:
    def __init__(
        self,
        ws: web.WebSocketResponse,
        js: JetStreamContext,
        settings: EdgeSettings,
        params: StreamParams,
        edge_id: str,
        session_id: str,
        resume_token: str,
        tenant: str,
    ) -> None:
        self.ws = ws
        self.js = js
        self.settings = settings
        self.params = params
        self.edge_id = edge_id
        self.id = session_id
        self.resume_token = resume_token
        self.tenant = tenant
        self.counters = SessionCounters()
        self.segmenter = Segmenter(
            params.sample_rate,
            VadConfig(
                mode=settings.vad_mode,
                preroll_ms=settings.preroll_ms,
                endpoint_ms=settings.endpoint_ms,
                trailing_pad_ms=settings.trailing_pad_ms,
                min_speech_ms=settings.min_speech_ms,
                max_utterance_ms=settings.max_utterance_ms,
            ),
        )
        self.timeline = (
            Timeline(params.sample_rate, settings.reorder_chunks)
            if params.framing == "msgpack"
            else None
        )
        self._next_segment = 0
        self.outstanding: set[int] = set()
        self._delivered: set[int] = set()
        self._settled = asyncio.Event()
        self._settled.set()
        self._recent: deque[str] = deque()
        self._recent_len = 0
        self._outbox: asyncio.Queue[ev.ServerEvent | None] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self.started = time.monotonic()
        self._audio_s = 0.0

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

    # --- results from workers (called by the router) -------------------------

    def on_result(self, result: ResultMessage) -> None:
        number = result.segment
        if number in self._delivered:
            return  # a redelivered segment transcribed twice: the device sees it once
        self._delivered.add(number)
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
            self._remember(result.text)
        elif isinstance(result, ErrorResult):
            self.counters.errors += 1
            self.send(ev.Error(code=result.code, message=result.message, segment=number))
        self._settle(number)

    def _settle(self, number: int) -> None:
        self.outstanding.discard(number)
        if not self.outstanding:
            self._settled.set()

    def _remember(self, text: str) -> None:
        if not text:
            return
        self._recent.append(text)
        self._recent_len += len(text) + 1
        while self._recent_len > self.settings.prompt_chars and len(self._recent) > 1:
            self._recent_len -= len(self._recent.popleft()) + 1

    @property
    def prompt(self) -> str:
        return " ".join(self._recent)[-self.settings.prompt_chars :]

    # --- inbound ------------------------------------------------------------

    async def run(self) -> None:
        """Serve the socket until it closes; always leaves it closed."""
        self._writer = asyncio.create_task(self._write_loop(), name=f"writer-{self.id}")
        self.send(
            ev.SessionStarted(
                session_id=self.id,
                resume_token=self.resume_token,
                sample_rate=self.params.sample_rate,
                language=self.params.language,
            )
        )
        code, reason = WSCloseCode.OK, "bye"
        try:
            code, reason = await self._read_loop()
        except ProtocolError as exc:
            log.info("session %s: closing %d: %s", self.id, exc.code, exc.reason)
            code, reason = exc.code, exc.reason
        finally:
            await self._close(code, reason)

    async def _read_loop(self) -> tuple[int, str]:
        while True:
            try:
                msg = await self.ws.receive(timeout=self.settings.idle_timeout_s)
            except TimeoutError:
                return (
                    CLOSE_IDLE,
                    f"idle: no audio or KeepAlive for {self.settings.idle_timeout_s:g} s",
                )
            if msg.type == WSMsgType.BINARY:
                await self._on_audio(msg.data)
            elif msg.type == WSMsgType.TEXT:
                if await self._on_control(msg.data):
                    return WSCloseCode.OK, "CloseStream: all finals sent"
            elif msg.type == WSMsgType.ERROR:
                exc = self.ws.exception()
                code = getattr(exc, "code", WSCloseCode.PROTOCOL_ERROR)
                raise ProtocolError(code, f"bad frame: {exc}")
            else:  # CLOSE, CLOSING, CLOSED: the device hung up
                return WSCloseCode.OK, "closed by client"

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
            await self._feed(data)
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
        for pcm in self.timeline.push(chunk):
            await self._feed(pcm)

    async def _feed(self, pcm: bytes) -> None:
        for event in self.segmenter.feed(pcm):
            await self._on_vad(event)

    async def _on_vad(self, event: SpeechStart | Utterance | Discarded) -> None:
        if isinstance(event, SpeechStart):
            self.send(ev.SpeechStarted(t_ms=event.t_ms))
        elif isinstance(event, Utterance):
            number = self._next_segment
            self._next_segment += 1
            if not event.cut:
                self.send(ev.SpeechEnded(t_ms=event.end_ms, segment=number))
            await self._publish(number, event)
        else:
            self.send(ev.SpeechEnded(t_ms=event.end_ms, segment=None))

    async def _publish(self, number: int, utt: Utterance) -> None:
        segment = Segment(
            session_id=self.id,
            edge_id=self.edge_id,
            segment=number,
            start_ms=utt.start_ms,
            end_ms=utt.end_ms,
            sample_rate=self.params.sample_rate,
            pcm=utt.pcm,
            language=self.params.language,
            prompt=self.prompt,
            tenant=self.tenant,
        )
        headers = {
            subjects.Header.MSG_ID: subjects.segment_msg_id(self.id, number),
            subjects.Header.TENANT: self.tenant,
            subjects.Header.SESSION: self.id,
        }
        self.outstanding.add(number)
        self._settled.clear()
        with tracer.start_as_current_span(
            "segment.publish",
            attributes={
                "escapement.session": self.id,
                "escapement.segment": number,
                "escapement.tenant": self.tenant,
            },
        ):
            inject_headers(headers)
            try:
                await self.js.publish(
                    subjects.segments_subject(self.edge_id, self.id),
                    encode_segment(segment),
                    headers=headers,
                    timeout=self.settings.publish_timeout_s,
                )
            except APIError as exc:
                log.warning(
                    "session %s: segment %d refused by JetStream: %s",
                    self.id,
                    number,
                    exc.description,
                )
                self.send(
                    ev.Overloaded(
                        message=f"queue refused segment {number}: {exc.description}", segment=number
                    )
                )
                self._settle(number)
                return
            except (NatsError, TimeoutError) as exc:
                log.warning("session %s: segment %d not published: %r", self.id, number, exc)
                self.send(
                    ev.Error(
                        code="publish_failed",
                        message=f"segment {number} could not be queued",
                        segment=number,
                    )
                )
                self._settle(number)
                return
        self.counters.segments += 1

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
            for pcm in self.timeline.flush():
                await self._feed(pcm)
        for event in self.segmenter.flush():
            await self._on_vad(event)

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

    async def _close(self, code: int, reason: str) -> None:
        self._outbox.put_nowait(None)
        if self._writer is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._writer), timeout=5)
            except TimeoutError:
                self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        if not self.ws.closed:
            await self.ws.close(code=code, message=reason.encode()[:MAX_REASON])

    async def abort(self) -> None:
        """Edge shutdown: close with 1001 Going Away."""
        if not self.ws.closed:
            await self.ws.close(code=WSCloseCode.GOING_AWAY, message=b"edge shutting down")
