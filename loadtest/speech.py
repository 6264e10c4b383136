"""Speech for tests and benchmarks, made with espeak-ng (cached on disk).

`make_utterances` speaks each sentence to its own WAV, resampled to the wanted
rate (16-bit mono), and `join` lays them end to end with silence between, so a
caller knows exactly where each sentence starts and ends.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from services.common.audio import read_wav, wav_bytes, write_wav  # noqa: F401  (re-exported)

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "please turn on the lights in the kitchen",
    "what is the weather going to be like tomorrow morning",
    "set a timer for ten minutes",
    "play some music by the beatles",
    "remind me to call my mother at six o'clock",
    "how far is it from london to paris",
    "add milk and eggs to my shopping list",
]


class SpeechError(RuntimeError):
    pass


@dataclass(frozen=True)
class Clip:
    text: str
    pcm: bytes  # s16le mono
    sample_rate: int

    @property
    def duration_s(self) -> float:
        return len(self.pcm) / 2 / self.sample_rate


@dataclass(frozen=True)
class Speech:
    """Sentences laid end to end; spans are (start_s, end_s) of each clip."""

    pcm: bytes
    sample_rate: int
    texts: list[str]
    spans: list[tuple[float, float]]

    @property
    def text(self) -> str:
        return " ".join(self.texts)

    @property
    def duration_s(self) -> float:
        return len(self.pcm) / 2 / self.sample_rate


def _need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if not path:
        raise SpeechError(f"{tool} not found: install the Debian package {package}")
    return path


def speak(text: str, cache_dir: Path, sample_rate: int = 16000, voice: str = "en-us") -> Clip:
    """One sentence as 16-bit mono PCM at sample_rate (trimmed of espeak's silence)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha1(f"{voice}|{sample_rate}|{text}".encode()).hexdigest()[:16]
    out = cache_dir / f"{key}.wav"
    if not out.exists():
        raw = cache_dir / f"{key}.raw.wav"
        subprocess.run(
            [_need("espeak-ng", "espeak-ng"), "-v", voice, "-s", "150", "-w", str(raw), text],
            check=True,
            capture_output=True,
        )
        tmp = cache_dir / f"{key}.tmp.wav"
        subprocess.run(
            [_need("sox", "sox"), str(raw), "-r", str(sample_rate), "-c", "1", "-b", "16",
             str(tmp), "silence", "1", "0.02", "0.5%", "reverse", "silence", "1", "0.02",
             "0.5%", "reverse"],
            check=True,
            capture_output=True,
        )  # fmt: skip
        tmp.replace(out)
        raw.unlink(missing_ok=True)
    pcm, rate = read_wav(out)
    return Clip(text=text, pcm=pcm, sample_rate=rate)


def join(clips: list[Clip], gap_s: float = 1.0, lead_s: float = 0.5, tail_s: float = 1.0) -> Speech:
    rate = clips[0].sample_rate
    parts: list[bytes] = [bytes(int(lead_s * rate) * 2)]
    spans = []
    t = lead_s
    for i, clip in enumerate(clips):
        spans.append((t, t + clip.duration_s))
        parts.append(clip.pcm)
        t += clip.duration_s
        pad = tail_s if i == len(clips) - 1 else gap_s
        parts.append(bytes(int(pad * rate) * 2))
        t += int(pad * rate) / rate
    return Speech(b"".join(parts), rate, [c.text for c in clips], spans)


def make_speech(
    sentences: list[str],
    cache_dir: Path,
    sample_rate: int = 16000,
    gap_s: float = 1.0,
    voice: str = "en-us",
) -> Speech:
    """`voice`: an espeak-ng voice or language (`espeak-ng --voices`): "de", "es", "fr", ..."""
    return join([speak(s, cache_dir, sample_rate, voice) for s in sentences], gap_s=gap_s)
