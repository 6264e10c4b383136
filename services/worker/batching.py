"""Batching across sessions: several utterances decoded with one model call per step.

`decode_batch(model, requests, policy)` gives, item by item, what
`services.worker.decoding.decode` gives for each request alone, with the model
steps shared: one encoder call on the stacked 30 s windows, one greedy
`generate` on all the prompts, then each item's alignment, the per-item retry
decisions, the wider-beam retries batched (those of equal `max_length`, see
below), their alignment, and the per-item word gates (voiced spans, Silero).
The segments that a forced context silenced are decoded again on their own,
batched too.

Measured on 2 CPU cores (tiny.en int8, loadtest/README.md "Batching"): no step
is cheaper per item in a batch there, so batching is off by default
(`WorkerSettings.batch_max` 1); it is meant for a GPU.

CTranslate2's Whisper takes a batch of prompts under two conditions
(src/models/whisper.cc `check_prompts`): every prompt has its
`<|startoftranscript|>` at the same index and the same number of special tokens
after it; the text tokens after those (the forced context) may differ in
length, and each row is forced through its own prefix. Requests whose prompts
differ in shape (a prompt of earlier finals, context as previous text), in
language or in the first timestamp allowed go in separate calls.

Exactness. A batch row must come out as it would alone, whatever else is in
the batch (the same audio gives the same finals). What could differ, and what
is done about it:

- `max_length` is one number per call; each request has its own (its token
  budget). Greedy decoding is causal, so a row that stopped before its own
  limit stopped the same way alone; a row that reached it (a repetition loop)
  is decoded again alone with its own limit. Beam search may run past the
  point where a shorter limit would have ended it and still pick an earlier
  hypothesis, with no sign of it in the result: wider-beam retries share a
  call only with retries of the same `max_length`.
- Alignment is one call per item. A shared call pads the token sequences (with
  equal frame counts CTranslate2 normalises the attention over the padded token
  axis), and even where it need not (differing frame counts, trimmed per row; or
  equal token counts) it was not exact everywhere: on an AMD EPYC (oneDNN) the
  word probabilities of a shared call differed from the item's alone in the 7th
  digit (0.6195161 against 0.6195158), times and text equal. A probability decides
  the beam retry (< 0.5), so that is not close enough. It costs a batch one
  alignment call per item (~50 ms each on this CPU, ~7 % of a final).
- Sampling (`temperature` > 0) is not reproducible across batch layouts: such
  a policy is decoded item by item, as is language detection (multilingual
  models without a language), which is per item anyway.

Row independence of the matrix products themselves (int8 GEMMs, the encoder's
convolutions) is CTranslate2's; `tests/test_batching.py` checks it on recorded
speech on the CPU (equal in every field, in two batch layouts), and
`loadtest/batching.py` counts differences while it measures. On a GPU the
kernels chosen may depend on the batch size, and a subset of rows is encoded
again rather than copied: run the benchmark there and read its "differ" column
before turning batching on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from services.worker.decoding import (
    Decoded,
    DecodedWord,
    DecodePolicy,
    DecodeRequest,
    _alone_request,
    _budget,
    _decode,
    _finish,
    _generate,
    _generate_many,
    _heard,
    _initial,
    _max_length,
    _new_words,
    _prompts,
    _read,
    _shifted,
    _tail_prompt,
    _tokenizer,
    _verdict,
    _wants_retry,
    _window,
    decode,
)


def batchable(model, request: DecodeRequest, policy: DecodePolicy) -> bool:  # type: ignore[no-untyped-def]
    """Whether `request` can share model calls: a known language (or an English-only
    model, which decodes English whatever it is told) and no sampling."""
    if policy.temperature > 0:
        return False
    if request.language:
        return True
    return not model.model.is_multilingual and request.language_prior in ("", "en")


def decode_batch(
    model, requests: list[DecodeRequest], policy: DecodePolicy | None = None
) -> list[Decoded]:  # type: ignore[no-untyped-def]
    """`[decode(model, r, policy) for r in requests]`, with the model steps batched."""
    policy = policy or DecodePolicy()
    out: list[Decoded | None] = [None] * len(requests)
    shared = [i for i, r in enumerate(requests) if batchable(model, r, policy)]
    if len(shared) < 2:
        shared = []
    for i, request in enumerate(requests):
        if i not in shared:
            out[i] = decode(model, request, policy)
    again: list[tuple[int, DecodeRequest]] = []
    for i, decoded in zip(
        shared, _decode_many(model, [requests[i] for i in shared], policy), strict=True
    ):
        request = requests[i]
        if (
            decoded.words
            or decoded.skipped in ("no_speech", "repetitive")
            or not request.context_text
            or request.segment_start_s <= 0
        ):
            out[i] = decoded
            continue
        # as `decode`: a forced context that silenced the segment: decode it alone
        request = dataclasses.replace(request, language=decoded.language or request.language)
        again.append((i, request))
    alone = [_alone_request(r, r.segment_start_s) for _, r in again]
    for (i, request), decoded in zip(again, _decode_many(model, alone, policy), strict=True):
        out[i] = _shifted(decoded, request.segment_start_s)
    assert all(d is not None for d in out)
    return out  # type: ignore[return-value]


@dataclass(eq=False)
class _Item:
    """One request on its way through the batched steps (what `_decode` keeps in locals)."""

    audio: np.ndarray
    seg_start: float
    voiced: tuple[tuple[float, float], ...]
    duration: float
    features: np.ndarray
    num_frames: int
    language: str
    tokenizer: object
    prompts: dict[bool | str, tuple[list[int], list[int], list[int]]]
    prefix_tokens: list[int]
    budget: int
    row: int = 0
    beam: int = 0
    result: object = None
    tokens: list[int] = field(default_factory=list)
    avg_lp: float = 0.0
    text: str = ""
    words: list[DecodedWord] | None = None
    how: bool | str = False  # which prompt of `prompts` the next generate uses
    context_words: list[dict] = field(default_factory=list)  # as the last alignment timed them


def _decode_many(model, requests: list[DecodeRequest], policy: DecodePolicy) -> list[Decoded]:  # type: ignore[no-untyped-def]
    """`_decode` on each request, batched (requests must be `batchable`)."""
    if len(requests) <= 1:
        return [_decode(model, r, policy) for r in requests]
    from faster_whisper.transcribe import pad_or_trim

    out: list[Decoded | None] = [None] * len(requests)
    items: dict[int, _Item] = {}
    for k, request in enumerate(requests):
        prepared = _prepare(model, request, policy, row=len(items))
        if isinstance(prepared, Decoded):
            out[k] = prepared
        else:
            items[k] = prepared
    if not items:
        return out  # type: ignore[return-value]
    live = list(items.values())
    encoder = _Encoded(model, np.stack([pad_or_trim(i.features) for i in live]))

    beam = policy.beam_size
    _run(model, encoder, live, policy, beam)
    if policy.retry_word_probability > 0:
        _align(model, encoder, live, policy)
    _retry(model, encoder, live, policy, beam)
    pending: dict[int, dict] = {}
    for k, i in items.items():
        done, stats = _verdict(
            policy, i.result, i.tokens, i.avg_lp, i.text, i.beam, i.language, i.tokenizer,
            i.seg_start, i.duration,
        )  # fmt: skip
        if done is not None:
            out[k] = _heard(done, i.audio, i.seg_start, policy)
        else:
            pending[k] = stats
    _align(model, encoder, [items[k] for k in pending if items[k].words is None], policy)
    for k, stats in pending.items():
        i = items[k]
        out[k] = _finish(i.words or [], i.audio, i.voiced, policy, i.seg_start, stats)
    return out  # type: ignore[return-value]


def _prepare(model, request: DecodeRequest, policy: DecodePolicy, row: int) -> _Item | Decoded:  # type: ignore[no-untyped-def]
    """What `_decode` computes before the encoder, or its answer for an empty window."""
    window = _window(request, policy)
    if window is None:
        return Decoded(skipped="empty")
    audio, seg_start, voiced, context_text, duration = window
    features = model.feature_extractor(audio)
    language = request.language or "en"
    tokenizer = _tokenizer(model, language)
    prompts: dict[bool | str, tuple[list[int], list[int], list[int]]] = _prompts(
        model, tokenizer, request, context_text, seg_start, policy
    )
    prefix_tokens = prompts[policy.context_in_prompt][1]
    return _Item(
        audio=audio,
        seg_start=seg_start,
        voiced=voiced,
        duration=duration,
        features=features,
        num_frames=features.shape[-1] - 1,
        language=language,
        tokenizer=tokenizer,
        prompts=prompts,
        prefix_tokens=prefix_tokens,
        budget=_budget(policy, duration - seg_start, duration, prefix_tokens),
        row=row,
        how=policy.context_in_prompt,
    )


def _retry(model, encoder: _Encoded, live: list[_Item], policy: DecodePolicy, beam: int) -> None:  # type: ignore[no-untyped-def]
    """The wider-beam retry of the rows whose greedy result looks unreliable."""
    retry = [
        i for i in live if _wants_retry(policy, beam, i.text, i.avg_lp, i.tokens, i.budget, i.words)
    ]
    if not retry:
        return
    greedy = {id(i): i.tokens for i in retry}
    for i in retry:
        _retry_prompt(i, policy)
    _run(model, encoder, retry, policy, policy.retry_beam_size)
    for i in retry:
        if i.tokens != greedy[id(i)]:  # the same tokens align the same: keep the words
            i.words = None


def _retry_prompt(i: _Item, policy: DecodePolicy) -> None:
    """The wider-beam retry's prompt, chosen as `_decode` chooses it."""
    i.how = policy.retry_context_in_prompt
    if policy.retry_forced_tail_s > 0 and i.prefix_tokens and i.context_words and not i.how:
        tail = _tail_prompt(
            i.tokenizer, i.prefix_tokens, i.context_words, i.seg_start, policy.retry_forced_tail_s
        )
        if tail is not None:
            i.prompts["tail"], i.how = tail, "tail"


class _Encoded:
    """The encoder output of the stacked windows, and any subset of its rows."""

    def __init__(self, model, features: np.ndarray) -> None:  # type: ignore[no-untyped-def]
        self.model = model
        self.features = features
        self.output = model.encode(features)
        self._keep: list[np.ndarray] = []  # arrays that row subsets were made from

    def rows(self, rows: list[int]):  # type: ignore[no-untyped-def]
        import ctranslate2

        if rows == list(range(len(self.features))):
            return self.output
        if self.output.device != "cpu":  # no host copy to index: encode the subset again
            return self.model.encode(self.features[rows])
        view = np.ascontiguousarray(np.asarray(self.output)[rows])
        self._keep.append(view)
        return ctranslate2.StorageView.from_array(view)


def _shape(prompt: list[int], tokenizer) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """Where `<|startoftranscript|>` is and how many special tokens follow it: what
    CTranslate2 needs equal across a batch (whisper.cc `check_prompts`)."""
    sot = prompt.index(tokenizer.sot)
    end = sot
    while end < len(prompt) and tokenizer.sot <= prompt[end] <= tokenizer.no_timestamps:
        end += 1
    return sot, end


def _run(model, encoder: _Encoded, items: list[_Item], policy, beam: int) -> None:  # type: ignore[no-untyped-def]
    """One generate per group of compatible prompts; sets each item's result. Greedy
    rows share the largest `max_length` of their group (a row that reaches its own is
    decoded again alone); wider beams are grouped by their own `max_length` too."""
    groups: dict[tuple, list[_Item]] = {}
    for i in items:
        prompt, _, forced = i.prompts[i.how]
        limit = _max_length(model, i.tokenizer, prompt, forced, i.budget) if beam > 1 else 0
        key = (_shape(prompt, i.tokenizer), _initial(policy, forced, i.how), i.language, limit)
        groups.setdefault(key, []).append(i)
    for (_, initial, _, _), group in groups.items():
        limits = [
            _max_length(model, i.tokenizer, i.prompts[i.how][0], i.prompts[i.how][2], i.budget)
            for i in group
        ]
        shared = max(limits)
        results = _generate_many(
            model,
            encoder.rows([i.row for i in group]),
            [i.prompts[i.how][0] for i in group],
            group[0].tokenizer,
            policy,
            beam,
            shared,
            initial,
        )
        for i, limit, result in zip(group, limits, results, strict=True):
            prompt, _, forced = i.prompts[i.how]
            n = len(result.sequences_ids[0])
            if limit < shared and n >= limit // 2 - 1:  # alone, its limit would have ended it
                result = _generate(
                    model, encoder.rows([i.row]), prompt, i.tokenizer, policy, beam, limit, initial
                )
            i.result, i.beam = result, beam
            i.tokens, i.avg_lp, i.text = _read(result, forced, i.tokenizer)


def _align(model, encoder: _Encoded, items: list[_Item], policy: DecodePolicy) -> None:  # type: ignore[no-untyped-def]
    """Word times of each item's tokens, one alignment call per item (see the module
    doc: a shared call is not exact on every CPU)."""
    for i in items:
        if not (i.tokens and policy.word_timestamps):
            i.words = []
            continue
        aligned = model.find_alignment(
            i.tokenizer, [i.prefix_tokens + i.tokens], encoder.rows([i.row]), i.num_frames
        )
        i.context_words = aligned[0] if aligned else []
        i.words = _new_words(i.context_words, len(i.prefix_tokens), i.seg_start, i.voiced, policy)
