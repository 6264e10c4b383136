"""Capacity: how many real-time sessions of real speech keep speech end -> Final p95 on target.

    python -m loadtest.capacity [--sessions 1,2,4,6,8,10,12] [--workers auto] [--model tiny.en]
                                [--target-ms 1500] [--session-s 60] [--ceiling-windows 32]
                                [--url URL] [--json OUT]

For each session count N in turn, N devices stream N different recorded sessions
(`loadtest.realspeech`: Asterisk prompts in room noise, people talking the way the
accuracy corpus does, with 0.7-2.5 s between utterances) in real time, 100 ms frames,
interims on, their starts 0.7 s apart. Without `--url` one `escapement up` (the default
worker layout unless `--workers`) is spawned for the whole sweep with its per-worker
session cap lifted, so that every device is admitted and the curve shows what each
load costs; the cap itself is the admission question (`loadtest concurrency`,
`--overload`). Reported per N:

- speech end -> Final p50 / p95 / max (from the reference spans, as `loadtest.accuracy`
  times it), onset -> first Interim p50, interims per Final;
- decoded audio: the finals' segment audio seconds per wall second over the run (from
  the first device's start to the last Final). It grows with N while the workers keep
  up; where it stops growing is the pipeline's throughput;
- model busy: the workers' summed `Final.inference_ms` per second of wall time, per
  worker (1.0: every worker decoding finals all the time; interim looks not counted).

The capacity is the largest N whose p95 is within `--target-ms`.

`--overload 2,5` then runs a second `escapement up` with its admission as configured
(by default, sessions fit the workers' measured decode rate: services/edge/admission.py)
and, for each factor k,
starts k x the capacity devices at once (0.7 s apart, each one session, the recordings
reused round-robin): every device is either admitted or refused up front, and the
admitted ones' p95 is reported next to the target, with any timeouts and failures.

The ceiling, measured in the same run after the sweep (the pipeline stopped): the same
kind of utterances (the recorded sessions cut by the edge's VAD, each with up to 25 s of
left context and its committed text; `loadtest.batching.real_windows`) decoded back to
back by `decoding.decode` in this one process, with no pipeline at all, two ways: one
model using every core's thread, and one model per core-thread pair (`num_workers` =
cores, one thread each, fed by as many Python threads: CTranslate2 lets go of the GIL).
The better of the two is the machine's ceiling for this model; the pipeline's
throughput is reported as a share of it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest import accuracy as acc
from loadtest.device import COMPLETED, FAILED, REFUSED, TIMED_OUT, SessionOptions
from loadtest.metrics import percentile
from loadtest.progress import Live
from loadtest.runner import ready_target
from loadtest.target import SpawnedUp, SpawnError
from loadtest.workload import http_session
from services.cli import workers_option
from services.common.host import usable_cores
from services.runtime.up import UpSettings, worker_layout

# the sweep admits every device: no fixed cap, no measured admission
UNCAPPED = {"ESCAPEMENT_MAX_SESSIONS_PER_WORKER": "0", "ESCAPEMENT_SESSION_LOAD": "0"}


@dataclass
class Step:
    sessions: int
    completed: int
    final_ms: list[float]
    first_interim_ms: list[float]
    finals: int
    interims: int
    audio_s: float  # segment audio of the finals
    inference_s: float
    wall_s: float

    def row(self, workers: int) -> dict[str, Any]:
        return {
            "sessions": self.sessions,
            "completed": self.completed,
            "final_p50_ms": percentile(self.final_ms, 50),
            "final_p95_ms": percentile(self.final_ms, 95),
            "final_max_ms": max(self.final_ms, default=None),
            "first_interim_p50_ms": percentile(self.first_interim_ms, 50),
            "interims_per_final": round(self.interims / self.finals, 2) if self.finals else None,
            "finals": self.finals,
            "decoded_audio_s_per_s": round(self.audio_s / self.wall_s, 3) if self.wall_s else 0,
            "model_busy": round(self.inference_s / self.wall_s / max(1, workers), 3)
            if self.wall_s
            else 0,
        }


async def run_step(http, url: str, entries: list[acc.Entry], token: str | None) -> Step:  # type: ignore[no-untyped-def]
    opts = SessionOptions(url=url, token=token)
    started = time.monotonic()
    runs = await acc.stream_all(http, entries, opts, len(entries), Live(enabled=False))
    final_ms: list[float] = []
    first_ms: list[float] = []
    last = started
    audio = inference = 0.0
    finals = interims = 0
    for entry, streamed in zip(entries, runs, strict=True):
        t = acc.timings(entry.item, streamed)
        final_ms += t.final_ms
        first_ms += t.first_interim_ms
        finals += len(streamed.finals)
        interims += len(streamed.interims)
        for received, final in streamed.finals:
            last = max(last, received)
            audio += (final.end_ms - final.start_ms) / 1000
            inference += final.inference_ms / 1000
    return Step(
        sessions=len(entries),
        completed=sum(s.outcome == COMPLETED for s in runs),
        final_ms=final_ms,
        first_interim_ms=first_ms,
        finals=finals,
        interims=interims,
        audio_s=audio,
        inference_s=inference,
        wall_s=last - started,
    )


def ceiling(model_name: str, windows: int, cache_dir: Path | None) -> dict[str, Any]:
    """Audio seconds decoded per wall second by this one process, back to back (blocking)."""
    from loadtest.batching import load_model, real_windows, segment_seconds
    from services.worker.decoding import DecodePolicy, decode

    cores = usable_cores()
    whole = load_model(model_name, "cpu", "int8", cores)
    policy = DecodePolicy.for_model(whole.model.is_multilingual)
    requests = [r for r, _ in real_windows(whole, policy, windows, cache_dir)]
    audio = sum(segment_seconds(r) for r in requests)

    started = time.perf_counter()
    for r in requests:
        decode(whole, r, policy)
    one_model = audio / (time.perf_counter() - started)
    del whole

    from faster_whisper import WhisperModel

    from services.worker.models import resolve_model

    per_core = WhisperModel(
        str(resolve_model(model_name)),
        device="cpu",
        compute_type="int8",
        cpu_threads=1,
        num_workers=cores,
        local_files_only=True,
    )
    lock = threading.Lock()
    queue = list(requests)

    def drain() -> None:
        while True:
            with lock:
                if not queue:
                    return
                r = queue.pop()
            decode(per_core, r, policy)

    started = time.perf_counter()
    with ThreadPoolExecutor(cores) as pool:
        for f in [pool.submit(drain) for _ in range(cores)]:
            f.result()
    per_core_rate = audio / (time.perf_counter() - started)
    return {
        "windows": len(requests),
        "audio_s": round(audio, 1),
        "one_model_all_threads": round(one_model, 3),
        "one_model_per_core": round(per_core_rate, 3),
        "ceiling": round(max(one_model, per_core_rate), 3),
        "cores": cores,
    }


@dataclass
class Overload:
    factor: int
    devices: int
    admitted: int
    refused: dict[str, int]
    timed_out: int
    failed: int
    final_ms: list[float]

    def row(self) -> dict[str, Any]:
        return {
            "factor": self.factor,
            "devices": self.devices,
            "admitted": self.admitted,
            "refused": self.refused,
            "timed_out": self.timed_out,
            "failed": self.failed,
            "final_p50_ms": percentile(self.final_ms, 50),
            "final_p95_ms": percentile(self.final_ms, 95),
        }


async def run_overload(http, url: str, entries: list[acc.Entry], factor: int, cap: int, token):  # type: ignore[no-untyped-def]
    devices = [entries[i % len(entries)] for i in range(factor * cap)]
    opts = SessionOptions(url=url, token=token)
    runs = await acc.stream_all(http, devices, opts, len(devices), Live(enabled=False))
    refused: dict[str, int] = {}
    final_ms: list[float] = []
    for entry, streamed in zip(devices, runs, strict=True):
        if streamed.outcome == REFUSED:
            refused[streamed.reason] = refused.get(streamed.reason, 0) + 1
        elif streamed.outcome == COMPLETED:
            final_ms += acc.timings(entry.item, streamed).final_ms
    outcomes = [s.outcome for s in runs]
    return Overload(
        factor=factor,
        devices=len(devices),
        admitted=len(devices) - outcomes.count(REFUSED),
        refused=refused,
        timed_out=outcomes.count(TIMED_OUT),
        failed=outcomes.count(FAILED),
        final_ms=final_ms,
    )


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def format_overload(rows: list[dict[str, Any]], target_ms: float) -> str:
    lines = [
        "| load | devices | admitted | refused up front (reason) | timed out | failed "
        "| admitted: speech end -> Final p50 / p95 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        reasons = ", ".join(f"{n} `{why}`" for why, n in r["refused"].items()) or "0"
        on = "" if (r["final_p95_ms"] or 1e12) <= target_ms else " (over)"
        lines.append(
            f"| {r['factor']}x | {r['devices']} | {r['admitted']} | {reasons} | {r['timed_out']} "
            f"| {r['failed']} | {_ms(r['final_p50_ms'])} / {_ms(r['final_p95_ms'])}{on} |"
        )
    return "\n".join(lines)


def capacity(rows: list[dict[str, Any]], target_ms: float) -> int:
    """The largest session count whose p95 is on target (0: none)."""
    ok = [
        r["sessions"]
        for r in rows
        if r["final_p95_ms"] is not None
        and r["final_p95_ms"] <= target_ms
        and r["completed"] == r["sessions"]
    ]
    return max(ok, default=0)


def format_table(rows: list[dict[str, Any]], target_ms: float, ceil: dict | None) -> str:
    lines = [
        "| sessions | completed | speech end -> Final p50 / p95 / max ms | first Interim p50 ms "
        "| interims per Final | decoded audio s/s | model busy per worker |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        on = "" if (r["final_p95_ms"] or 1e12) <= target_ms else " (over)"
        lines.append(
            f"| {r['sessions']} | {r['completed']} "
            f"| {_ms(r['final_p50_ms'])} / {_ms(r['final_p95_ms'])}{on} / {_ms(r['final_max_ms'])} "
            f"| {_ms(r['first_interim_p50_ms'])} | {r['interims_per_final']} "
            f"| {r['decoded_audio_s_per_s']:.2f} | {r['model_busy']:.2f} |"
        )
    cap = capacity(rows, target_ms)
    lines.append(f"\ncapacity (p95 <= {target_ms:,.0f} ms): {cap} session(s)")
    if ceil is not None:
        best = max((r["decoded_audio_s_per_s"] for r in rows), default=0.0)
        lines.append(
            f"ceiling, one process decoding back to back ({ceil['windows']} utterances, "
            f"{ceil['audio_s']} s): {ceil['one_model_all_threads']:.2f} audio s/s with one model "
            f"on {ceil['cores']} threads, {ceil['one_model_per_core']:.2f} with one thread per "
            f"core; the pipeline's best: {best:.2f} audio s/s = "
            f"{100 * best / ceil['ceiling']:.0f} % of the ceiling"
        )
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> int:
    counts = sorted({int(s) for s in args.sessions.split(",") if s.strip()})
    if not counts or counts[0] < 1:
        print("loadtest.capacity: --sessions wants counts of 1 or more", file=sys.stderr)
        return 2
    sizes = acc.Sizes(
        sessions=counts[-1], session_s=args.session_s, espeak_items=0, probe_s=0,
        snr_db=(), snr_items=0, fluent=0,
    )  # fmt: skip
    entries = await asyncio.to_thread(acc.build_entries, ["real"], sizes, args.cache_dir)
    token = args.token or os.environ.get("ESCAPEMENT_TOKEN") or None
    spawned = None if args.url else SpawnedUp(workers=args.workers, model=args.model, env=UNCAPPED)
    workers, _ = worker_layout(UpSettings(workers=args.workers))
    rows: list[dict[str, Any]] = []
    try:
        url = await ready_target(args.url, spawned, "loadtest.capacity")
        if url is None:
            return 3
        async with http_session() as http:
            for n in counts:
                print(f"{n} session(s) ...", file=sys.stderr, flush=True)
                step = await run_step(http, url, entries[:n], token)
                rows.append(step.row(workers))
                print(format_table(rows[-1:], args.target_ms, None).splitlines()[2], flush=True)
                await asyncio.sleep(2.0)  # let the queue drain between steps
    except SpawnError as exc:
        print(f"loadtest.capacity: {exc}", file=sys.stderr)
        return 3
    finally:
        if spawned is not None:
            await asyncio.to_thread(spawned.stop)
    cap = args.capacity or capacity(rows, args.target_ms)
    overload = await _overload_phase(args, entries, cap, token) if args.overload and cap else []
    ceil = None
    if args.ceiling_windows > 0 and spawned is not None:
        print("ceiling: decoding back to back in this process ...", file=sys.stderr, flush=True)
        ceil = await asyncio.to_thread(ceiling, args.model, args.ceiling_windows, args.cache_dir)
    print()
    print(
        f"Capacity: {args.model}, escapement up with {workers} worker(s) on {usable_cores()} "
        f"core(s), {args.session_s:.0f} s sessions of recorded speech in real time"
    )
    print(format_table(rows, args.target_ms, ceil))
    if overload:
        print(f"\nOverload: k x {cap} devices at once, admission as configured")
        print(format_overload(overload, args.target_ms))
    if args.json_out:
        report = {
            "model": args.model,
            "workers": workers,
            "cores": usable_cores(),
            "target_ms": args.target_ms,
            "rows": rows,
            "capacity": capacity(rows, args.target_ms),
            "ceiling": ceil,
            "overload": overload,
        }
        await asyncio.to_thread(Path(args.json_out).write_text, json.dumps(report, indent=1))
    broken = any(o["timed_out"] or o["failed"] for o in overload)
    return 0 if all(r["completed"] == r["sessions"] for r in rows) and not broken else 1


async def _overload_phase(
    args: argparse.Namespace, entries: list[acc.Entry], cap: int, token: str | None
) -> list[dict[str, Any]]:
    factors = sorted({int(s) for s in args.overload.split(",") if s.strip()})
    spawned = None if args.url else SpawnedUp(workers=args.workers, model=args.model)
    out: list[dict[str, Any]] = []
    try:
        url = await ready_target(args.url, spawned, "loadtest.capacity")
        if url is None:
            return out
        async with http_session() as http:
            for k in factors:
                print(f"overload {k}x: {k * cap} devices ...", file=sys.stderr, flush=True)
                out.append((await run_overload(http, url, entries, k, cap, token)).row())
                print(format_overload(out[-1:], args.target_ms).splitlines()[2], flush=True)
                await asyncio.sleep(2.0)
    finally:
        if spawned is not None:
            await asyncio.to_thread(spawned.stop)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--sessions", default="1,2,4,6,8,10,12", help="session counts, in turn")
    p.add_argument(
        "--workers", type=workers_option, default="auto", help="workers of the spawned up (auto)"
    )
    p.add_argument("--model", default="tiny.en")
    p.add_argument("--url", help="a running edge instead (its cap applies; no ceiling run)")
    p.add_argument("--token", help="API key or token (env ESCAPEMENT_TOKEN)")
    p.add_argument("--target-ms", type=float, default=1500.0, help="the p95 target (1500)")
    p.add_argument("--session-s", type=float, default=60.0, help="seconds per session (60)")
    p.add_argument(
        "--ceiling-windows", type=int, default=32, help="utterances for the ceiling (0: skip it)"
    )
    p.add_argument("--overload", default="", help="factors of the capacity to overload with: 2,5")
    p.add_argument(
        "--capacity", type=int, default=0, help="the capacity to overload (default: the sweep's)"
    )
    p.add_argument("--cache-dir", type=Path, default=None, help="speech cache (realspeech)")
    p.add_argument("--json", dest="json_out", help="also write the report as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
