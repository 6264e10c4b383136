"""One simulated device session, and what it measured.

A session streams one corpus item through `services.cli.client.stream_audio`
(100 ms chunks paced on the monotonic clock), then reads the events back:

- speech end -> Final: from the moment the audio up to the end of the
  utterance had been sent. The end is the reference span's end (built-in
  corpus) or, for other audio, the VAD's last voiced frame: `SpeechEnded.t_ms`
  minus the edge's trailing pad (the pad is the part of the endpoint silence
  that travels with the segment).
- endpoint wait: `SpeechEnded` receive time minus that same speech-end time;
  inference: `Final.inference_ms`; pipeline overhead: what is left.
- onset -> SpeechStarted, connect -> SessionStarted, the send lag of every
  chunk against its schedule (a slow client shows here, not as server latency).
- lost finals: segments announced by `SpeechEnded` that got neither a Final
  nor an Error/Overloaded by the time the socket closed, and of which the
  edge said nothing at all; abandoned ones: the same, but the edge sent a
  session-wide Error (e.g. `finals_timeout`: it stopped waiting for them).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import msgspec

from loadtest.corpus import Item, word_errors
from schemas import device as ev
from services.cli.client import Received, Refused, StreamRun, stream_audio

# Session outcomes. Every admitted session ends as exactly one of the first three.
COMPLETED, FAILED, TIMED_OUT = "completed", "failed", "timed_out"
REFUSED, CONNECT_ERROR = "refused", "connect_error"


@dataclass(frozen=True)
class SessionOptions:
    url: str
    token: str | None = None
    language: str = "en"
    chunk_ms: int = 100
    realtime: bool = True
    session_timeout_s: float = 60.0  # after CloseStream, for the last finals and the close
    trailing_pad_ms: int = 120  # the edge's trailing_pad_ms, for audio without reference spans
    interim_results: bool = True


@dataclass
class FinalTiming:
    segment: int
    t: float  # when it arrived, seconds since the run started
    latency_ms: float | None  # speech end -> Final (None for a piece cut from longer speech)
    endpoint_ms: float | None
    inference_ms: float
    overhead_ms: float | None
    audio_ms: int


def retry_delay_s(retry_after: float | None) -> float:
    """How long a device waits before it tries again after a refusal or a failed
    session: the edge's Retry-After held within 0.5-10 s, 1 s when it named none."""
    return min(max(retry_after or 1.0, 0.5), 10.0)


@dataclass
class SessionRecord:
    device: int
    seq: int
    item: str
    outcome: str = "pending"
    reason: str = ""  # refusal reason, error, or why it timed out
    http_status: int | None = None
    retry_after: float | None = None
    admitted: bool = False  # the WebSocket upgrade succeeded
    session_id: str = ""
    close_code: int | None = None
    start: float = 0.0  # seconds since the run started
    end: float = 0.0
    session_started_ms: float | None = None
    speech_started_ms: list[float] = field(default_factory=list)
    finals: list[FinalTiming] = field(default_factory=list)
    duplicate_finals: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # Error events by code
    overloaded: int = 0
    lost_segments: list[int] = field(default_factory=list)
    abandoned_segments: list[int] = field(default_factory=list)
    utterances: int | None = None  # known utterances in the audio (built-in corpus)
    missing_utterances: int | None = None  # of those, how many no Final covered
    audio_ms_sent: int = 0
    send_lags_ms: list[float] = field(default_factory=list)
    ref_words: int = 0
    word_errors: int = 0
    text: str = ""

    def refused(self, exc: Refused) -> None:
        self.outcome, self.reason = REFUSED, exc.reason
        self.http_status, self.retry_after = exc.status, exc.retry_after

    @property
    def wer(self) -> float | None:
        return self.word_errors / self.ref_words if self.ref_words else None

    def summary(self) -> dict[str, object]:
        """One line of the report's session log."""
        wer = self.wer
        return {
            "device": self.device,
            "seq": self.seq,
            "item": self.item,
            "outcome": self.outcome,
            "reason": self.reason,
            "session_id": self.session_id,
            "close_code": self.close_code,
            "start_s": round(self.start, 3),
            "end_s": round(self.end, 3),
            "finals": len(self.finals),
            "errors": sum(self.errors.values()),
            "lost": len(self.lost_segments),
            "abandoned": len(self.abandoned_segments),
            "wer": None if wer is None else round(wer, 3),
            "send_lag_max_ms": round(max(self.send_lags_ms), 1) if self.send_lags_ms else None,
        }


def _span_for(item: Item, start_ms: float, end_ms: float) -> tuple[float, float] | None:
    best, best_overlap = None, 0.0
    for span in item.spans or ():
        overlap = min(span[1], end_ms) - max(span[0], start_ms)
        if overlap > best_overlap:
            best, best_overlap = span, overlap
    return best


def speech_end_ms(
    final: ev.Final, item: Item, ended_t_ms: int | None, trailing_pad_ms: int
) -> float | None:
    """Where on the audio the utterance this Final closes stopped being voiced."""
    if item.spans:
        span = _span_for(item, final.start_ms, final.end_ms)
        if span is not None:
            # a piece cut from longer speech ends before its utterance did: no endpoint to time
            return span[1] if final.end_ms >= span[1] else None
    if ended_t_ms is None:
        return None
    return ended_t_ms - trailing_pad_ms


def onset_ms(started: ev.SpeechStarted, item: Item) -> float:
    """The reference onset nearest the VAD's, when there is one close by."""
    if item.spans:
        nearest = min(item.spans, key=lambda s: abs(s[0] - started.t_ms))
        if abs(nearest[0] - started.t_ms) <= 1000:
            return nearest[0]
    return started.t_ms


class _Tracker:
    """Follows one session's events as they arrive (for live latency) and analyses them at the end."""

    def __init__(
        self, rec: SessionRecord, item: Item, opts: SessionOptions, run: StreamRun, clock0: float
    ) -> None:
        self.rec = rec
        self.item = item
        self.opts = opts
        self.run = run
        self.clock0 = clock0
        self.begun = time.monotonic()
        self.ended: dict[int, Received] = {}
        self.finals: dict[int, tuple[Received, ev.Final]] = {}
        self.answered: set[int] = set()  # Error / Overloaded for a segment
        self.gave_up = False  # an Error for the whole session (finals_timeout, ...)
        self.on_final: Callable[[FinalTiming], None] | None = None
        self.on_admitted: Callable[[], None] | None = None

    def on_event(self, received: Received) -> None:
        event = received.event
        rec = self.rec
        if isinstance(event, ev.SessionStarted):
            rec.session_id = event.session_id
            rec.session_started_ms = (received.t - self.begun) * 1000
            if self.on_admitted is not None:
                self.on_admitted()
        elif isinstance(event, ev.SpeechStarted):
            sent = self.run.sent_time_of(onset_ms(event, self.item))
            if sent is not None:
                rec.speech_started_ms.append((received.t - sent) * 1000)
        elif isinstance(event, ev.SpeechEnded):
            if event.segment is not None:
                self.ended[event.segment] = received
        elif isinstance(event, ev.Final):
            if event.segment in self.finals:
                rec.duplicate_finals += 1
                return
            self.finals[event.segment] = (received, event)
            timing = self._time_final(received, event)
            rec.finals.append(timing)
            if self.on_final is not None:
                self.on_final(timing)
        elif isinstance(event, ev.Error):
            rec.errors[event.code] += 1
            if event.segment is not None:
                self.answered.add(event.segment)
            else:
                self.gave_up = True
        elif isinstance(event, ev.Overloaded):
            rec.overloaded += 1
            if event.segment is not None:
                self.answered.add(event.segment)

    def _time_final(self, received: Received, final: ev.Final) -> FinalTiming:
        ended = self.ended.get(final.segment)
        ended_t_ms = ended.event.t_ms if ended is not None else None  # type: ignore[union-attr]
        end_ms = speech_end_ms(final, self.item, ended_t_ms, self.opts.trailing_pad_ms)
        sent = self.run.sent_time_of(end_ms) if end_ms is not None else None
        latency = endpoint = overhead = None
        if sent is not None:
            latency = (received.t - sent) * 1000
            if ended is not None:
                endpoint = (ended.t - sent) * 1000
                overhead = latency - endpoint - final.inference_ms
        return FinalTiming(
            segment=final.segment,
            t=received.t - self.clock0,
            latency_ms=latency,
            endpoint_ms=endpoint,
            inference_ms=final.inference_ms,
            overhead_ms=overhead,
            audio_ms=max(0, final.end_ms - final.start_ms),
        )

    def finish(self) -> None:
        rec, run, item = self.rec, self.run, self.item
        rec.close_code = run.close_code
        rec.end = time.monotonic() - self.clock0
        rec.audio_ms_sent = run.sent[-1][0] if run.sent else 0
        if self.opts.realtime and run.sent:
            first = run.sent[0][1]
            step = self.opts.chunk_ms / 1000
            rec.send_lags_ms = [
                max(0.0, (t - first - i * step) * 1000) for i, (_, t) in enumerate(run.sent)
            ]
        unanswered = sorted(set(self.ended) - set(self.finals) - self.answered)
        if self.gave_up:
            rec.abandoned_segments = unanswered
        else:
            rec.lost_segments = unanswered
        if item.spans:
            rec.utterances = len(item.spans)
            covered = [
                any(min(e, f.end_ms) - max(s, f.start_ms) > 0 for _, f in self.finals.values())
                for s, e in item.spans
            ]
            rec.missing_utterances = covered.count(False)
        rec.text = " ".join(
            f.text for _, f in sorted(self.finals.values(), key=lambda p: p[1].segment) if f.text
        )
        if rec.outcome == COMPLETED:
            rec.word_errors, rec.ref_words = word_errors(item.text, rec.text)


def session_limit_s(item: Item, opts: SessionOptions) -> float:
    """The longest a session may take before it counts as timed out."""
    streaming = item.duration_s * 1.5 + 5 if opts.realtime else 30.0
    return streaming + opts.session_timeout_s + 5


async def run_session(
    http: aiohttp.ClientSession,
    rec: SessionRecord,
    item: Item,
    opts: SessionOptions,
    clock0: float,
    on_final: Callable[[FinalTiming], None] | None = None,
    on_admitted: Callable[[], None] | None = None,
) -> None:
    """Stream `item` as one device session; fills `rec` in place (also when cancelled)."""
    run = StreamRun()
    tracker = _Tracker(rec, item, opts, run, clock0)
    tracker.on_final, tracker.on_admitted = on_final, on_admitted
    rec.start = time.monotonic() - clock0
    rec.item = item.name
    try:
        async with asyncio.timeout(session_limit_s(item, opts)):
            await stream_audio(
                http, opts.url, item.pcm, item.sample_rate, language=opts.language, realtime=opts.realtime,
                chunk_ms=opts.chunk_ms, token=opts.token, on_event=tracker.on_event,
                close_timeout=opts.session_timeout_s, run=run,
            )  # fmt: skip
        rec.outcome = COMPLETED if run.close_code == 1000 else FAILED
        if rec.outcome == FAILED:
            rec.reason = f"closed with {run.close_code} {run.close_reason}".strip()
    except Refused as exc:
        rec.refused(exc)
    except TimeoutError:
        rec.outcome = TIMED_OUT
        rec.reason = (
            "no close after CloseStream"
            if run.sent and len(run.sent) * opts.chunk_ms >= item.duration_s * 1000
            else "session over its time limit"
        )
    except asyncio.CancelledError:
        rec.outcome, rec.reason = TIMED_OUT, "still running when the run ended"
        _settle(rec, run)
        tracker.finish()
        raise
    except (aiohttp.ClientError, OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        rec.outcome, rec.reason = FAILED, f"{type(exc).__name__}: {exc}"
    _settle(rec, run)
    tracker.finish()


def _settle(rec: SessionRecord, run: StreamRun) -> None:
    """Admitted means the upgrade succeeded; a session that never got there is a connect error."""
    rec.admitted = run.connected_at > 0
    if not rec.admitted and rec.outcome in (FAILED, TIMED_OUT):
        rec.outcome = CONNECT_ERROR
