"""Where a final's decode time goes, step by step, on real speech.

    python -m loadtest.final_cost [--windows 32] [--threads 1] [--model tiny.en]
                                  [--compute-type int8] [--draft-check] [--json OUT]

The windows are those of `loadtest.batching` (utterances of the recorded sessions as
the edge sends them, each with up to 25 s of left context and its committed text).
Each is decoded with `decoding.decode` and the shipped policy, back to back in this
process, on `--threads` threads (1: as a finals worker decodes under load). Every
model call is timed where `decode` makes it: the log-mel features, the encoder, each
generate (greedy, and the beam-5 retry), the word alignment, Silero. Then, on the
window with the longest context, the same greedy generate with 0, half and all of its
context tokens forced, which gives what one forced context token costs (CTranslate2
runs a forced prefix one decoder step per token; text before `<|startoftranscript|>`
is read in one pass).

`--draft-check` also measures a draft-and-verify decode that was tried and not kept:
a cheap greedy draft reading the context as previous text, verified by one forced
alignment pass (a draft token of probability >= 0.55 there is what forced greedy
decoding picks, so a draft whose every token passes is that decode's result). It
prints how often the draft equals the forced greedy tokens and how often it verifies,
with the time of each call.

A benchmark: it prints numbers; compare runs of one hour only (the host is shared).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from loadtest.batching import load_model, real_windows, segment_seconds
from services.worker import decoding

FORCED_TOKEN_MIN_DRAFT_P = 0.55  # the draft check's margin over 0.5: argmax either way


class Steps:
    """Time and calls per step, summed over the windows."""

    def __init__(self) -> None:
        self.seconds: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[str] = collections.Counter()

    def timed(self, key: str, fn):  # type: ignore[no-untyped-def]
        def call(*args, **kwargs):  # type: ignore[no-untyped-def]
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - started
                self.calls[key] += 1

        return call


class _Timed:
    """The CTranslate2 model seen through `Steps`: generate is timed per beam size."""

    def __init__(self, inner, steps: Steps) -> None:  # type: ignore[no-untyped-def]
        self._inner = inner
        self._steps = steps

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self._inner, name)

    def generate(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        key = f"generate, beam {kwargs.get('beam_size', 1)}"
        return self._steps.timed(key, self._inner.generate)(*args, **kwargs)


@contextlib.contextmanager
def instrumented(model, steps: Steps) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """Times every model call `decoding.decode` makes on `model` (and Silero's) while
    the block runs."""
    saved = (model.feature_extractor, model.model, decoding.silero_spans)
    model.feature_extractor = steps.timed("features", model.feature_extractor)
    model.encode = steps.timed("encoder", model.encode)
    model.find_alignment = steps.timed("alignment", model.find_alignment)
    model.model = _Timed(model.model, steps)
    decoding.silero_spans = steps.timed("silero", decoding.silero_spans)
    try:
        yield
    finally:
        model.feature_extractor, model.model, decoding.silero_spans = saved
        del model.encode, model.find_alignment  # the class's own again


def _encoded(model, request: decoding.DecodeRequest, policy: decoding.DecodePolicy):  # type: ignore[no-untyped-def]
    from faster_whisper.transcribe import pad_or_trim

    audio, seg_start, _, context_text, duration = decoding._window(request, policy)
    features = model.feature_extractor(audio)
    encoded = model.encode(pad_or_trim(features))
    return encoded, features.shape[-1] - 1, seg_start, context_text, duration


def forced_token_cost(model, request, policy, repeats: int = 3) -> dict[int, float]:  # type: ignore[no-untyped-def]
    """Best-of-`repeats` ms of one greedy step after k forced context tokens, per k."""
    encoder_output, _, seg_start, context_text, _ = _encoded(model, request, policy)
    tokenizer = decoding._tokenizer(model, "en")
    context = tokenizer.encode(" " + context_text) if context_text else []
    sot = [*tokenizer.sot_sequence, tokenizer.no_timestamps]
    out: dict[int, float] = {}
    for k in sorted({0, len(context) // 2, len(context)}):
        prompt = sot + context[:k]
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            model.model.generate(encoder_output, [prompt], max_length=len(prompt) + 2, beam_size=1)
            best = min(best, time.perf_counter() - started)
        out[k] = best * 1000
    return out


def _greedy(model, encoder_output, prompts, tokenizer, policy, budget, in_prompt, ms):  # type: ignore[no-untyped-def]
    """(new tokens, `ms` plus this call's ms) of one greedy generate of `decode`'s."""
    prompt, _, forced = prompts[in_prompt]
    started = time.perf_counter()
    result = decoding._generate(
        model,
        encoder_output,
        prompt,
        tokenizer,
        policy,
        1,
        decoding._max_length(model, tokenizer, prompt, forced, budget),
        decoding._initial(policy, forced, in_prompt),
    )
    took = (time.perf_counter() - started) * 1000
    return decoding._read(result, forced, tokenizer)[0], ms + took


def draft_check(model, windows, policy) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """The draft-and-verify decode of the module doc, on each window."""
    import numpy as np

    tally: collections.Counter[str] = collections.Counter()
    ms: collections.Counter[str] = collections.Counter()
    tokenizer = decoding._tokenizer(model, "en")
    for request, _ in windows:
        encoder_output, num_frames, seg_start, context_text, duration = _encoded(
            model, request, policy
        )
        prompts = {
            in_prompt: decoding._prompt_tokens(
                model, tokenizer, request.prompt, context_text, seg_start, policy, in_prompt
            )
            for in_prompt in (False, True)
        }
        prefix = prompts[False][1]
        budget = decoding._budget(policy, duration - seg_start, duration, prefix)

        call = (model, encoder_output, prompts, tokenizer, policy, budget)
        forced_tokens, ms["forced greedy"] = _greedy(*call, False, ms["forced greedy"])
        draft, ms["draft"] = _greedy(*call, True, ms["draft"])
        started = time.perf_counter()
        aligned = model.model.align(
            encoder_output, tokenizer.sot_sequence, [prefix + draft], num_frames
        )[0]
        ms["verify (alignment)"] += (time.perf_counter() - started) * 1000
        probs = np.asarray(aligned.text_token_probs)[len(prefix) :]
        same = draft == forced_tokens
        verified = bool(draft) and float(probs.min()) >= FORCED_TOKEN_MIN_DRAFT_P
        tally["windows"] += 1
        tally["draft equals forced greedy"] += same
        tally["verified"] += verified
        tally["verified but not equal"] += verified and not same
    n = max(1, tally["windows"])
    return {**tally, **{f"{k} ms": v / n for k, v in ms.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--windows", type=int, default=32, help="utterances to decode")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="tiny.en")
    ap.add_argument("--compute-type", default="int8")
    ap.add_argument("--draft-check", action="store_true", help="also the draft-and-verify decode")
    ap.add_argument("--cache-dir", type=Path, default=None, help="speech cache (realspeech)")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args(argv)

    model = load_model(args.model, "cpu", args.compute_type, args.threads)
    policy = decoding.DecodePolicy.for_model(model.model.is_multilingual)
    windows = real_windows(model, policy, args.windows, args.cache_dir)
    audio = sum(segment_seconds(r) for r, _ in windows)
    steps = Steps()
    per_window: list[float] = []
    with instrumented(model, steps):
        started = time.perf_counter()
        for request, _ in windows:
            t = time.perf_counter()
            decoding.decode(model, request, policy)
            per_window.append((time.perf_counter() - t) * 1000)
        wall = time.perf_counter() - started
    n = len(windows)
    per_window.sort()
    print(
        f"{args.model} {args.compute_type}, {args.threads} thread(s): {n} windows, "
        f"{audio:.1f} s of new audio; {wall / n * 1000:.0f} ms per window "
        f"(p50 {per_window[n // 2]:.0f}, max {per_window[-1]:.0f}), "
        f"{audio / wall:.2f} audio s per s"
    )
    print("| step | calls | ms per window | ms per call | share |")
    print("|---|---|---|---|---|")
    rows = {}
    for key, seconds in sorted(steps.seconds.items(), key=lambda kv: -kv[1]):
        rows[key] = {
            "calls": steps.calls[key],
            "ms_per_window": seconds * 1000 / n,
            "ms_per_call": seconds * 1000 / steps.calls[key],
        }
        print(
            f"| {key} | {steps.calls[key]} | {rows[key]['ms_per_window']:.0f} "
            f"| {rows[key]['ms_per_call']:.0f} | {seconds / wall:.0%} |"
        )
    longest = max(windows, key=lambda w: len(w[0].context_text))[0]
    forced = forced_token_cost(model, longest, policy)
    ks = sorted(forced)
    per_token = (forced[ks[-1]] - forced[ks[0]]) / max(1, ks[-1] - ks[0])
    print(
        "one greedy step after k forced context tokens: "
        + ", ".join(f"k={k} {v:.0f} ms" for k, v in forced.items())
        + f" ({per_token:.1f} ms per forced token)"
    )
    report = {"windows": n, "ms_per_window": wall / n * 1000, "steps": rows}
    report["forced_ms"] = {str(k): v for k, v in forced.items()}
    if args.draft_check:
        check = draft_check(model, windows, policy)
        print("draft check: " + ", ".join(f"{k} {v:.0f}" for k, v in check.items()))
        report["draft_check"] = check
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
