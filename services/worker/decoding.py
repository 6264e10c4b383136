"""How one utterance is decoded: pure functions around a faster-whisper model.

No NATS, no asyncio: `decode(model, request, policy)` is a blocking call that
the worker runs on its executor and that `loadtest/decoding_sim.py` runs on
recorded sessions, so the benchmark measures exactly the shipped code.

Why not `WhisperModel.transcribe`: it is built for long files (a 30 s window
loop, temperature fallback, prompt carried between windows). An utterance is
one window, and on a live stream the costly and harmful parts of that loop
are the fallbacks (a hallucinating segment re-decoded up to 5 times) and the
lack of any check of the words against the audio. So this module calls the
three model steps directly, once each: encode, generate, align.

What a request holds and why (see `DecodeRequest`):

- Left context audio. Whisper decodes a VAD cut on its own worse than the
  same words inside a longer recording: the first words lack acoustic and
  language context. The edge sends some audio before the segment (best
  starting at an earlier utterance's start, so no word is cut in half), and
  only words inside the new segment are kept.
- Voiced spans from the edge VAD. Whisper invents words ("Thank you.",
  "Okay.") where there is no speech, mostly in the quiet tail of a segment.
  A word is kept only if it overlaps voiced audio: the decision comes from
  the audio, not from a list of phrases.
- A prompt of committed finals of the same session (optional). It must come
  only from finals already committed, in order, so that the same audio gives
  the same text whatever the timing of the workers.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from services.common.languages import primary_language

SAMPLE_RATE = 16000
WINDOW_S = 30.0  # Whisper sees at most 30 s per call
SKIPPED_WITHDRAWN = "withdrawn"  # skipped: the edge took the segment back while it was decoded
# skipped for a reason a second decode without the context would not change
_NOT_AGAIN = ("no_speech", "repetitive", "not_speech", SKIPPED_WITHDRAWN)
Wanted = Callable[[], bool] | None  # asked after each encoder pass: still wanted?


@dataclass(frozen=True)
class DecodePolicy:
    """Every knob of the decoder. Defaults are the measured choice for tiny.en
    (see the loadtest/decoding_sim.py docstring for the numbers): greedy, one
    beam-5 retry when a new word has probability < 0.5, no sampling fallback,
    no timestamp tokens, context forced as prefix, voiced-span gate. The edge
    should send up to 25 s of left context (context + segment <= 30 s).
    `for_model` gives the choice for the multilingual base model."""

    beam_size: int = 1
    # A retry with a wider beam when the greedy result looks unreliable (low
    # avg_logprob or repetitive). Deterministic, unlike sampling at
    # temperature > 0, and paid only by the few segments that need it.
    retry_beam_size: int = 5
    # When to retry: average token log-probability below this, or (after
    # alignment) any new word's probability below `retry_word_probability`.
    # The word test is the one that fires on real speech (~45 % of segments
    # with tiny.en): tiny.en 3.6 -> 3.1 % WER, 0.100 -> 0.117 CPU s/s.
    retry_logprob: float = -1.0
    retry_word_probability: float = 0.5
    temperature: float = 0.0
    # Characters of prompt used at most (from the end of `request.prompt`);
    # 0 ignores the prompt. Off by default: with tiny.en it helped a little
    # (4.0 -> 3.5 % WER), but base copied the prompt into short segments
    # ("press 3 to record your name" for "sip", "bluetooth": 5.3 -> 9.7 %).
    prompt_chars: int = 0
    # Whisper's own timestamp tokens make it end segments early and cost
    # decoding steps; words are timed by cross-attention alignment anyway.
    without_timestamps: bool = True
    word_timestamps: bool = True
    # New tokens allowed per second of segment audio (+ a floor): speech runs
    # at ~3-5 tokens/s, so a repetition loop is cut short instead of running
    # to 224 tokens (which is what makes hallucinating segments slow).
    max_tokens_per_s: float = 8.0
    min_max_tokens: int = 16
    # Segment-level gates (Whisper's own): skip when the model says no speech
    # and is not confident of the text; drop text that compresses too well.
    no_speech_threshold: float = 0.6
    logprob_threshold: float = -1.0
    compression_ratio_threshold: float = 2.4
    # And skip when the model says no speech (no_speech_threshold) and is unsure of
    # every word it kept: each below this aligned probability. 0 disables it. Measured
    # (loadtest/decoding_sim.py NS4, NS5): the noise probe's two "Mmm" finals (p 0.21
    # and 0.27, no-speech 0.79 and 0.83, which Whisper's own gate keeps at avg
    # log-prob -0.84 / -0.98) go; not a word of speech changes (tiny.en 13/2/3 on
    # real+jfk, espeak and 10 / 5 dB the same, at 0.4 and at 0.5).
    unsure_no_speech_probability: float = 0.4
    # Word-level gate against the edge VAD: a word widened by this margin (s)
    # on both sides must overlap the voiced spans. None disables it.
    voiced_margin_s: float | None = 0.1
    # Minimum overlap (s) of the widened word with the voiced spans.
    min_voiced_overlap_s: float = 0.02
    # Trailing words below this probability are dropped (tail hallucinations
    # are improbable words after the speech). 0 disables it.
    tail_min_probability: float = 0.0
    # Keep a word when its midpoint lies after segment_start_s - this.
    keep_after_s: float = 0.0
    # Cut the request audio to last voiced + this pad (s) before decoding.
    # None keeps the whole request audio.
    trim_pad_s: float | None = None
    # Second opinion on speech from Silero VAD (faster-whisper's ONNX): words
    # must overlap its speech regions too. Costs ~10-30 ms per call.
    silero: bool = True  # measured: the probe 1 -> 0 words, same WER on speech, +5 % CPU
    # Language detection (a request without `language`, multilingual models), on the
    # new segment's encoder frames, encoded with their left context (`segment_first`;
    # measured with base on espeak German: a short utterance alone was heard as Thai
    # at p 0.91, German at 0.02; after two German utterances, German at 0.91). The
    # session's language so far (`language_prior`) is kept unless another is this
    # many times likelier than it and at least `language_confidence` likely (only
    # likelier: the two are compared as below).
    language_stickiness: float = 5.0
    # A top language below this probability is not trusted: it and the runner-up
    # (or the prior) are each decoded greedily and the transcript the model scores
    # higher wins (a first utterance, German at 0.44 against English at 0.50: avg
    # log-prob -0.36 against -0.70).
    language_confidence: float = 0.8
    # How the committed context text reaches the decoder. True: as the previous
    # text (`<|startofprev|>`, read in one decoder pass) with one forced start
    # timestamp at the segment start, so the model writes only the new words.
    # False: forced token by token after the sot sequence (Whisper's prefix),
    # which costs a decoder step per context token (~5 ms each for tiny.en on
    # 2 threads: ~200 ms per call with 25 s of context).
    context_in_prompt: bool = False
    # The same for the wider-beam retry only. Measured (loadtest/decoding_sim.py,
    # C25RWR vs C25RW): about the same WER on real speech (3.2 vs 3.1 %), fewer words
    # invented in noise (10 dB: 0.0 vs 1.0 per 100), and the retry costs ~66 instead
    # of ~236 ms (decode p95 695 vs 990 ms). Not the default yet: with it, one CI run
    # saw an upload's WER at 0.30 and a word time moved 280 ms in the loss test, which
    # pass with the forced retry and did not come back on rerunning; not understood.
    retry_context_in_prompt: bool = False
    # With > 0: the retry forces only the context words of the last this-many seconds
    # (timed by the greedy pass's alignment), after a timestamp at their start, and
    # reads the earlier context as previous text: a few forced steps instead of all.
    retry_forced_tail_s: float = 0.0

    @classmethod
    def for_model(cls, multilingual: bool, **overrides: object) -> DecodePolicy:
        """The measured choice for a model: tiny.en (English-only) gains from the
        beam-5 retry; base (multilingual) does not (2.9 -> 3.2 % WER at +30 % CPU),
        so it decodes greedily once."""
        knobs: dict[str, object] = {} if not multilingual else {"retry_beam_size": 0}
        return cls(**{**knobs, **overrides})  # type: ignore[arg-type]


@dataclass(frozen=True)
class DecodeRequest:
    """What to decode. Times are seconds within `audio`.

    audio: float32 mono 16 kHz, left context followed by the new segment.
    segment_start_s: where the new segment begins in `audio` (0 without context).
    prompt: committed finals of the session before the audio (may be "").
    context_text: committed text of the context audio. When given, the
        decoder is forced through it (Whisper's prefix) and only generates the
        new segment's words, which is cheaper than re-decoding the context.
        When "" the context is decoded again and words before the segment
        start are discarded.
    voiced: voiced spans (start_s, end_s) within `audio` from the edge VAD;
        empty means "unknown": the voiced gate is then skipped.
    """

    audio: np.ndarray
    segment_start_s: float = 0.0
    prompt: str = ""
    context_text: str = ""
    voiced: tuple[tuple[float, float], ...] = ()
    final: bool = True
    language: str = "en"  # "": detect it (multilingual models; English-only ones: en)
    language_prior: str = ""  # with language "": the session's language so far


@dataclass(frozen=True)
class DecodedWord:
    word: str
    start_s: float
    end_s: float
    probability: float


@dataclass(frozen=True)
class Decoded:
    words: list[DecodedWord] = field(default_factory=list)
    text: str = ""
    dropped: int = 0  # words removed as non-speech (voiced/silero/tail gates)
    skipped: str = ""  # why the whole segment gave no text ("no_speech", ...)
    no_speech_prob: float = 0.0
    avg_logprob: float = 0.0
    compression_ratio: float = 0.0
    beam_used: int = 0
    tokens: int = 0
    language: str = ""  # the language decoded in (the detected one when not given)


def compression_ratio(text: str) -> float:
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def _tokenizer(model, language: str):
    from faster_whisper.tokenizer import Tokenizer

    multilingual = model.model.is_multilingual
    return Tokenizer(
        model.hf_tokenizer,
        multilingual,
        task="transcribe",
        language=whisper_language(language) if multilingual else "en",
    )


def whisper_language(code: str) -> str:
    """Whisper's name for a language code: its primary subtag ("en-US" -> "en")."""
    return primary_language(code) or "en"


def language_candidates(model, encoder_output, prior: str, policy: DecodePolicy) -> list[str]:  # type: ignore[no-untyped-def]
    """The languages the encoded audio may be in, to choose from, likeliest first:
    Whisper's language token probabilities (one decoder step). The session's `prior`
    stays unless another language is `language_stickiness` times likelier; an unsure
    top language (under `language_confidence`) comes with the runner-up (no prior) or
    the prior. English-only models: en."""
    if not model.model.is_multilingual:
        return ["en"]
    ranked = [(str(t[2:-2]), p) for t, p in model.model.detect_language(encoder_output)[0]]
    top, p_top = ranked[0]
    if not prior:
        sure = p_top >= policy.language_confidence or len(ranked) < 2
        return [top] if sure else [top, ranked[1][0]]
    p_prior = next((p for code, p in ranked if code == prior), 0.0)
    if top == prior or p_top <= policy.language_stickiness * p_prior:
        return [prior]
    return [top] if p_top >= policy.language_confidence else [prior, top]


def segment_first(encoder_output, segment_start_s: float, duration_s: float):  # type: ignore[no-untyped-def]
    """The encoder frames of the new segment (encoded with their left context) moved to
    the start of the window, followed by the window's padding: Whisper's language token
    reads mostly the start of a window, which is the context's. Returns the window
    itself when there is no context (or the frames are not on the CPU)."""
    import ctranslate2

    first = int(segment_start_s / 0.02)  # encoder frames are 20 ms
    if first <= 0 or encoder_output.device != "cpu":
        return encoder_output
    frames = np.asarray(encoder_output)  # (1, 1500, d)
    total = frames.shape[1]
    end = min(total, max(first + 1, int(np.ceil(duration_s / 0.02))))
    padding = frames[:, end:]
    if not padding.shape[1]:
        return encoder_output
    copies = -(-(total - end + first) // padding.shape[1])  # enough to fill the window
    view = np.concatenate([frames[:, first:end], *[padding] * copies], axis=1)[:, :total]
    return ctranslate2.StorageView.from_array(np.ascontiguousarray(view))


def _language_score(
    model, encoder_output, language: str, policy: DecodePolicy, seconds: float
) -> float:  # type: ignore[no-untyped-def]
    """The model's average log-probability of a greedy transcript of the encoded audio in
    `language`: how well that language explains it."""
    tokenizer = _tokenizer(model, language)
    prompt = [*tokenizer.sot_sequence, tokenizer.no_timestamps]
    budget = int(policy.min_max_tokens + policy.max_tokens_per_s * seconds)
    greedy = dataclasses.replace(policy, temperature=0.0)
    result = _generate(
        model, encoder_output, prompt, tokenizer, greedy, 1, min(model.max_length, 2 * budget)
    )
    n = len(result.sequences_ids[0])
    return float(result.scores[0]) * n / (n + 1)


def _overlap(a0: float, a1: float, spans) -> float:
    return sum(max(0.0, min(a1, b1) - max(a0, b0)) for b0, b1 in spans)


_SILERO = None


def silero_spans(audio: np.ndarray) -> list[tuple[float, float]]:
    """Speech regions (s) by Silero VAD, bundled with faster-whisper as ONNX."""
    from faster_whisper.vad import VadOptions, get_speech_timestamps

    opts = VadOptions(
        threshold=0.5, min_speech_duration_ms=100, min_silence_duration_ms=300, speech_pad_ms=100
    )
    return [
        (c["start"] / SAMPLE_RATE, c["end"] / SAMPLE_RATE)
        for c in get_speech_timestamps(audio, opts)
    ]


def _generate(model, encoder_output, prompt, tokenizer, policy, beam, max_length, initial=50):
    return _generate_many(
        model, encoder_output, [prompt], tokenizer, policy, beam, max_length, initial
    )[0]


def _generate_many(model, encoder_output, prompts, tokenizer, policy, beam, max_length, initial):  # type: ignore[no-untyped-def]
    """One generate call for a batch of prompts (one per row of `encoder_output`)."""
    from faster_whisper.transcribe import get_suppressed_tokens

    kwargs = {"beam_size": beam}
    if policy.temperature > 0:
        kwargs = {"beam_size": 1, "sampling_topk": 0, "sampling_temperature": policy.temperature}
    return model.model.generate(
        encoder_output,
        prompts,
        max_length=max_length,
        return_scores=True,
        return_no_speech_prob=True,
        suppress_blank=True,
        suppress_tokens=get_suppressed_tokens(tokenizer, [-1]),
        max_initial_timestamp_index=initial,
        **kwargs,
    )


def _budget(policy: DecodePolicy, seg_dur: float, duration: float, prefix_tokens: list[int]) -> int:
    """New tokens allowed: re-decoded context needs its own; forced context text does not."""
    return int(
        policy.min_max_tokens + policy.max_tokens_per_s * (seg_dur if prefix_tokens else duration)
    )


def _max_length(model, tokenizer, prompt: list[int], forced: list[int], budget: int) -> int:  # type: ignore[no-untyped-def]
    """CTranslate2 returns at most max_length // 2 tokens after the sot sequence, the
    forced context included (faster-whisper's 448 is Whisper's 224-token sample
    length): ask for twice what the forced tokens plus the new words' budget need.
    Asking for len(prompt) + budget cut the new words short after a long context.
    Previous text (before `<|startoftranscript|>`) counts against max_length too, and
    a max_length shorter than the prompt crashes the process (SIGSEGV in
    CTranslate2): it is added on top."""
    previous = prompt.index(tokenizer.sot) if tokenizer.sot in prompt else 0
    return min(model.max_length, 2 * (len(forced) + budget) + previous)


def _initial(policy: DecodePolicy, forced: list[int], in_prompt: bool) -> int:
    """max_initial_timestamp_index: the first timestamp after a timed context is the
    segment start, past 1 s."""
    timed = not policy.without_timestamps or in_prompt
    return 1500 if forced and timed else 50


def _read(result, forced: list[int], tokenizer) -> tuple[list[int], float, str]:  # type: ignore[no-untyped-def]
    """(new text tokens, average log-probability, text) of one generate result."""
    seq = list(result.sequences_ids[0])
    if forced and seq[: len(forced)] == forced:
        seq = seq[len(forced) :]  # CTranslate2 returns the forced prefix too
    tokens = [t for t in seq if t < tokenizer.eot]
    avg_lp = result.scores[0] * len(seq) / (len(seq) + 1)
    return tokens, float(avg_lp), tokenizer.decode(tokens).strip()


def _wants_retry(
    policy: DecodePolicy, beam: int, text: str, avg_lp: float, tokens: list[int], budget: int, words
) -> bool:  # type: ignore[no-untyped-def]
    """Whether the greedy result looks unreliable enough for the wider-beam retry."""
    return policy.retry_beam_size > beam and (
        compression_ratio(text) > policy.compression_ratio_threshold
        or avg_lp < policy.retry_logprob
        or len(tokens) >= budget
        or any(w.probability < policy.retry_word_probability for w in words or ())
    )


def _verdict(
    policy: DecodePolicy,
    result,
    tokens: list[int],
    avg_lp: float,
    text: str,
    beam: int,
    language: str,
    tokenizer,
    seg_start: float,
    duration: float,
) -> tuple[Decoded | None, dict]:  # type: ignore[no-untyped-def]
    """The segment-level gates on the chosen result: a finished `Decoded` when they
    decide (skipped, or no word timing wanted), else None; and the stats either way."""
    nsp = float(result.no_speech_prob)
    cr = compression_ratio(text)
    stats = dict(
        no_speech_prob=nsp,
        avg_logprob=avg_lp,
        compression_ratio=cr,
        beam_used=beam,
        tokens=len(tokens),
        language=language,
    )
    if nsp > policy.no_speech_threshold and avg_lp < policy.logprob_threshold:
        return Decoded(skipped="no_speech", **stats), stats  # type: ignore[arg-type]
    if cr > policy.compression_ratio_threshold:
        return Decoded(skipped="repetitive", **stats), stats  # type: ignore[arg-type]
    if not tokens:
        return Decoded(skipped="empty", **stats), stats  # type: ignore[arg-type]
    if not policy.word_timestamps:
        words = [DecodedWord(w, seg_start, duration, 1.0) for w in _split_words(tokenizer, tokens)]
        return Decoded(words=words, text=text, **stats), stats  # type: ignore[arg-type]
    return None, stats


def _heard(decoded: Decoded, audio: np.ndarray, seg_start: float, policy: DecodePolicy) -> Decoded:
    """Without word timing (an interim look) there are no words to gate one by one, so
    Silero judges the new audio as a whole: where it hears no speech, the look shows
    nothing. Else a look at a noise the edge's VAD took for speech showed the words
    ("Thank you.") that the word gates then drop from its final."""
    if policy.word_timestamps or not policy.silero or not decoded.words:
        return decoded
    if silero_spans(audio[int(seg_start * SAMPLE_RATE) :]):
        return decoded
    return dataclasses.replace(
        decoded, words=[], text="", dropped=len(decoded.words), skipped="not_speech"
    )


def _finish(
    words: list[DecodedWord],
    audio: np.ndarray,
    voiced,
    policy: DecodePolicy,
    seg_start: float,
    stats: dict,
) -> Decoded:  # type: ignore[no-untyped-def]
    """The word gates, then the result."""
    words, dropped = _gate(words, audio, voiced, policy, seg_start)
    unsure = policy.unsure_no_speech_probability
    if (
        words
        and unsure > 0
        and stats["no_speech_prob"] > policy.no_speech_threshold
        and all(w.probability < unsure for w in words)
    ):
        return Decoded(skipped="no_speech", dropped=dropped + len(words), **stats)  # type: ignore[arg-type]
    text = "".join(w.word for w in words).strip()
    return Decoded(words=words, text=text, dropped=dropped, **stats)  # type: ignore[arg-type]


def decode(
    model, request: DecodeRequest, policy: DecodePolicy | None = None, wanted: Wanted = None
) -> Decoded:  # type: ignore[no-untyped-def]
    """Decode the new segment of `request` with `model` (a faster_whisper.WhisperModel).

    One encoder pass, one generate (plus at most one wider-beam retry), one
    alignment pass; then the word gates. Deterministic: no sampling unless
    `policy.temperature` > 0, and nothing depends on state outside `request`.

    Forced through a context text that ends a sentence, the model sometimes
    calls the transcript finished and says nothing of the new audio. When the
    context gave no word although the model did not call the audio non-speech,
    the segment is decoded once more on its own.

    `wanted`, if given, is asked after each encoder pass: False (the edge withdrew the
    segment) ends the decode there, skipped "withdrawn".
    """
    policy = policy or DecodePolicy()
    try:
        decoded = _decode(model, request, policy, wanted)
    except _LanguageChanged as changed:  # the context's text is in the old language
        request = dataclasses.replace(request, context_text="", language=changed.language)
        return _alone(model, request, policy, request.segment_start_s, wanted)
    if decoded.words or decoded.skipped in _NOT_AGAIN:
        return decoded
    if not request.context_text or request.segment_start_s <= 0:
        return decoded
    request = dataclasses.replace(request, language=decoded.language or request.language)
    return _alone(model, request, policy, request.segment_start_s, wanted)


def _alone(
    model, request: DecodeRequest, policy: DecodePolicy, cut: float, wanted: Wanted = None
) -> Decoded:  # type: ignore[no-untyped-def]
    """The new segment of `request` decoded without its context; times within `request`."""
    return _shifted(_decode(model, _alone_request(request, cut), policy, wanted), cut)


def _alone_request(request: DecodeRequest, cut: float) -> DecodeRequest:
    """`request` without the audio before `cut` (and so without its context)."""
    return DecodeRequest(
        audio=np.asarray(request.audio)[int(round(cut * SAMPLE_RATE)) :],
        prompt=request.prompt,
        voiced=tuple((a - cut, b - cut) for a, b in request.voiced if b > cut),
        final=request.final,
        language=request.language,
        language_prior=request.language_prior,
    )


def _shifted(decoded: Decoded, cut: float) -> Decoded:
    """`decoded` of an `_alone_request`, its word times back within the original request."""
    words = [
        DecodedWord(w.word, w.start_s + cut, w.end_s + cut, w.probability) for w in decoded.words
    ]
    return dataclasses.replace(decoded, words=words)


class _LanguageChanged(Exception):
    """Detected: not the session's language so far, while its context text is forced."""

    def __init__(self, language: str) -> None:
        super().__init__(language)
        self.language = language


def _language(
    model,
    encoder_output,
    request: DecodeRequest,
    context_text: str,
    seg_start: float,
    duration: float,
    policy,
) -> str:  # type: ignore[no-untyped-def]
    """The language to decode in: the request's, or detected on the new segment's
    encoder frames with the session's language as prior; where unsure between two, the
    one whose greedy transcript of the segment the model scores higher (the first of
    equals). Raises `_LanguageChanged` when it is not the session's language so far
    and a context text (in that one) would be forced."""
    if request.language:
        return request.language
    prior = request.language_prior
    view = segment_first(encoder_output, seg_start, duration)
    candidates = language_candidates(model, view, prior, policy)
    language = candidates[0]
    if len(candidates) > 1:
        seconds = duration - seg_start
        scores = [_language_score(model, view, c, policy, seconds) for c in candidates]
        language = candidates[scores.index(max(scores))]
    if prior and language != prior and context_text:
        raise _LanguageChanged(language)
    return language


def _decode(model, request: DecodeRequest, policy: DecodePolicy, wanted: Wanted = None) -> Decoded:  # type: ignore[no-untyped-def]
    from faster_whisper.transcribe import pad_or_trim

    window = _window(request, policy)
    if window is None:
        return Decoded(skipped="empty")
    audio, seg_start, voiced, context_text, duration = window
    features = model.feature_extractor(audio)
    num_frames = features.shape[-1] - 1
    encoder_output = model.encode(pad_or_trim(features))
    if wanted is not None and not wanted():
        return Decoded(skipped=SKIPPED_WITHDRAWN)
    language = _language(model, encoder_output, request, context_text, seg_start, duration, policy)
    tokenizer = _tokenizer(model, language)
    prompts = _prompts(model, tokenizer, request, context_text, seg_start, policy)
    prefix_tokens = prompts[policy.context_in_prompt][1]
    budget = _budget(policy, duration - seg_start, duration, prefix_tokens)

    def run(beam: int, in_prompt: bool):  # type: ignore[no-untyped-def]
        prompt, _, forced = prompts[in_prompt]
        max_length = _max_length(model, tokenizer, prompt, forced, budget)
        initial = _initial(policy, forced, in_prompt)
        result = _generate(
            model, encoder_output, prompt, tokenizer, policy, beam, max_length, initial
        )
        return result, *_read(result, forced, tokenizer)

    context_words: list[dict] = []  # the context's words as the last alignment timed them

    def align(tokens: list[int]) -> list[DecodedWord]:
        if not tokens or not policy.word_timestamps:
            return []
        aligned = model.find_alignment(
            tokenizer, [prefix_tokens + tokens], encoder_output, num_frames
        )
        context_words[:] = aligned[0] if aligned else []
        return _new_words(
            aligned[0] if aligned else [], len(prefix_tokens), seg_start, voiced, policy
        )

    beam = policy.beam_size
    result, tokens, avg_lp, text = run(beam, policy.context_in_prompt)
    words = align(tokens) if policy.retry_word_probability > 0 else None
    if _wants_retry(policy, beam, text, avg_lp, tokens, budget, words):
        beam = policy.retry_beam_size
        how: bool | str = policy.retry_context_in_prompt
        if policy.retry_forced_tail_s > 0 and prefix_tokens and context_words and not how:
            tail = _tail_prompt(
                tokenizer, prefix_tokens, context_words, seg_start, policy.retry_forced_tail_s
            )
            if tail is not None:
                prompts["tail"], how = tail, "tail"  # type: ignore[index]
        greedy_tokens = tokens
        result, tokens, avg_lp, text = run(beam, how)  # type: ignore[arg-type]
        if tokens != greedy_tokens:  # the same tokens align the same: keep the words
            words = None
    done, stats = _verdict(
        policy, result, tokens, avg_lp, text, beam, language, tokenizer, seg_start, duration
    )
    if done is not None:
        return _heard(done, audio, seg_start, policy)
    if words is None:
        words = align(tokens)
    return _finish(words, audio, voiced, policy, seg_start, stats)


def _window(request: DecodeRequest, policy: DecodePolicy):  # type: ignore[no-untyped-def]
    """(audio, segment start, voiced spans, context text, duration) as Whisper will see
    them (`_fit_window`); None when the new segment holds next to no audio."""
    audio, seg_start, voiced, context_text = _fit_window(request, policy)
    duration = len(audio) / SAMPLE_RATE
    if duration - seg_start <= 0.05:
        return None
    return audio, seg_start, voiced, context_text, duration


def _prompts(
    model,
    tokenizer,
    request: DecodeRequest,
    context_text: str,
    seg_start: float,
    policy: DecodePolicy,
):  # type: ignore[no-untyped-def]
    """`_prompt_tokens` for each way the policy reads the context (greedy pass, retry)."""
    return {
        in_prompt: _prompt_tokens(
            model, tokenizer, request.prompt, context_text, seg_start, policy, in_prompt
        )
        for in_prompt in {policy.context_in_prompt, policy.retry_context_in_prompt}
    }


def _fit_window(request: DecodeRequest, policy: DecodePolicy):  # type: ignore[no-untyped-def]
    """The request's audio cut to what Whisper sees: 30 s at most (a forced
    context is dropped whole, a re-decoded one oldest audio first) and, with `trim_pad_s`, no longer than the last
    voiced frame plus a pad."""
    audio = np.asarray(request.audio, dtype=np.float32)
    seg_start = float(request.segment_start_s)
    voiced = tuple(request.voiced)
    context_text = request.context_text.strip()
    excess = len(audio) / SAMPLE_RATE - WINDOW_S
    if excess > 0 and context_text:
        excess = seg_start  # forced text must match its audio: drop the whole context
    if excess > 0:
        cut = min(excess, seg_start)
        audio = audio[int(round(cut * SAMPLE_RATE)) :][: int(WINDOW_S * SAMPLE_RATE)]
        seg_start -= cut
        voiced = tuple((a - cut, b - cut) for a, b in voiced if b > cut)
        context_text = ""  # no longer matches the audio
    if policy.trim_pad_s is not None and voiced:
        end = max(max(b for _, b in voiced) + policy.trim_pad_s, seg_start + 0.1)
        audio = audio[: int(round(end * SAMPLE_RATE))]
    return audio, seg_start, voiced, context_text


def _prompt_tokens(
    model,
    tokenizer,
    prompt_text: str,
    context_text: str,
    seg_start: float,
    policy: DecodePolicy,
    in_prompt: bool,
):  # type: ignore[no-untyped-def]
    """Decoder prompt, and the context's text tokens and all forced tokens after the
    sot sequence. Without timestamps: [prev + committed text] sot-sequence notimestamps
    [context text]. With them the context is one timed segment that ends where the new
    segment starts: sot-sequence <|0.00|> context text <|segment start|>. With
    `context_in_prompt`: prev [prompt text] context text, sot-sequence, <|segment start|>."""
    limit = model.max_length // 2 - 1
    earlier: list[int] = []
    if policy.prompt_chars > 0 and prompt_text.strip():
        text = prompt_text.strip()[-policy.prompt_chars :]
        earlier = tokenizer.encode(" " + text)[-limit:]
    prefix_tokens: list[int] = []
    forced: list[int] = []
    if context_text:
        prefix_tokens = tokenizer.encode(" " + context_text)[:limit]
    if prefix_tokens and in_prompt:
        prev = [*earlier, *prefix_tokens][-limit:]
        forced = [tokenizer.timestamp_begin + min(int(round(seg_start / 0.02)), 1500)]
        return [tokenizer.sot_prev, *prev, *tokenizer.sot_sequence, *forced], prefix_tokens, forced
    prompt: list[int] = [tokenizer.sot_prev, *earlier] if earlier else []
    prompt += list(tokenizer.sot_sequence)
    if policy.without_timestamps:
        prompt.append(tokenizer.no_timestamps)
    if prefix_tokens:
        forced = list(prefix_tokens)
        if not policy.without_timestamps:
            end = min(int(round(seg_start / 0.02)), 1500)
            forced = [tokenizer.timestamp_begin, *forced, tokenizer.timestamp_begin + end]
        prompt += forced
    return prompt, prefix_tokens, forced


def _tail_prompt(
    tokenizer, prefix_tokens: list[int], aligned: list[dict], seg_start: float, tail_s: float
):  # type: ignore[no-untyped-def]
    """prev <older context> sot-sequence <|t|> <context words from t on>, t the start of
    the first context word within `tail_s` of the segment; None if there is none."""
    n = 0
    for w in aligned:
        if n >= len(prefix_tokens):
            return None
        start = float(w["start"])
        if start >= seg_start - tail_s and any(c.isalnum() for c in w["word"]):
            head, tail = prefix_tokens[:n], prefix_tokens[n:]
            stamp = tokenizer.timestamp_begin + min(int(start / 0.02), 1500)
            forced = [stamp, *tail]
            prev = [tokenizer.sot_prev, *head] if head else []
            return [*prev, *tokenizer.sot_sequence, *forced], prefix_tokens, forced
        n += len(w["tokens"])
    return None


def _new_words(
    aligned: list[dict], n_prefix: int, seg_start: float, voiced, policy: DecodePolicy
) -> list[DecodedWord]:  # type: ignore[no-untyped-def]
    """Aligned words that belong to the new segment (not the context)."""
    words: list[DecodedWord] = []
    n_seen = 0
    for w in aligned:
        first_token = n_seen
        n_seen += len(w["tokens"])
        if first_token < n_prefix or not any(c.isalnum() for c in w["word"]):
            continue  # a word of the forced context text, or punctuation alone
        start, end = float(w["start"]), float(w["end"])
        if not n_prefix and _position(start, end, voiced) < seg_start - policy.keep_after_s:
            continue  # a context word, re-decoded
        start = _voiced_start(start, end, voiced)
        words.append(DecodedWord(w["word"], start, end, float(w["probability"])))
    return words


def _voiced_start(start: float, end: float, voiced) -> float:
    """Alignment often stretches a word back over the pause before it; where the
    edge's VAD heard no voice there, the word starts where its voiced part does."""
    onsets = [a for a, b in voiced if b > start and a < end]
    if not onsets:
        return start
    return max(start, min(min(onsets), end))


def _gate(
    words: list[DecodedWord], audio: np.ndarray, voiced, policy: DecodePolicy, seg_start: float
) -> tuple[list[DecodedWord], int]:  # type: ignore[no-untyped-def]
    """Drop words the audio says are not speech; return (kept, dropped).

    Silero looks at the new segment and one second before it, not at the
    whole context (up to 25 s): the words it judges are the new ones."""
    n = len(words)
    if policy.voiced_margin_s is not None and voiced:
        # Widen the word, not the spans: alignment often gives the first word
        # after a pause zero length, right at the voiced onset.
        m = policy.voiced_margin_s
        words = [
            w
            for w in words
            if _overlap(w.start_s - m, w.end_s + m, voiced) >= policy.min_voiced_overlap_s
        ]
    if policy.silero and words:
        cut = max(0.0, min(seg_start, min(w.start_s for w in words)) - 1.0)
        spans = [(a + cut, b + cut) for a, b in silero_spans(audio[int(cut * SAMPLE_RATE) :])]
        words = [w for w in words if _overlap(w.start_s - 0.1, w.end_s + 0.1, spans) > 0]
    if policy.tail_min_probability > 0:
        while words and words[-1].probability < policy.tail_min_probability:
            words = words[:-1]
    return words, n - len(words)


def _position(start: float, end: float, voiced) -> float:
    """Where a word is, for deciding whether it belongs to the new segment.

    Alignment often stretches a word over the pause before it (its start
    jumps back to the previous word's end), so the plain midpoint can fall in
    the previous utterance. The midpoint of the word's voiced part does not.
    """
    parts = [(max(start, a), min(end, b)) for a, b in voiced if min(end, b) > max(start, a)]
    if not parts:
        return (start + end) / 2
    total = sum(b - a for a, b in parts)
    return sum((a + b) / 2 * (b - a) for a, b in parts) / total


def _split_words(tokenizer, tokens: list[int]) -> list[str]:
    words, _ = tokenizer.split_to_word_tokens(tokens + [tokenizer.eot])
    return [w for w in words if w.strip()]
