"""services/worker/decoding.py on real audio with the real tiny.en model.

JFK (real reverb and hiss), Asterisk prompts (a recorded human voice) and a
noise-only clip (room noise, hum, breath-like bursts, a click): the cases where
Whisper invents words or loses them at a cut.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest

from services.worker.decoding import SAMPLE_RATE, DecodePolicy, DecodeRequest, decode
from services.worker.models import resolve_model

PROMPTS = Path("/usr/share/asterisk/sounds/en_US_f_Allison")
JFK_TEXT = (
    "And so my fellow Americans, ask not what your country can do for you, "
    "ask what you can do for your country."
)


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    from faster_whisper import WhisperModel

    return WhisperModel(
        str(resolve_model("tiny.en")),
        device="cpu",
        compute_type="int8",
        cpu_threads=2,
        local_files_only=True,
    )


def _load(path: Path) -> np.ndarray:
    from faster_whisper.audio import decode_audio

    return decode_audio(str(path), sampling_rate=SAMPLE_RATE)


@pytest.fixture(scope="module")
def jfk(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    try:
        from loadtest.realspeech import ensure_sources

        return _load(ensure_sources().jfk_wav)
    except Exception:  # noqa: BLE001  (not ready, or offline): try the local sdist
        pass
    sdist = Path("/tmp/jfk/pywhispercpp-1.5.1.tar.gz")
    if not sdist.is_file():
        pytest.skip("JFK clip not available")
    out = tmp_path_factory.mktemp("jfk")
    with tarfile.open(sdist) as tar:
        member = tar.getmember("pywhispercpp-1.5.1/whisper.cpp/samples/jfk.wav")
        member.name = "jfk.wav"
        tar.extract(member, out, filter="data")
    return _load(out / "jfk.wav")


def _prompt(name: str) -> np.ndarray:
    path = PROMPTS / f"{name}.wav"
    if not path.is_file():
        pytest.skip("Asterisk prompts not installed (asterisk-core-sounds-en-wav)")
    return _load(path)


def _room(seconds: float, seed: int = 1) -> np.ndarray:
    """Pink-ish room noise at about -48 dBFS with a faint 50 Hz hum."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    spec = rng.normal(size=n // 2 + 1) + 1j * rng.normal(size=n // 2 + 1)
    spec /= np.sqrt(np.maximum(np.fft.rfftfreq(n, 1 / SAMPLE_RATE), 20.0))
    x = np.fft.irfft(spec, n)
    x *= 0.004 / np.sqrt(np.mean(x**2))
    x += 0.0015 * np.sin(2 * np.pi * 50 * np.arange(n) / SAMPLE_RATE)
    return x.astype(np.float32)


def _words(text: str) -> list[str]:
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()(text).split()


def _wer(ref: str, hyp: str) -> float:
    import jiwer

    return jiwer.wer(" ".join(_words(ref)), " ".join(_words(hyp)) or "<empty>")


def _voiced(audio: np.ndarray, frame_ms: int = 30) -> tuple[tuple[float, float], ...]:
    """Voiced spans by webrtcvad, as the edge computes them."""
    import webrtcvad

    vad = webrtcvad.Vad(3)
    pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16).tobytes()
    fb = SAMPLE_RATE * frame_ms // 1000 * 2
    spans: list[tuple[float, float]] = []
    for k in range(len(pcm) // fb):
        if vad.is_speech(pcm[k * fb : (k + 1) * fb], SAMPLE_RATE):
            t0, t1 = k * frame_ms / 1000, (k + 1) * frame_ms / 1000
            if spans and abs(spans[-1][1] - t0) < 1e-9:
                spans[-1] = (spans[-1][0], t1)
            else:
                spans.append((t0, t1))
    return tuple(spans)


def test_jfk_words(model, jfk) -> None:  # type: ignore[no-untyped-def]
    out = decode(model, DecodeRequest(audio=jfk, voiced=_voiced(jfk)), DecodePolicy())
    assert _wer(JFK_TEXT, out.text) <= 0.1, out.text
    assert out.words and all(
        0 <= w.start_s <= w.end_s <= len(jfk) / SAMPLE_RATE + 0.05 for w in out.words
    )


def test_noise_gives_no_words(model) -> None:  # type: ignore[no-untyped-def]
    noise = _room(6.0, seed=3)
    rng = np.random.default_rng(4)
    for start in (0.8, 2.6, 4.1):  # breath-like bursts: shaped noise with a slow envelope
        n = int(0.5 * SAMPLE_RATE)
        burst = np.convolve(rng.normal(size=n), np.hanning(9) / 4.5, "same") * np.hanning(n) * 0.05
        i = int(start * SAMPLE_RATE)
        noise[i : i + n] += burst.astype(np.float32)
    noise[int(3.3 * SAMPLE_RATE) : int(3.3 * SAMPLE_RATE) + 80] += 0.3 * np.hanning(80).astype(
        np.float32
    )
    out = decode(model, DecodeRequest(audio=noise, voiced=_voiced(noise)), DecodePolicy())
    assert out.words == [] and out.text == "", out


def test_words_before_the_segment_are_dropped(model) -> None:  # type: ignore[no-untyped-def]
    first, second = (
        _prompt("agent-loginok"),
        _prompt("conf-locked"),
    )  # "Agent logged in." / "...locked."
    gap = _room(1.2)
    audio = np.concatenate([_room(0.4), first, gap, second, _room(0.4)])
    seg_start = (0.4 * SAMPLE_RATE + len(first) + len(gap) * 0.6) / SAMPLE_RATE
    voiced = _voiced(audio)
    for context_text in ("", "Agent logged in."):  # re-decoded context, forced context
        req = DecodeRequest(
            audio=audio, segment_start_s=seg_start, voiced=voiced, context_text=context_text
        )
        out = decode(model, req, DecodePolicy())
        words = _words(out.text)
        assert "agent" not in words and "logged" not in words, (context_text, out.text)
        assert _wer("This conference is locked.", out.text) <= 0.25, (context_text, out.text)
        assert all(w.start_s >= seg_start - 0.3 for w in out.words), out.words


def test_words_outside_voiced_spans_are_dropped(model, jfk) -> None:  # type: ignore[no-untyped-def]
    voiced = tuple(
        (a, b) for a, b in _voiced(jfk) if b <= 5.0
    )  # pretend only the first 5 s are speech
    out = decode(model, DecodeRequest(audio=jfk, voiced=voiced), DecodePolicy())
    assert out.dropped > 0
    assert out.words and all(w.start_s <= 5.0 + 0.2 for w in out.words), out.words


def test_same_audio_same_output(model, jfk) -> None:  # type: ignore[no-untyped-def]
    req = DecodeRequest(
        audio=jfk[: 6 * SAMPLE_RATE],
        voiced=_voiced(jfk[: 6 * SAMPLE_RATE]),
        prompt="Inaugural address.",
    )
    a, b = decode(model, req, DecodePolicy()), decode(model, req, DecodePolicy())
    assert a == b


def test_long_forced_context_keeps_every_new_word(model, jfk) -> None:  # type: ignore[no-untyped-def]
    """11 s of context forced as text must not eat the new segment's token budget
    (CTranslate2 counts the forced tokens in `max_length`, and returns half of it)."""
    segment = _prompt("conf-locked")  # "This conference is locked."
    gap = _room(0.8)
    audio = np.concatenate([jfk, gap, segment, _room(0.4)])
    seg_start = (len(jfk) + len(gap) * 0.6) / SAMPLE_RATE
    voiced = tuple((a, b) for a, b in _voiced(audio) if b > seg_start)
    req = DecodeRequest(
        audio=audio, segment_start_s=seg_start, voiced=voiced, context_text=JFK_TEXT
    )
    out = decode(model, req, DecodePolicy())
    assert _wer("This conference is locked.", out.text) <= 0.25, out.text
    assert "country" not in _words(out.text), out.text


def test_a_context_that_ends_a_sentence_does_not_silence_the_new_one(model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Forced through a finished sentence, tiny.en may end the transcript at once and say
    nothing of the new speech; the segment is then decoded on its own."""
    from loadtest.speech import make_speech

    first = (
        "the committee will meet again on thursday afternoon to discuss the budget "
        "for the new library and the repairs to the old town hall"
    )
    second = "please remember to water the plants on the balcony every morning while we are away"
    speech = make_speech([first, second], tmp_path, gap_s=0.8)
    audio = np.frombuffer(speech.pcm, dtype=np.int16).astype(np.float32) / 32768.0
    (s0, _), (s1, e1) = speech.spans
    seg_start = s1 - 0.3
    req = DecodeRequest(
        audio=audio[int((s0 - 0.3) * SAMPLE_RATE) : int((e1 + 0.3) * SAMPLE_RATE)],
        segment_start_s=seg_start - (s0 - 0.3),
        # as the earlier final said it (no full stop): with it, the model stops at once
        context_text="The committee will meet again on Thursday afternoon to discuss the budget "
        "for the new library and the repairs to the old town hall",
        voiced=((s1 - (s0 - 0.3), e1 - (s0 - 0.3)),),
    )
    out = decode(model, req, DecodePolicy())
    said = _words(out.text)
    assert len(said) >= 8 and "morning" in said, out.text
    assert "committee" not in said, out.text


@pytest.mark.parametrize("look", [True, False])
def test_a_long_context_before_a_short_segment(model, jfk, look) -> None:  # type: ignore[no-untyped-def]
    """Half a second of new speech after 22 s of context. The retry reads the context as
    previous text, which counts against CTranslate2's `max_length`: a short segment's
    budget alone is shorter than the prompt, and that killed the worker (SIGSEGV), so it
    is added on top. (On half a word the model may copy the context, "This country",
    forced or read as previous text alike: a look's text is replaced by its final, and
    a final ends at a pause, not mid-word.)"""
    segment = _prompt("conf-locked")[: SAMPLE_RATE // 2]  # half a second of speech
    gap = _room(0.8)
    audio = np.concatenate([jfk, jfk, gap, segment])  # 22 s of context, ~60 tokens of text
    seg_start = (2 * len(jfk) + len(gap) * 0.6) / SAMPLE_RATE
    policy = (
        DecodePolicy(  # a look, as WhisperEngine.look_policy
            beam_size=1, retry_beam_size=0, word_timestamps=False, context_in_prompt=True
        )
        if look
        else DecodePolicy(retry_word_probability=1.01, retry_context_in_prompt=True)
    )  # p < 1.01: always retried, reading the context as previous text
    req = DecodeRequest(
        audio=audio, segment_start_s=seg_start, context_text=f"{JFK_TEXT} {JFK_TEXT}"
    )
    out = decode(model, req, policy)  # before: the process died here
    assert all(w.start_s >= seg_start - 0.3 for w in out.words), out.words  # new words only


@pytest.fixture(scope="module")
def probe_cuts():  # type: ignore[no-untyped-def]
    """The benchmark's noise probe (120 s, nobody speaking) and the stretches of it the
    edge's VAD takes for speech, cut as the edge cuts them."""
    from loadtest import realspeech as rs
    from loadtest.corpus import default_cache_dir
    from services.edge.vad import Segmenter, Utterance, VadConfig

    item = rs.noise_probe(default_cache_dir(), SAMPLE_RATE, 120.0)
    segmenter = Segmenter(SAMPLE_RATE, VadConfig())
    cuts = [e for e in segmenter.feed(item.pcm) + segmenter.flush() if isinstance(e, Utterance)]
    assert len(cuts) >= 10  # the VAD does take the probe's noises for speech
    return rs.to_float(item.pcm).astype(np.float32), cuts


def test_a_look_at_noise_the_vad_took_for_speech_shows_no_words(model, probe_cuts) -> None:  # type: ignore[no-untyped-def]
    """Each stretch looked at as an interim look does, 700 ms in. Looks have no word
    timing to gate word by word; without Silero's verdict on the whole look, one of
    these said "Okay." and, live, another "Thank you."."""
    from loadtest import realspeech as rs

    audio, cuts = probe_cuts
    look = DecodePolicy(
        beam_size=1, retry_beam_size=0, word_timestamps=False, context_in_prompt=True
    )
    said = {}
    for cut in cuts:
        start = cut.start_ms * SAMPLE_RATE // 1000
        window = audio[start : start + SAMPLE_RATE * 7 // 10 + 4800]  # 700 ms + pre-roll
        text = decode(model, DecodeRequest(audio=window, final=False), look).text
        if rs.normalise(text):
            said[cut.start_ms] = text
    assert said == {}


def test_finals_of_noise_the_vad_took_for_speech_say_nothing_not_even_mmm(
    model, probe_cuts
) -> None:  # type: ignore[no-untyped-def]
    """Each stretch decoded as its final is, with the edge's voiced spans. Whisper's
    normaliser drops "Mmm" as a filler, but a device shows it: two of these said it,
    each word unsure (p 0.21, 0.27) where the model called the audio non-speech."""
    audio, cuts = probe_cuts
    said = {}
    for cut in cuts:
        piece = audio[cut.start_ms * SAMPLE_RATE // 1000 : cut.end_ms * SAMPLE_RATE // 1000]
        voiced = tuple(
            ((a - cut.start_ms) / 1000, (b - cut.start_ms) / 1000) for a, b in cut.voiced
        )
        text = decode(model, DecodeRequest(audio=piece, voiced=voiced), DecodePolicy()).text
        if text.strip():
            said[cut.start_ms] = text
    assert said == {}


def test_the_encoder_says_the_same_on_one_thread_or_two(jfk) -> None:  # type: ignore[no-untyped-def]
    """Workers pick the encoder's threads by what the other workers do (the decode board),
    so the same audio gives the same finals only while the thread count changes nothing."""
    import ctranslate2
    from faster_whisper.feature_extractor import FeatureExtractor
    from faster_whisper.transcribe import pad_or_trim

    path = str(resolve_model("tiny.en"))
    window = np.concatenate([jfk, _room(4.0), jfk]).astype(np.float32)
    features = ctranslate2.StorageView.from_array(
        np.ascontiguousarray(pad_or_trim(FeatureExtractor()(window))[None])
    )
    outputs = [
        np.array(
            ctranslate2.models.Whisper(
                path, device="cpu", compute_type="int8", intra_threads=threads
            ).encode(features)
        )
        for threads in (1, 2)
    ]
    assert np.array_equal(outputs[0], outputs[1])


def test_a_segment_withdrawn_while_it_is_encoded_stops_there(model, jfk) -> None:  # type: ignore[no-untyped-def]
    """The edge withdrew the segment (speech resumed after its pause) while the worker
    encoded it: asked after the encoder, the decode stops, with no words; still wanted,
    it is the decode it always was."""
    req = DecodeRequest(audio=jfk, voiced=_voiced(jfk))
    asked: list[bool] = []

    def withdrawn() -> bool:
        asked.append(False)
        return False

    stopped = decode(model, req, DecodePolicy(), wanted=withdrawn)
    assert (stopped.skipped, stopped.words, stopped.text) == ("withdrawn", [], "")
    assert asked == [False]  # asked once, and no second decode without the context
    assert decode(model, req, DecodePolicy(), wanted=lambda: True) == decode(
        model, req, DecodePolicy()
    )
