"""An uploaded file as one job on the live pipeline: decode, cut, queue, reassemble.

The file is decoded by faster-whisper's decoder (PyAV: WAV, MP3, FLAC, Ogg,
WebM, M4A, ...) to 16 kHz mono, cut into utterances by the edge's own VAD
(`services.edge.vad`, the same cuts a live session gets), and each cut goes
through ASR_SEGMENTS to the same workers as live speech, on its own subject
and consumer (`asr.files.<edge>.<job>`, `file-workers`), which a worker pulls
only when no live final waits. Decoding and cutting grow with the file, so
both run in an executor, never on the event loop.

A job keeps at most `in_flight` segments queued or decoding (default 1), so a
long upload never fills the queue, and publishes each cut with the left
context a live session's segment gets: the audio of the utterances just before
it, from an earlier utterance's start (up to `context_ms`, within a
`window_ms` window with the cut), with their transcripts, which the decoder is
forced through. With `in_flight` 1 every cut has its context (the previous
results are in when it is published), which is what makes a file decode as
well as a live session; with more, a cut gets the context that is known when
it is queued. Results come back on core NATS like a session's (the job
registers with the edge's `ResultRouter`), are taken in order, and their word
times are already on the file's timeline: the cuts' times are file times.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import av
import numpy as np
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import APIError

from jetstream import subjects
from observability.tracing import inject_headers
from schemas.pipeline import ErrorResult, Result, ResultMessage, Segment, encode_segment
from services.edge.vad import Segmenter, Utterance, VadConfig

log = logging.getLogger(__name__)

RATE = 16000  # what files are decoded to: Whisper's rate
_BYTES_PER_MS = RATE * 2 // 1000


class AudioError(ValueError):
    """The upload is not audio the decoder can read, or holds no sound."""


class TooLong(ValueError):
    """The decoded audio is longer than the edge accepts."""


class JobFailed(RuntimeError):
    """The pipeline could not transcribe the file: an HTTP status, a code, a message."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after


def decode_file(data: bytes, max_duration_s: float) -> bytes:
    """The upload as PCM s16le mono at 16 kHz (blocking: run it in an executor)."""
    from faster_whisper import decode_audio  # imports av and numpy only when used

    try:
        audio = decode_audio(io.BytesIO(data), sampling_rate=RATE)
    except (av.error.FFmpegError, ValueError, IndexError, StopIteration) as exc:
        raise AudioError(f"the file is not audio that can be decoded ({exc})") from None
    if audio.size == 0:
        raise AudioError("the file holds no audio samples")
    duration_s = audio.size / RATE
    if duration_s > max_duration_s:
        raise TooLong(f"the audio lasts {duration_s:.0f} s; at most {max_duration_s:.0f} s")
    return (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2").tobytes()


def cut_file(pcm: bytes, vad: VadConfig) -> list[Utterance]:
    """The utterances the edge's VAD finds in the whole file (blocking: run it in an executor)."""
    segmenter = Segmenter(RATE, dataclasses.replace(vad, announce_pauses=False))
    events = segmenter.feed(pcm)
    events += segmenter.flush()
    return [e for e in events if isinstance(e, Utterance)]


@dataclass(frozen=True, slots=True)
class JobConfig:
    in_flight: int = 1  # segments of one job queued or decoding at once
    context_ms: int = 25000  # earlier utterances' audio sent as left context (0: none)
    window_ms: int = 28000  # context + cut at most (Whisper sees 30 s)
    # a segment's result owed longer than this fails the job (file segments wait behind
    # live speech: under sustained live load they wait long, by design)
    result_timeout_s: float = 300.0
    publish_timeout_s: float = 5.0


class FileJob:
    """One file's cuts through the queue, their results in order. A `Routed` for the router."""

    def __init__(
        self,
        js: JetStreamContext,
        config: JobConfig,
        *,
        edge_id: str,
        tenant: str,
        pcm: bytes,
        cuts: list[Utterance],
        language: str,
        prompt: str = "",
        model: str = "",  # "": the default model's workers; else that model's lane
    ) -> None:
        self.js = js
        self.model = model
        self.config = config
        self._id = secrets.token_urlsafe(12)
        self.edge_id = edge_id
        self.tenant = tenant
        self.pcm = pcm
        self.cuts = cuts
        self.language = language
        self.prompt = prompt
        self._results: dict[int, ResultMessage] = {}
        self._outstanding: dict[int, float] = {}  # published, result not in: since when
        self._texts: dict[int, str] = {}  # transcripts in so far, for later cuts' context
        self._changed = asyncio.Event()
        self.inference_ms = 0.0

    # --- Routed ------------------------------------------------------------------

    @property
    def id(self) -> str:
        return self._id

    @property
    def owing(self) -> bool:
        return bool(self._outstanding)

    def owes(self, number: int) -> bool:
        return number in self._outstanding

    def stale(self, older_than_s: float) -> bool:
        now = time.monotonic()
        return any(now - since > older_than_s for since in self._outstanding.values())

    def on_result(self, result: ResultMessage) -> None:
        if result.segment not in self._outstanding or result.revision != 0:
            return  # a duplicate (redelivery, recovery), or not one of ours
        if isinstance(result, Result) and not result.final:
            return
        del self._outstanding[result.segment]
        self._results[result.segment] = result
        if isinstance(result, Result):
            self._texts[result.segment] = result.text.strip()
        self._changed.set()

    def supersede(self) -> None:
        """Job ids are fresh for every upload: nothing ever resumes one."""

    # --- the job -----------------------------------------------------------------

    async def results(self) -> AsyncIterator[tuple[Utterance, Result]]:
        """Each cut with its result, in file order; raises `JobFailed`."""
        queued = 0
        for number, cut in enumerate(self.cuts):
            while queued < len(self.cuts) and queued - number < self.config.in_flight:
                await self._publish(queued)
                queued += 1
            result = await self._wait(number)
            if isinstance(result, ErrorResult):
                status = 400 if result.code in ("poison_segment", "bad_segment") else 500
                raise JobFailed(
                    status,
                    result.code,
                    f"segment at {cut.start_ms / 1000:.1f} s: {result.message}",
                )
            self.inference_ms += result.inference_ms
            for old in [n for n in self._texts if n < number - 64]:  # beyond any context
                del self._texts[old]
            yield cut, result

    async def _wait(self, number: int) -> ResultMessage:
        while number not in self._results:
            since = self._outstanding.get(number, time.monotonic())
            left = since + self.config.result_timeout_s - time.monotonic()
            if left <= 0:
                raise JobFailed(
                    504, "timeout", f"no result for a segment in {self.config.result_timeout_s:g} s"
                )
            self._changed.clear()
            if number in self._results:
                break
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=left)
            except TimeoutError:
                continue
        return self._results.pop(number)

    def _context(self, number: int) -> tuple[bytes, str]:
        """The audio before cut `number`, from the start of the earliest of the cuts just
        before it whose transcripts are known and said something, with those transcripts."""
        cfg = self.config
        cut = self.cuts[number]
        if cfg.context_ms <= 0:
            return b"", ""
        earliest = max(cut.start_ms - cfg.context_ms, cut.end_ms - cfg.window_ms)
        first = number
        while (
            first > 0 and self._texts.get(first - 1) and self.cuts[first - 1].start_ms >= earliest
        ):
            first -= 1
        if first == number:
            return b"", ""
        lo, hi = self.cuts[first].start_ms * _BYTES_PER_MS, cut.start_ms * _BYTES_PER_MS
        text = " ".join(self._texts[n] for n in range(first, number))
        return self.pcm[lo:hi], text

    async def _publish(self, number: int) -> None:
        cut = self.cuts[number]
        context_pcm, context_text = self._context(number)
        segment = Segment(
            session_id=self._id,
            edge_id=self.edge_id,
            segment=number,
            start_ms=cut.start_ms,
            end_ms=cut.end_ms,
            sample_rate=RATE,
            pcm=cut.pcm,
            language=self.language,
            prompt=self.prompt,
            tenant=self.tenant,
            context_pcm=context_pcm,
            context_text=context_text,
            voiced=list(cut.voiced),
            model=self.model,
        )
        headers = inject_headers(
            {
                subjects.Header.MSG_ID: subjects.segment_msg_id(self._id, number),
                subjects.Header.TENANT: self.tenant,
                subjects.Header.SESSION: self._id,
            }
        )
        self._outstanding[number] = time.monotonic()
        try:
            await self.js.publish(
                subjects.file_segments_subject(
                    self.edge_id, self._id, subjects.lane_of_model(self.model)
                ),
                encode_segment(segment),
                headers=headers,
                timeout=self.config.publish_timeout_s,
            )
        except APIError as exc:  # the queue's own limits (discard: new)
            del self._outstanding[number]
            raise JobFailed(503, "queue_full", f"the queue refused a segment: {exc}", 5) from exc
        except (NatsError, TimeoutError) as exc:
            del self._outstanding[number]
            raise JobFailed(
                503, "nats_unavailable", f"the queue is unreachable: {exc!r}", 2
            ) from exc
