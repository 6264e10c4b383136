"""Speech engines. `transcribe` is blocking: the worker calls it on its executor.

Each engine raises `EngineError` subclasses that decide the ack: a
`RetryableEngineError` naks with delay; a `PoisonSegment` is termed at once.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from schemas.pipeline import Result, Segment, Word
from services.audio import wav_bytes

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

    def transcribe(
        self, pcm: bytes, sample_rate: int, language: str, prompt: str, offset_ms: int
    ) -> Transcription: ...


def pcm_to_float(pcm: bytes, sample_rate: int) -> np.ndarray:
    """s16le mono at sample_rate -> float32 at 16 kHz, as Whisper wants it."""
    if len(pcm) % 2:
        raise PoisonSegment(f"PCM of odd length {len(pcm)}")
    if sample_rate == WHISPER_RATE:
        return np.frombuffer(pcm, dtype=np.int16).astype(np.float32) / 32768.0
    from faster_whisper.audio import decode_audio  # resamples with libav

    return decode_audio(io.BytesIO(wav_bytes(pcm, sample_rate)), sampling_rate=WHISPER_RATE)


class WhisperEngine:
    """faster-whisper on a local CTranslate2 model."""

    def __init__(
        self,
        model_path: Path,
        device: str = "cpu",
        compute_type: str = "int8",
        cpu_threads: int = 0,
        beam_size: int = 1,
        name: str | None = None,
    ) -> None:
        from faster_whisper import WhisperModel

        self.name = name or f"faster-whisper:{model_path.name}"
        self.beam_size = beam_size
        started = time.perf_counter()
        self.model = WhisperModel(
            str(model_path),
            device=device,
            compute_type=compute_type,
            cpu_threads=cpu_threads,
            local_files_only=True,
        )
        self.multilingual = self.model.model.is_multilingual
        log.info("loaded %s in %.2fs", model_path, time.perf_counter() - started)

    def transcribe(
        self, pcm: bytes, sample_rate: int, language: str, prompt: str, offset_ms: int
    ) -> Transcription:
        started = time.perf_counter()
        audio = pcm_to_float(pcm, sample_rate)
        if not self.multilingual and language not in ("en", ""):
            raise PoisonSegment(f"model {self.name} speaks English only, not {language!r}")
        segments, info = self.model.transcribe(
            audio,
            language=language or None,
            beam_size=self.beam_size,
            word_timestamps=True,
            condition_on_previous_text=False,
            initial_prompt=prompt or None,
            vad_filter=False,
        )
        end_ms = offset_ms + int(len(audio) * 1000 / WHISPER_RATE)
        texts: list[str] = []
        words: list[Word] = []
        for seg in segments:  # lazy generator: consumed here, on the executor
            texts.append(seg.text.strip())
            for w in seg.words or []:
                start = min(max(offset_ms + round(w.start * 1000), offset_ms), end_ms)
                stop = min(max(offset_ms + round(w.end * 1000), start), end_ms)
                words.append(
                    Word(w.word.strip(), int(start), int(stop), round(float(w.probability), 3))
                )
        return Transcription(
            text=" ".join(t for t in texts if t),
            words=words,
            language=str(info.language),
            inference_ms=(time.perf_counter() - started) * 1000,
        )
