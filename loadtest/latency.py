"""Where the time goes between the end of an utterance and its Final.

    python -m loadtest.latency [--sessions 1 10] [--url URL | --spawn [--workers N]]

For each session count, that many devices stream the built-in corpus in real
time (one session each) and every Final is split into:

- endpoint wait: the VAD's trailing silence before it cuts (SpeechEnded
  receive time minus the time the audio up to the last voiced frame was sent);
- inference: `Final.inference_ms`, as the worker measured it;
- pipeline overhead: the rest (queueing, NATS, the edge, the socket).

The end of speech comes from the corpus' reference spans; see `loadtest.device`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from loadtest import corpus as corpus_mod
from loadtest.device import COMPLETED, SessionOptions
from loadtest.metrics import Histograms
from loadtest.runner import ready_target, run_command
from loadtest.target import SpawnedUp, SpawnError
from loadtest.workload import Plan, run_devices
from services.cli import workers_option

PARTS = {
    "final": "speech end -> Final",
    "endpoint_wait": "  endpoint wait (VAD trailing silence)",
    "inference": "  inference (Final.inference_ms)",
    "overhead": "  pipeline overhead (the rest)",
}


async def measure(
    url: str, sessions: int, spec: corpus_mod.CorpusSpec, ramp_s: float, token: str | None
) -> dict[str, Any]:
    opts = SessionOptions(url=url, token=token)
    plan = Plan(
        session=opts, corpus=spec, devices=sessions, ramp_s=ramp_s, once=True, drain_s=180.0
    )
    result = await run_devices(plan, list(range(sessions)), time.monotonic(), lambda *_: None)
    hist = Histograms()
    for rec in result.records:
        for f in rec.finals:
            if f.latency_ms is None or f.endpoint_ms is None or f.overhead_ms is None:
                continue
            hist["final"].record(f.latency_ms)
            hist["endpoint_wait"].record(f.endpoint_ms)
            hist["inference"].record(f.inference_ms)
            hist["overhead"].record(f.overhead_ms)
    outcomes = [r.outcome for r in result.records]
    return {
        "sessions": sessions,
        "completed": outcomes.count(COMPLETED),
        "not_completed": {o: outcomes.count(o) for o in set(outcomes) if o != COMPLETED},
        "lost_finals": sum(len(r.lost_segments) for r in result.records),
        "latency_ms": hist.summaries(PARTS),
    }


def _row(label: str, h: dict[str, Any]) -> str:
    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:,.0f}"

    return f"{label:<40}{f(h['p50']):>8}{f(h['p95']):>8}{f(h['max']):>8}{f(h['mean']):>8}"


def print_table(results: list[dict[str, Any]], header: str) -> None:
    print(header)
    print(f"{'ms':<40}{'p50':>8}{'p95':>8}{'max':>8}{'mean':>8}")
    for r in results:
        n = r["latency_ms"]["final"]["count"]
        extra = "" if not r["not_completed"] else f", not completed: {r['not_completed']}"
        lost = f", {r['lost_finals']} LOST" if r["lost_finals"] else ""
        plural = "s" if r["sessions"] != 1 else ""
        print(f"{r['sessions']} concurrent real-time session{plural} ({n} finals{lost}{extra})")
        for key, label in PARTS.items():
            print(_row(label, r["latency_ms"][key]))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.latency", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--sessions", type=int, nargs="+", default=[1, 10], help="session counts (default 1 10)"
    )
    p.add_argument(
        "--url", default="http://127.0.0.1:8080", help="the edge (default http://127.0.0.1:8080)"
    )
    p.add_argument("--token", help="API key or token (env ESCAPEMENT_TOKEN)")
    p.add_argument(
        "--spawn",
        action="store_true",
        help="start an embedded pipeline (escapement up) for the run",
    )
    p.add_argument(
        "--workers",
        type=workers_option,
        default="auto",
        help="workers of the spawned pipeline (default auto: one per core)",
    )
    p.add_argument("--model", help="model of the spawned pipeline")
    p.add_argument("--sentences", type=int, default=4, help="sentences per session (default 4)")
    p.add_argument(
        "--ramp",
        type=float,
        default=3.0,
        help="start the devices over this many seconds, about one utterance, so that their "
        "speech ends do not all coincide (default 3)",
    )
    p.add_argument("--corpus-cache", help="where the built-in corpus is cached")
    p.add_argument("--out", help="also write the numbers as JSON here")
    return p.parse_args(argv)


async def run(args: argparse.Namespace) -> int:
    spec = corpus_mod.CorpusSpec(sentences=args.sentences, cache_dir=args.corpus_cache)
    try:
        await asyncio.to_thread(corpus_mod.build, spec)
    except corpus_mod.CorpusError as exc:
        print(f"loadtest.latency: {exc}", file=sys.stderr)
        return 2
    token = args.token or os.environ.get("ESCAPEMENT_TOKEN") or None
    spawned = SpawnedUp(workers=args.workers, model=args.model) if args.spawn else None
    try:
        url = await ready_target(args.url, spawned, "loadtest.latency")
        if url is None:
            return 3
        results = []
        for n in args.sessions:
            print(f"measuring {n} session(s) ...", file=sys.stderr)
            results.append(await measure(url, n, spec, args.ramp if n > 1 else 0.0, token))
    except SpawnError as exc:
        print(f"loadtest.latency: {exc}", file=sys.stderr)
        return 3
    finally:
        if spawned is not None:
            await asyncio.to_thread(spawned.stop)
    where = f"spawned {spawned.layout}" if spawned else url
    header = (
        f"End of utterance (last voiced frame) -> Final; {where}; {os.cpu_count()} cores; "
        f"{args.sentences} sentences per session; devices started over {args.ramp:g} s"
    )
    print_table(results, header)
    if args.out:
        text = json.dumps({"header": header, "results": results}, indent=1) + "\n"
        await asyncio.to_thread(Path(args.out).write_text, text)
    return 0 if all(r["lost_finals"] == 0 for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    return run_command(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
