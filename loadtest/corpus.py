"""What the simulated devices say: the built-in espeak corpus or a folder of WAVs.

The built-in corpus lays sentences from `loadtest.speech` end to end, so the
load generator knows where each utterance starts and ends (its reference
spans) and can time the pipeline from the true end of speech. A folder of
`NAME.wav` + `NAME.txt` files has no spans; the report then takes the end of
speech from the edge's `SpeechEnded` event (see `loadtest.device`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import platformdirs

from loadtest.speech import SENTENCES, make_speech, read_wav
from services.common.audio import SUPPORTED_RATES


class CorpusError(ValueError):
    """The audio cannot be used (no files, wrong format, missing tools)."""


@dataclass(frozen=True)
class Item:
    """One session's worth of audio and what is said in it."""

    name: str
    pcm: bytes  # s16le mono
    sample_rate: int
    text: str
    # (start_ms, end_ms) of each utterance when known (built-in corpus only)
    spans: tuple[tuple[float, float], ...] | None = None

    @property
    def duration_s(self) -> float:
        return len(self.pcm) / 2 / self.sample_rate


@dataclass(frozen=True)
class CorpusSpec:
    """How to build a corpus; small and picklable, so each generator process builds its own."""

    audio_dir: str | None = None
    sentences: int = 4  # per item, built-in corpus
    cache_dir: str | None = None
    sample_rate: int = 16000
    gap_s: float = 1.0

    def describe(self) -> str:
        if self.audio_dir:
            return f"WAV files in {self.audio_dir}"
        return f"built-in espeak-ng corpus, {self.sentences} sentence(s) per session"


def default_cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir("escapement")) / "speech"


class Corpus:
    def __init__(self, items: list[Item], source: str) -> None:
        if not items:
            raise CorpusError(f"no audio in {source}")
        self.items = items
        self.source = source

    def item_for(self, device: int, session: int) -> Item:
        """Devices start at different items and move on with each session."""
        return self.items[(device + session) % len(self.items)]

    @property
    def longest_s(self) -> float:
        return max(item.duration_s for item in self.items)


def build(spec: CorpusSpec) -> Corpus:
    if spec.audio_dir:
        return load_dir(Path(spec.audio_dir))
    return builtin(
        spec.sentences,
        Path(spec.cache_dir) if spec.cache_dir else None,
        spec.sample_rate,
        spec.gap_s,
    )


def builtin(
    sentences: int = 4, cache_dir: Path | None = None, sample_rate: int = 16000, gap_s: float = 1.0
) -> Corpus:
    """One item per starting sentence: item i says sentences i, i+1, ... (wrapping)."""
    from loadtest.speech import SpeechError

    if sentences < 1:
        raise CorpusError("need at least one sentence per session")
    cache = cache_dir or default_cache_dir()
    items = []
    try:
        for i in range(len(SENTENCES)):
            chosen = [SENTENCES[(i + k) % len(SENTENCES)] for k in range(sentences)]
            speech = make_speech(chosen, cache, sample_rate=sample_rate, gap_s=gap_s)
            spans = tuple((s * 1000, e * 1000) for s, e in speech.spans)
            items.append(Item(f"builtin-{i}", speech.pcm, speech.sample_rate, speech.text, spans))
    except SpeechError as exc:
        raise CorpusError(str(exc)) from exc
    return Corpus(items, f"built-in corpus ({cache})")


def load_dir(folder: Path) -> Corpus:
    """Every `*.wav` (16-bit mono, a supported rate) with a `.txt` of the same name."""
    if not folder.is_dir():
        raise CorpusError(f"{folder}: not a folder")
    items = []
    for wav in sorted(folder.glob("*.wav")):
        ref = wav.with_suffix(".txt")
        if not ref.is_file():
            raise CorpusError(f"{wav}: no reference transcript {ref.name}")
        try:
            pcm, rate = read_wav(wav)
        except ValueError as exc:
            raise CorpusError(str(exc)) from exc
        if rate not in SUPPORTED_RATES:
            raise CorpusError(
                f"{wav}: {rate} Hz; the edge takes {', '.join(map(str, SUPPORTED_RATES))}"
            )
        items.append(Item(wav.stem, pcm, rate, " ".join(ref.read_text().split())))
    return Corpus(items, str(folder))


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(substitutions + deletions + insertions, reference words), after the one shared
    normalisation (Whisper's English normaliser, `loadtest.realspeech.score`)."""
    from loadtest.realspeech import score

    counts = score(reference, hypothesis)
    return counts.errors, counts.ref_words
