"""The VAD segmenter on real speech (espeak-ng): what a listener would notice.

Every sentence comes out whole, once, with its onset announced promptly;
silence and noise come out as nothing; long speech is cut without losing a
sample; how the bytes are chunked changes nothing. A few frame-exact cases use
a scripted VAD in place of webrtcvad, where real speech cannot place a frame
exactly where the test needs it.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loadtest.speech import SENTENCES, Speech, make_speech, speak
from services.edge import vad
from services.edge.vad import (
    SUPPORTED_RATES,
    Discarded,
    Event,
    Segmenter,
    SpeechStart,
    Utterance,
    VadConfig,
)

CFG = VadConfig()
ONSET_SLACK_MS = 200  # SpeechStart within this long after the true onset
# webrtcvad keeps calling a frame voiced for a while after the voice stops
HANGOVER_MS = 300


@pytest.fixture(scope="session")
def speech_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("speech")


def nbytes(ms: float, rate: int) -> int:
    return int(ms * rate / 1000) * 2


def region(pcm: bytes, rate: int, start_ms: int, end_ms: int) -> bytes:
    return pcm[nbytes(start_ms, rate) : nbytes(end_ms, rate)]


def feed_timed(seg: Segmenter, pcm: bytes, chunk_bytes: int) -> list[tuple[int, Event]]:
    """Feed in chunks; each event with the stream position when it came out."""
    out = []
    for i in range(0, len(pcm), chunk_bytes):
        out += [(seg.position_ms, e) for e in seg.feed(pcm[i : i + chunk_bytes])]
    return out


def run(seg: Segmenter, pcm: bytes) -> list[Event]:
    return seg.feed(pcm) + seg.flush()


def noise(seconds: float, dbfs: float, rate: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal(int(seconds * rate)) * 32768 * 10 ** (dbfs / 20)


def to_pcm(x: np.ndarray) -> bytes:
    return np.clip(np.round(x), -32768, 32767).astype(np.int16).tobytes()


def check_well_formed(events: list[Event], pcm: bytes, rate: int, max_ms: int) -> None:
    """Events in time order, never overlapping; each Utterance is the input at its times."""
    t = 0
    for e in events:
        if isinstance(e, SpeechStart):
            continue
        assert e.start_ms <= e.end_ms, e
        assert e.start_ms >= t, f"{e} overlaps what came before (up to {t} ms)"
        t = e.end_ms
        if isinstance(e, Utterance):
            assert e.end_ms - e.start_ms <= max_ms
            assert e.start_ms < e.last_voiced_ms <= e.end_ms
            assert e.pcm == region(pcm, rate, e.start_ms, e.end_ms)


# --- real speech, sentence by sentence -----------------------------------------


@pytest.mark.parametrize("rate", SUPPORTED_RATES)
def test_each_sentence_is_one_whole_utterance(speech_cache: Path, rate: int) -> None:
    speech = make_speech(SENTENCES, speech_cache, rate)  # 1 s between sentences
    seg = Segmenter(rate)
    timed = feed_timed(seg, speech.pcm, nbytes(10, rate))
    assert seg.flush() == []
    assert not seg.in_speech
    assert [type(e) for _, e in timed] == [SpeechStart, Utterance] * len(speech.spans)
    check_well_formed([e for _, e in timed], speech.pcm, rate, CFG.max_utterance_ms)

    onsets = [on * 1000 for on, _ in speech.spans]
    for i, (on_s, off_s) in enumerate(speech.spans):
        onset, offset = on_s * 1000, off_s * 1000
        (said_at, start), (final_at, utt) = timed[2 * i], timed[2 * i + 1]
        assert isinstance(start, SpeechStart) and isinstance(utt, Utterance)
        # the onset is located, and announced promptly
        assert onset - CFG.frame_ms <= start.t_ms <= onset + ONSET_SLACK_MS
        assert said_at - onset <= ONSET_SLACK_MS
        # pre-roll: the first word is not clipped, and not much more is taken
        assert onset - CFG.preroll_ms - CFG.frame_ms <= utt.start_ms <= onset
        # the last word is not clipped; only the trailing pad follows the voice
        assert utt.end_ms >= offset
        assert utt.end_ms - utt.last_voiced_ms <= CFG.trailing_pad_ms
        assert not utt.cut
        # nothing of the next sentence is swallowed
        if i + 1 < len(onsets):
            assert utt.end_ms < onsets[i + 1]
        # the final is not kept waiting
        assert final_at - offset <= CFG.endpoint_ms + HANGOVER_MS


def test_unsupported_rate_is_refused() -> None:
    with pytest.raises(ValueError, match="44100"):
        Segmenter(44100)


@pytest.mark.parametrize("word", ["yes", "no", "hi"])
def test_a_one_word_answer_is_kept(speech_cache: Path, word: str) -> None:
    rate = 16000
    clip = speak(word, speech_cache, rate)
    silence = bytes(nbytes(1000, rate))
    events = run(Segmenter(rate), silence + clip.pcm + silence)
    assert [type(e) for e in events] == [SpeechStart, Utterance]
    utt = events[1]
    assert isinstance(utt, Utterance)
    assert utt.start_ms <= 1000 and utt.end_ms >= 1000 + clip.duration_s * 1000


# --- nothing to say ----------------------------------------------------------


@pytest.mark.parametrize("rate", SUPPORTED_RATES)
def test_silence_yields_nothing(rate: int) -> None:
    seg = Segmenter(rate)
    silence = bytes(nbytes(30_000, rate))
    assert [e for _, e in feed_timed(seg, silence, nbytes(1000, rate))] == []
    assert seg.flush() == []
    assert seg.position_ms == 30_000


@pytest.mark.parametrize("dbfs", [-70, -55, -40])
def test_low_noise_yields_no_utterance(dbfs: float) -> None:
    rate = 16000
    events = run(Segmenter(rate), to_pcm(noise(20, dbfs, rate)))
    assert not [e for e in events if isinstance(e, Utterance)]
    # webrtcvad calls the first few frames of a stream voiced while it learns
    # the noise floor; that blip must be retracted at once, and nothing after
    for e in events:
        if isinstance(e, Discarded):
            assert e.end_ms <= 500
    assert len(events) <= 2


def test_a_click_is_discarded() -> None:
    rate = 16000
    t = np.arange(nbytes(10, rate) // 2)
    click = 20000 * np.exp(-t / 30) * np.sin(2 * np.pi * 1000 * t / rate)  # 10 ms
    pcm = bytes(nbytes(1000, rate)) + to_pcm(click) + bytes(nbytes(1000, rate))
    events = run(Segmenter(rate), pcm)
    assert [type(e) for e in events] == [SpeechStart, Discarded]
    gone = events[1]
    assert gone.start_ms <= 1000 and gone.end_ms >= 1010


def test_speech_in_background_noise(speech_cache: Path) -> None:
    rate = 16000
    lead_s = 2.0  # noise alone first, as when a device opens in a noisy room
    speech = make_speech(SENTENCES[:4], speech_cache, rate)
    x = np.concatenate([np.zeros(int(lead_s * rate)), np.frombuffer(speech.pcm, np.int16)])
    pcm = to_pcm(x + noise(len(x) / rate, -50, rate, seed=1))
    events = run(Segmenter(rate), pcm)
    utts = [e for e in events if isinstance(e, Utterance)]
    assert len(utts) == len(speech.spans)
    for utt, (on_s, off_s) in zip(utts, speech.spans, strict=True):
        assert utt.start_ms <= (lead_s + on_s) * 1000 <= (lead_s + off_s) * 1000 <= utt.end_ms
    check_well_formed(events, pcm, rate, CFG.max_utterance_ms)


# --- long speech -------------------------------------------------------------


@pytest.mark.parametrize("gap_s", [0.0, 0.1])
@pytest.mark.parametrize("max_ms", [5000, 15000])
def test_long_speech_is_cut_without_losing_audio(
    speech_cache: Path, gap_s: float, max_ms: int
) -> None:
    rate = 16000
    speech = make_speech(SENTENCES + SENTENCES[:3], speech_cache, rate, gap_s=gap_s)
    onset, offset = speech.spans[0][0] * 1000, speech.spans[-1][1] * 1000
    assert offset - onset >= 25_000
    seg = Segmenter(rate, VadConfig(max_utterance_ms=max_ms))
    events = [e for _, e in feed_timed(seg, speech.pcm, nbytes(10, rate))]

    assert isinstance(events[0], SpeechStart)
    pieces = events[1:]
    assert all(isinstance(p, Utterance) for p in pieces), pieces  # one SpeechStart only
    assert len(pieces) >= (offset - onset) // max_ms + 1
    assert [p.cut for p in pieces] == [True] * (len(pieces) - 1) + [False]
    for a, b in zip(pieces, pieces[1:], strict=False):
        assert a.end_ms == b.start_ms  # back to back
    check_well_formed(pieces, speech.pcm, rate, max_ms)
    first, last = pieces[0], pieces[-1]
    assert first.start_ms <= onset and last.end_ms >= offset
    assert b"".join(p.pcm for p in pieces) == region(speech.pcm, rate, first.start_ms, last.end_ms)


class GappedSpeech:
    """The sentences at 16 kHz with a given gap between them (short repr for hypothesis)."""

    def __init__(self, cache: Path) -> None:
        self._cache = cache
        self._speech: dict[float, Speech] = {}

    def __getitem__(self, gap_s: float) -> Speech:
        if gap_s not in self._speech:
            self._speech[gap_s] = make_speech(SENTENCES, self._cache, 16000, gap_s=gap_s)
        return self._speech[gap_s]

    def __repr__(self) -> str:
        return "GappedSpeech()"


@pytest.fixture(scope="session")
def gapped_speech(speech_cache: Path) -> GappedSpeech:
    return GappedSpeech(speech_cache)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(max_ms=st.integers(2000, 8000), gap_s=st.sampled_from([0.0, 0.1, 0.3, 0.45]))
def test_no_speech_is_lost_wherever_the_cut_falls(
    gapped_speech: GappedSpeech, max_ms: int, gap_s: float
) -> None:
    """Cuts land in words, in pauses, just before the end: every sentence survives."""
    speech = gapped_speech[gap_s]
    events = run(Segmenter(16000, VadConfig(max_utterance_ms=max_ms)), speech.pcm)
    check_well_formed(events, speech.pcm, 16000, max_ms)
    kept = [(e.start_ms, e.end_ms) for e in events if isinstance(e, Utterance)]
    for on_s, off_s in speech.spans:
        on, off = on_s * 1000, off_s * 1000
        # covered by back-to-back utterances from before the onset to past the end
        t = next((s for s, e in kept if s <= on < e), None)
        assert t is not None, f"onset {on} not in any utterance"
        while t < off:
            t = next((e for s, e in kept if s <= t < e), None)
            assert t is not None, f"speech {on}..{off} lost"
        for e in events:
            if isinstance(e, Discarded):
                assert e.end_ms <= on or e.start_ms >= off, f"{e} drops speech {on}..{off}"


# --- chunking and flushing ---------------------------------------------------


def _odd_sizes(n: int) -> list[int]:
    rnd = random.Random(7)
    sizes = []
    while sum(sizes) < n:
        sizes.append(rnd.choice([1, 3, 7, 639, 641, 959, 961, 4095]))
    return sizes


@pytest.mark.parametrize("chunking", ["1 byte", "odd", "10 ms", "1 s"])
def test_chunk_sizes_do_not_change_the_result(speech_cache: Path, chunking: str) -> None:
    rate = 16000
    speech = make_speech(SENTENCES[3:5], speech_cache, rate)
    # end in the middle of the second sentence, so flush has work to do
    pcm = speech.pcm[: nbytes(sum(speech.spans[1]) / 2 * 1000, rate) + 1]

    whole = Segmenter(rate)
    expected = whole.feed(pcm) + whole.flush()
    assert [type(e) for e in expected] == [SpeechStart, Utterance, SpeechStart, Utterance]

    sizes = {
        "1 byte": [1] * len(pcm),
        "odd": _odd_sizes(len(pcm)),
        "10 ms": [nbytes(10, rate)] * (len(pcm) // nbytes(10, rate) + 1),
        "1 s": [nbytes(1000, rate)] * (len(pcm) // nbytes(1000, rate) + 1),
    }[chunking]
    seg, events, i = Segmenter(rate), [], 0
    for size in sizes:
        events += seg.feed(pcm[i : i + size])
        i += size
    assert seg.position_ms == whole.position_ms
    assert events + seg.flush() == expected


def test_flush_mid_speech_emits_what_was_said(speech_cache: Path) -> None:
    rate = 16000
    speech = make_speech(SENTENCES[:2], speech_cache, rate)
    (on1, off1), (on2, off2) = [(a * 1000, b * 1000) for a, b in speech.spans]
    cut_at = nbytes(on1 + 1500, rate)

    seg = Segmenter(rate)
    before = seg.feed(speech.pcm[:cut_at])
    assert [type(e) for e in before] == [SpeechStart] and seg.in_speech
    flushed = seg.flush()
    assert len(flushed) == 1
    utt = flushed[0]
    assert isinstance(utt, Utterance) and not utt.cut
    assert utt.start_ms <= on1 and utt.end_ms == seg.position_ms
    assert seg.position_ms == cut_at // nbytes(CFG.frame_ms, rate) * CFG.frame_ms  # whole frames
    assert utt.pcm == region(speech.pcm, rate, utt.start_ms, utt.end_ms)
    assert not seg.in_speech and seg.flush() == []

    # the sentence goes on: it starts afresh, and no audio is handed out twice
    after = seg.feed(speech.pcm[cut_at:]) + seg.flush()
    assert [type(e) for e in after] == [SpeechStart, Utterance, SpeechStart, Utterance]
    rest, second = after[1], after[3]
    assert isinstance(rest, Utterance) and isinstance(second, Utterance)
    assert utt.end_ms <= rest.start_ms and rest.end_ms >= off1
    assert second.start_ms <= on2 and second.end_ms >= off2


def test_flush_right_after_onset_discards_the_blip(speech_cache: Path) -> None:
    rate = 16000
    speech = make_speech(SENTENCES[:1], speech_cache, rate)
    seg = Segmenter(rate)
    events = []
    for i in range(0, len(speech.pcm), nbytes(CFG.frame_ms, rate)):
        events += seg.feed(speech.pcm[i : i + nbytes(CFG.frame_ms, rate)])
        if events:
            break
    assert [type(e) for e in events] == [SpeechStart]
    (gone,) = seg.flush()  # 90 ms of voice is not enough to transcribe
    assert isinstance(gone, Discarded) and gone.end_ms == seg.position_ms


def test_flush_when_idle_is_empty() -> None:
    seg = Segmenter(16000)
    assert seg.flush() == []
    seg.feed(bytes(nbytes(1000, 16000) + 1))
    assert seg.flush() == [] and seg.position_ms == 990


# --- frame-exact cases with a scripted VAD ------------------------------------


class ScriptedVad:
    """Stands in for webrtcvad: a frame is voiced exactly when it is not silent."""

    def __init__(self, mode: int) -> None:
        self.mode = mode

    def is_speech(self, frame: bytes, sample_rate: int) -> bool:
        return any(frame)


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vad.webrtcvad, "Vad", ScriptedVad)


def script(pattern: str, rate: int = 16000) -> bytes:
    """'v' a voiced 30 ms frame, '.' a silent one."""
    voiced = np.full(nbytes(CFG.frame_ms, rate) // 2, 1000, np.int16).tobytes()
    silent = bytes(nbytes(CFG.frame_ms, rate))
    return b"".join(voiced if c == "v" else silent for c in pattern)


@pytest.mark.usefixtures("scripted")
def test_start_needs_three_voiced_of_four_frames() -> None:
    """Two voiced frames of three tell SpeechStart at once; the utterance starts on three
    of four, and a SpeechStart it never follows is taken back, as a blip is (Discarded)."""
    seg = Segmenter(16000)
    assert seg.feed(script("." * 20 + "v.v." * 10 + "." * 20)) == [
        SpeechStart(t_ms=20 * 30),
        Discarded(start_ms=20 * 30, end_ms=61 * 30),  # the first frame with one voiced of four
    ]
    assert seg.feed(script("v.vv")) == [SpeechStart(t_ms=(20 + 40 + 20) * 30)]
    assert seg.in_speech
    assert seg.flush() and not seg.in_speech


@pytest.mark.usefixtures("scripted")
def test_speech_start_comes_a_frame_sooner_and_the_utterance_is_the_same() -> None:
    """SpeechStart on the second voiced frame (not the third), once per utterance; the
    utterance, its audio and its timing are the same as with SpeechStart at the start."""
    pcm = script("." * 20 + "v.v" + "v" * 40 + "." * 30 + "vv" + "." * 10)
    told = feed_timed(Segmenter(16000), pcm, nbytes(30, 16000))
    late = feed_timed(Segmenter(16000, VadConfig(onset_voiced=0)), pcm, nbytes(30, 16000))
    blip = 20 + 3 + 40 + 30  # the frame where "vv" begins
    assert [(t, e) for t, e in told if isinstance(e, SpeechStart)] == [
        (23 * 30, SpeechStart(t_ms=20 * 30)),  # after "v.v", not after "v.vv"
        ((blip + 2) * 30, SpeechStart(t_ms=blip * 30)),  # "vv": told, then taken back
    ]
    assert [(t, e) for t, e in late if isinstance(e, SpeechStart)] == [
        (24 * 30, SpeechStart(t_ms=20 * 30))
    ]
    [(_, utterance)] = [(t, e) for t, e in late if not isinstance(e, SpeechStart)]
    assert isinstance(utterance, Utterance)
    assert [(t, e) for t, e in told if not isinstance(e, SpeechStart)] == [
        *[(t, e) for t, e in late if not isinstance(e, SpeechStart)],
        ((blip + 5) * 30, Discarded(start_ms=blip * 30, end_ms=(blip + 5) * 30)),
    ]


@pytest.mark.usefixtures("scripted")
def test_endpoint_and_pads_are_frame_exact() -> None:
    seg = Segmenter(16000)
    timed = feed_timed(seg, script("." * 20 + "v" * 50 + "." * 40), 960)
    assert [e for _, e in timed][0] == SpeechStart(t_ms=600)
    final_at, utt = timed[1]
    assert isinstance(utt, Utterance)
    assert utt.last_voiced_ms == 70 * 30
    assert final_at == utt.last_voiced_ms + 17 * 30  # first frame past endpoint_ms
    assert utt.end_ms == utt.last_voiced_ms + CFG.trailing_pad_ms
    # pre-roll: the buffered frames up to the one that confirmed the start
    assert utt.start_ms == 600 + 3 * 30 - CFG.preroll_ms


@pytest.mark.usefixtures("scripted")
def test_cut_in_a_pause_keeps_time_moving_forward() -> None:
    """Max length reached 450 ms into a pause: the pause goes with the piece."""
    pcm = script("." * 10 + "v" * 78 + "." * 40)
    events = run(Segmenter(16000, VadConfig(max_utterance_ms=3000)), pcm)
    assert [type(e) for e in events] == [SpeechStart, Utterance, Discarded]
    check_well_formed(events, pcm, 16000, 3000)
    assert events[1].cut and events[1].last_voiced_ms == 88 * 30


@pytest.mark.usefixtures("scripted")
def test_a_short_tail_after_a_cut_is_kept() -> None:
    """Four voiced frames left after a cut are the end of a word, not a click."""
    pcm = script("." * 10 + "v" * 88 + "." + "v" * 4 + "." * 40)
    events = run(Segmenter(16000, VadConfig(max_utterance_ms=3000)), pcm)
    assert [type(e) for e in events] == [SpeechStart, Utterance, Utterance]
    check_well_formed(events, pcm, 16000, 3000)
    head, tail = events[1], events[2]
    assert head.cut and not tail.cut and head.end_ms == tail.start_ms
    assert tail.last_voiced_ms == 103 * 30
