"""Speech engines. `transcribe` is blocking: the worker calls it on its executor.

Each engine raises `EngineError` subclasses that decide the ack: a
`RetryableEngineError` naks with delay; a `PoisonSegment` is termed at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from schemas.pipeline import Result, Segment, Word
from services.common.audio import wav_bytes
from services.common.board import DecodeBoard
from services.worker.decoding import (
    SKIPPED_WITHDRAWN,
    Decoded,
    DecodePolicy,
    DecodeRequest,
    decode,
    whisper_language,
)
from services.worker.withdrawn import WITHDRAWN

log = logging.getLogger(__name__)

WHISPER_RATE = 16000


class EngineError(Exception):
    retryable = True
    code = "engine_error"


class RetryableEngineError(EngineError):
    pass


class PoisonSegment(EngineError):
    """This segment will fail the same way every time; do not retry it."""

    retryable = False
    code = "poison_segment"


@dataclass(frozen=True)
class Transcription:
    text: str
    words: list[Word] = field(default_factory=list)
    language: str = ""
    inference_ms: float = 0.0
    # the edge withdrew the segment while it was decoded (services/worker/withdrawn.py):
    # nobody wants an answer, and its time says nothing of the decode rate
    withdrawn: bool = False


def result_of(segment: Segment, transcription: Transcription, engine: str) -> Result:
    """The answer to one segment (final or interim look), naming the revision it answers."""
    return Result(
        session_id=segment.session_id,
        segment=segment.segment,
        start_ms=segment.start_ms,
        end_ms=segment.end_ms,
        text=transcription.text,
        words=transcription.words,
        final=segment.final,
        revision=segment.revision,
        engine=engine,
        inference_ms=round(transcription.inference_ms, 1),
        language=transcription.language,
    )


class Engine(Protocol):
    name: str

    def transcribe(self, segment: Segment) -> Transcription: ...


def pcm_to_float(pcm: bytes, sample_rate: int) -> np.ndarray:
    """s16le mono at sample_rate -> float32 at 16 kHz, as Whisper wants it."""
    if len(pcm) % 2:
        raise PoisonSegment(f"PCM of odd length {len(pcm)}")
    if sample_rate == WHISPER_RATE:
        return np.frombuffer(pcm, dtype=np.int16).astype(np.float32) / 32768.0
    from faster_whisper.audio import decode_audio  # resamples with libav

    return decode_audio(io.BytesIO(wav_bytes(pcm, sample_rate)), sampling_rate=WHISPER_RATE)


def _whisper_model(
    path: Path, device: str, compute_type: str, cpu_threads: int, encoder_threads: int
):  # type: ignore[no-untyped-def]
    """faster-whisper's model; with `encoder_threads` above `cpu_threads` on a CPU, one
    whose encoder runs on a second replica of the model with that many threads.

    Why: on this CPU (tiny.en, int8) a second thread makes the encoder 1.4x faster
    (223 against 325 ms per 30 s window) but the decoder 2x slower (190 against 90 ms
    per utterance's tokens: its steps are too small to split). So the worker decodes
    on one thread and encodes on `encoder_threads`. Two such workers on 2 cores then
    take 399 ms per utterance when alone (498 with one thread for all) and 575 ms when
    both decode at once (545), with OpenMP's passive wait (OMP_WAIT_POLICY=PASSIVE,
    which `escapement up` sets): spinning threads made that 523-623. With a decode board
    (services/common/board.py) the encoder takes one thread while another worker's final
    holds a core, so that two finals at once do not fight over both cores; alone it
    still takes two. At 10 sessions that took finals' p95 from 1,834 / 2,086 / 2,549 ms
    to 1,693 / 1,804 / 1,957 (interleaved runs). One thread or two, the encoder's output
    is the same to the bit (14 of 14 windows of real speech compared), so the same audio
    still gives the same finals."""
    from faster_whisper import WhisperModel

    wide = None
    if device == "cpu" and encoder_threads > max(1, cpu_threads):
        import ctranslate2

        wide = ctranslate2.models.Whisper(
            str(path), device="cpu", compute_type=compute_type, intra_threads=encoder_threads
        )

    class Model(WhisperModel):
        board: DecodeBoard | None = None

        def encode(self, features):  # type: ignore[no-untyped-def]
            if wide is None or (self.board is not None and self.board.others_decoding()):
                return super().encode(features)
            from faster_whisper.transcribe import get_ctranslate2_storage

            if features.ndim == 2:
                features = np.expand_dims(features, 0)
            return wide.encode(get_ctranslate2_storage(features), to_cpu=False)

    return Model(
        str(path),
        device=device,
        compute_type=compute_type,
        cpu_threads=cpu_threads,
        local_files_only=True,
    )


class WhisperEngine:
    """faster-whisper on a local CTranslate2 model."""

    def __init__(
        self,
        model_path: Path,
        device: str = "cpu",
        compute_type: str = "int8",
        cpu_threads: int = 0,
        beam_size: int = 0,
        name: str | None = None,
        policy: DecodePolicy | None = None,
        encoder_threads: int = 0,
        board: DecodeBoard | None = None,
    ) -> None:
        self.name = name or f"faster-whisper:{model_path.name}"
        started = time.perf_counter()
        self.model = _whisper_model(model_path, device, compute_type, cpu_threads, encoder_threads)
        self.board = board if device == "cpu" else None
        self.model.board = self.board
        self.multilingual = self.model.model.is_multilingual
        self.languages: tuple[str, ...] = tuple(self.model.supported_languages)
        # beam_size 0: the measured choice for this kind of model (DecodePolicy.for_model)
        self.policy = policy or DecodePolicy.for_model(
            self.multilingual, **({"beam_size": beam_size} if beam_size else {})
        )
        # an interim look is replaced by its final: greedy, once, no word alignment, and
        # the context text read as previous text in one pass rather than forced token
        # by token (45 vs 165 ms per look with 25 s of context, tiny.en on 2 threads)
        self.look_policy = dataclasses.replace(
            self.policy,
            beam_size=1,
            retry_beam_size=0,
            word_timestamps=False,
            context_in_prompt=True,
        )
        log.info("loaded %s in %.2fs", model_path, time.perf_counter() - started)

    def transcribe(self, segment: Segment) -> Transcription:
        """Decode one segment (services/worker/decoding.py) with its context; words on the
        session timeline, only those inside the segment."""
        started = time.perf_counter()
        request, origin_ms = self._request(segment)
        board = self.board if segment.final else None  # the board tells finals only
        with board.decoding() if board is not None else contextlib.nullcontext():
            if segment.final:  # an early final the edge withdrew meanwhile stops early
                decoded = decode(
                    self.model, request, self.policy, wanted=lambda: not WITHDRAWN.of(segment)
                )
            else:
                decoded = decode(self.model, request, self.look_policy)
        return self._transcription(segment, request, decoded, origin_ms, started)

    def transcribe_batch(self, segments: list[Segment]) -> list[Transcription | EngineError]:
        """Decode several segments with shared model calls (services/worker/batching.py);
        each comes out as `transcribe` gives it, or as the `EngineError` it raises (a
        language the model does not speak). `inference_ms` of each is its share of the
        batch's time, so that summed they are the time the model was busy."""
        from services.worker.batching import decode_batch

        started = time.perf_counter()
        out: list[Transcription | EngineError | None] = [None] * len(segments)
        groups: dict[bool, list[tuple[int, DecodeRequest, int]]] = {}
        for k, segment in enumerate(segments):
            try:
                request, origin_ms = self._request(segment)
            except EngineError as exc:
                out[k] = exc
                continue
            groups.setdefault(segment.final, []).append((k, request, origin_ms))
        for final, group in groups.items():
            policy = self.policy if final else self.look_policy
            decoded = decode_batch(self.model, [r for _, r, _ in group], policy)
            for (k, request, origin_ms), d in zip(group, decoded, strict=True):
                out[k] = self._transcription(segments[k], request, d, origin_ms, started)
        share = (time.perf_counter() - started) * 1000 / max(1, len(segments))
        return [
            dataclasses.replace(t, inference_ms=share) if isinstance(t, Transcription) else t
            for t in out
            if t is not None
        ]

    def _request(self, segment: Segment) -> tuple[DecodeRequest, int]:
        """What to decode for `segment`, and the session time of the request's first
        sample. Raises `PoisonSegment` for a language the model does not speak."""
        language = whisper_language(segment.language) if segment.language else ""
        if language and language not in self.languages:
            raise PoisonSegment(
                f"model {self.name} does not speak {segment.language!r}"
                + (" (English only)" if not self.multilingual else "")
            )
        rate = segment.sample_rate
        context = pcm_to_float(segment.context_pcm, rate) if segment.context_pcm else None
        audio = pcm_to_float(segment.pcm, rate)
        if context is not None:
            audio = np.concatenate([context, audio])
        context_s = 0.0 if context is None else len(context) / WHISPER_RATE
        origin_ms = segment.start_ms - round(context_s * 1000)  # session time of audio[0]
        request = DecodeRequest(
            audio=audio,
            segment_start_s=context_s,
            prompt=segment.prompt,
            context_text=segment.context_text if context is not None else "",
            voiced=tuple(
                ((a - origin_ms) / 1000, (b - origin_ms) / 1000) for a, b in segment.voiced
            ),
            final=segment.final,
            language=language,  # "": detected, with the session's language so far as prior
            language_prior=whisper_language(segment.session_language)
            if segment.session_language
            else "",
        )
        return request, origin_ms

    def _transcription(
        self,
        segment: Segment,
        request: DecodeRequest,
        decoded: Decoded,
        origin_ms: int,
        started: float,
    ) -> Transcription:
        """`decoded` as the segment's answer: words on the session timeline, clipped to it."""
        lo, hi = segment.start_ms, segment.end_ms
        words: list[Word] = []
        for w in decoded.words:
            start = min(max(origin_ms + round(w.start_s * 1000), lo), hi)
            stop = min(max(origin_ms + round(w.end_s * 1000), start), hi)
            words.append(Word(w.word.strip(), int(start), int(stop), round(w.probability, 3)))
        return Transcription(
            text=decoded.text,
            words=words,
            language=decoded.language or request.language or request.language_prior or "en",
            inference_ms=(time.perf_counter() - started) * 1000,
            withdrawn=decoded.skipped == SKIPPED_WITHDRAWN,
        )
