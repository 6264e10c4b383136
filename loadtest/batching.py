"""Batching across sessions: what decoding B utterances in one batched call gains.

    python -m loadtest.batching [--sizes 1,2,4,8] [--windows 32] [--rounds 2] [--threads 2]
                                [--model tiny.en] [--device cpu] [--compute-type int8]

The windows are real speech as the edge sends it: utterances of the recorded
sessions of `loadtest.realspeech` (Asterisk prompts on room noise), cut by the
edge's VAD, each with up to 25 s of left context and its committed text, as
`loadtest.decoding_sim` builds them (its DEF variant, the shipped tiny.en
policy). Their context texts come from decoding them in order with `decode`,
which also gives the reference each batched result is compared with.

Then, in each round and for each batch size B in a rotated order (the machine is
shared and noisy: compare the sizes within one run, round by round), every window
is decoded once, B at a time, back to back in this one process: B = 1 is
`decoding.decode` alone, the one-process ceiling with no pipeline at all; B > 1
is `batching.decode_batch`. Reported per B: audio seconds decoded per wall second
(the new segments' audio, context not counted), the ratio to B = 1 in the same
run, p50/p95 latency per segment (the wall time of the call its segment was in:
in a batch every segment waits for the whole batch; queueing not included), and
how many results differ from the reference (must be 0).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.worker.batching import decode_batch
from services.worker.decoding import SAMPLE_RATE, Decoded, DecodePolicy, DecodeRequest, decode


def real_windows(
    model, policy: DecodePolicy, count: int, cache_dir: Path | None = None
) -> list[tuple[DecodeRequest, Decoded]]:  # type: ignore[no-untyped-def]
    """`count` utterances of the recorded sessions as the edge sends them, each with what
    `decode` gives for it alone (decoded in order, which is where the context texts
    come from). Raises `loadtest.corpus.CorpusError` when the recordings are missing."""
    from loadtest import decoding_sim as ds

    variant = ds.VARIANTS["DEF"]
    out: list[tuple[DecodeRequest, Decoded]] = []
    for f in ds.build_files(["real"], cache_dir):
        utts = ds.segment(f.audio, variant.endpoint_ms)
        texts: list[str] = []
        for i in range(len(utts)):
            if len(out) >= count:
                return out
            request = ds.request_for(f.audio, utts, texts, i, variant)
            decoded = decode(model, request, policy)
            texts.append(decoded.text.strip())
            out.append((request, decoded))
    return out


def segment_seconds(request: DecodeRequest) -> float:
    return len(request.audio) / SAMPLE_RATE - request.segment_start_s


@dataclass
class Tally:
    audio_s: float = 0.0
    wall_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    differ: int = 0
    per_round: list[float] = field(default_factory=list)  # audio s per wall s

    def row(self, base: Tally) -> dict[str, float | int]:
        lat = sorted(self.latencies_ms)
        ratios = [a / b for a, b in zip(self.per_round, base.per_round, strict=True)]
        return {
            "audio_s_per_s": self.audio_s / self.wall_s,
            "vs_b1": statistics.median(ratios),
            "vs_b1_min": min(ratios),
            "vs_b1_max": max(ratios),
            "p50_ms": statistics.median(lat),
            "p95_ms": lat[int(0.95 * (len(lat) - 1))],
            "segments": len(lat),
            "differ": self.differ,
        }


def run_size(model, windows, policy: DecodePolicy, size: int, tally: Tally) -> None:  # type: ignore[no-untyped-def]
    audio = wall = 0.0
    for k in range(0, len(windows), size):
        chunk = windows[k : k + size]
        requests = [r for r, _ in chunk]
        started = time.perf_counter()
        if size == 1:
            out = [decode(model, requests[0], policy)]
        else:
            out = decode_batch(model, requests, policy)
        took = time.perf_counter() - started
        wall += took
        audio += sum(segment_seconds(r) for r in requests)
        tally.latencies_ms += [took * 1000] * len(chunk)
        tally.differ += sum(o != ref for o, (_, ref) in zip(out, chunk, strict=True))
    tally.audio_s += audio
    tally.wall_s += wall
    tally.per_round.append(audio / wall)


def load_model(name: str, device: str, compute_type: str, threads: int):  # type: ignore[no-untyped-def]
    from faster_whisper import WhisperModel

    from services.worker.models import resolve_model

    return WhisperModel(
        str(resolve_model(name)),
        device=device,
        compute_type=compute_type,
        cpu_threads=threads,
        local_files_only=True,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--sizes", default="1,2,4,8", help="batch sizes; 1 is always run")
    ap.add_argument("--windows", type=int, default=32, help="utterances decoded per size per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--model", default="tiny.en")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compute-type", default="int8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", type=Path, default=None, help="speech cache (realspeech)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)

    sizes = sorted({1, *(int(s) for s in args.sizes.split(","))})
    model = load_model(args.model, args.device, args.compute_type, args.threads)
    policy = DecodePolicy.for_model(model.model.is_multilingual)
    started = time.perf_counter()
    windows = real_windows(model, policy, args.windows, args.cache_dir)
    audio = sum(segment_seconds(r) for r, _ in windows)
    print(
        f"{len(windows)} windows, {audio:.1f} s of new audio "
        f"(mean {audio / len(windows):.2f} s), built in {time.perf_counter() - started:.0f} s; "
        f"{args.model} {args.device} {args.compute_type}, {args.threads} threads",
        flush=True,
    )
    tallies = {b: Tally() for b in sizes}
    for r in range(args.rounds):
        order = sizes[r % len(sizes) :] + sizes[: r % len(sizes)]
        for b in order:
            run_size(model, windows, policy, b, tallies[b])
        print(
            f"round {r + 1}: "
            + ", ".join(f"B={b} {tallies[b].per_round[-1]:.2f}" for b in sizes)
            + " audio s/s",
            flush=True,
        )
    rows = {b: tallies[b].row(tallies[1]) for b in sizes}
    print(
        "| B | audio s / wall s | vs B=1 (min-max over rounds) | p50 / p95 ms per segment | differ |"
    )
    print("|---|---|---|---|---|")
    for b, row in rows.items():
        print(
            f"| {b}{' (ceiling: decode back to back)' if b == 1 else ''} "
            f"| {row['audio_s_per_s']:.2f} "
            f"| {row['vs_b1']:.2f} ({row['vs_b1_min']:.2f}-{row['vs_b1_max']:.2f}) "
            f"| {row['p50_ms']:.0f} / {row['p95_ms']:.0f} "
            f"| {row['differ']} of {row['segments']} |"
        )
    if args.json:
        meta = {"model": args.model, "device": args.device, "compute_type": args.compute_type}
        meta |= {"threads": args.threads, "windows": len(windows), "rounds": args.rounds}
        args.json.write_text(json.dumps({**meta, "sizes": rows}, indent=2))
    return 0 if all(row["differ"] == 0 for row in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
