"""Small PCM/WAV helpers shared by the CLI, the worker and the benchmarks."""

from __future__ import annotations

import io
import wave
from pathlib import Path

SUPPORTED_RATES = (8000, 16000, 32000, 48000)


def read_wav(path: Path) -> tuple[bytes, int]:
    """PCM and rate of a 16-bit mono WAV; `ValueError` naming what is wrong otherwise."""
    try:
        w = wave.open(str(path), "rb")
    except (wave.Error, EOFError) as exc:
        raise ValueError(f"{path}: not a PCM WAV file ({exc})") from exc
    with w:
        if w.getnchannels() != 1:
            raise ValueError(f"{path}: {w.getnchannels()} channels; need mono")
        if w.getsampwidth() != 2:
            raise ValueError(f"{path}: {8 * w.getsampwidth()}-bit samples; need 16-bit")
        return w.readframes(w.getnframes()), w.getframerate()


def wav_bytes(pcm: bytes, sample_rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm)
    return buf.getvalue()


def write_wav(path: Path, pcm: bytes, sample_rate: int) -> None:
    Path(path).write_bytes(wav_bytes(pcm, sample_rate))
