"""What tracing and metrics cost: the same real-time load with telemetry off and on, in one run.

    python -m loadtest.telemetry_cost [--sessions 4] [--sentences 4] [--rounds 1]

Each round spawns `escapement up` (one worker) twice, once per mode, and
streams the same corpus from `--sessions` concurrent real-time devices:

- off: `OTEL_SDK_DISABLED=true`: the API's no-op tracer and meter, no /metrics
  instruments, nothing exported;
- on: traces and metrics exported over OTLP/HTTP (to a receiver in this
  process, which accepts and counts them; metric interval 5 s, traces in the
  SDK's batches), and Prometheus metrics served by the edge and the worker and
  scraped every second (harsher than compose's 15 s).

Reported per mode: speech end -> Final latency (p50, p95, mean) as
`loadtest.latency` measures it, and the CPU seconds the edge (the `up`
process) and the worker used while the devices streamed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from aiohttp import web

from loadtest import corpus as corpus_mod
from loadtest.latency import measure
from loadtest.runner import run_command, wait_ready
from loadtest.target import SpawnedUp, SpawnError
from loadtest.workload import http_session
from services.runtime.procs import free_port

MODES = ("off", "on")


@dataclass
class Receiver:
    """Stands in for the OTel collector: accepts OTLP/HTTP, counts what arrives."""

    requests: dict[str, int] = field(default_factory=dict)
    bytes: int = 0
    port: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests[request.path] = self.requests.get(request.path, 0) + 1
        self.bytes += len(body)
        return web.Response(body=b"", content_type="application/x-protobuf")

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[Receiver]:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/traces", self.handle)
        app.router.add_post("/v1/metrics", self.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(runner.addresses[0][1])
        try:
            yield self
        finally:
            await runner.cleanup()


def mode_env(mode: str, receiver: Receiver, metrics_port: int) -> dict[str, str]:
    clean = {k: "" for k in os.environ if k.startswith("OTEL_")}
    if mode == "off":
        return {**clean, "OTEL_SDK_DISABLED": "true"}
    return {
        **clean,
        "OTEL_SDK_DISABLED": "false",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}",
        "OTEL_METRICS_EXPORTER": "otlp,prometheus",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_METRIC_EXPORT_INTERVAL": "5000",
        "ESCAPEMENT_METRICS_PORT": str(metrics_port),
    }


def _cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def processes(up: SpawnedUp) -> dict[str, psutil.Process]:
    edge = psutil.Process(up.pid)
    out = {"edge": edge}
    for child in edge.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "services.worker" in " ".join(child.cmdline()):
                out["worker"] = child
    return out


async def scrape_every(
    http: aiohttp.ClientSession, urls: list[str], every_s: float, stop: asyncio.Event
) -> int:
    """Like a Prometheus with `every_s` scrape interval, until `stop`; returns how many
    scrapes answered."""
    done = 0
    while not stop.is_set():
        for url in urls:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                    await r.read()
                    done += r.status == 200
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=every_s)
    return done


async def one_mode(
    mode: str, args: argparse.Namespace, spec: corpus_mod.CorpusSpec, receiver: Receiver
) -> dict[str, Any]:
    metrics_port = free_port()
    up = SpawnedUp(workers=1, model=args.model, env=mode_env(mode, receiver, metrics_port))
    await asyncio.to_thread(up.start)
    try:
        async with http_session() as http:
            why = await wait_ready(http, up.url, 30.0)
            if why is not None:
                raise SpawnError(f"{up.url} is not ready: {why}")
            procs = processes(up)
            scraper, stop = None, asyncio.Event()
            if mode == "on":
                urls = [f"{up.url}/metrics", f"http://127.0.0.1:{metrics_port}/metrics"]
                scraper = asyncio.create_task(scrape_every(http, urls, 1.0, stop))
            before = {name: _cpu_s(p) for name, p in procs.items()}
            received_before = dict(receiver.requests), receiver.bytes
            t0 = time.monotonic()
            result = await measure(up.url, args.sessions, spec, args.ramp, None)
            wall = time.monotonic() - t0
            cpu = {name: _cpu_s(p) - before[name] for name, p in procs.items()}
            scrapes = 0
            if scraper is not None:
                stop.set()
                scrapes = await scraper
    finally:
        await asyncio.to_thread(up.stop)
    final = result["latency_ms"]["final"]
    return {
        "mode": mode,
        "finals": final["count"],
        "completed": result["completed"],
        "lost_finals": result["lost_finals"],
        "latency_ms": {k: final[k] for k in ("p50", "p95", "mean", "max")},
        "wall_s": round(wall, 1),
        "cpu_s": {k: round(v, 2) for k, v in cpu.items()},
        "scrapes": scrapes,
        "otlp_requests": {
            k: v - received_before[0].get(k, 0) for k, v in receiver.requests.items()
        },
        "otlp_bytes": receiver.bytes - received_before[1],
    }


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def print_table(results: list[dict[str, Any]], header: str) -> None:
    print(header)
    cols = ("mode", "finals", "p50 ms", "p95 ms", "mean ms", "edge cpu s", "worker cpu s", "wall s")
    print("".join(f"{c:>13}" for c in cols))
    for r in results:
        lat = r["latency_ms"]
        row = [r["mode"], r["finals"], _fmt(lat["p50"]), _fmt(lat["p95"]), _fmt(lat["mean"])]
        row += [f"{r['cpu_s'].get('edge', 0):.2f}", f"{r['cpu_s'].get('worker', 0):.2f}"]
        row += [f"{r['wall_s']:.1f}"]
        print("".join(f"{str(c):>13}" for c in row))
    by_mode: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_mode.setdefault(r["mode"], []).append(r)
    if set(by_mode) == set(MODES):

        def mean(mode: str, pick) -> float:  # type: ignore[no-untyped-def]
            values = [pick(r) for r in by_mode[mode]]
            return sum(values) / len(values)

        for label, pick in (
            ("latency p50", lambda r: r["latency_ms"]["p50"] or 0),
            ("latency mean", lambda r: r["latency_ms"]["mean"] or 0),
            ("edge CPU", lambda r: r["cpu_s"].get("edge", 0)),
            ("worker CPU", lambda r: r["cpu_s"].get("worker", 0)),
        ):
            off, on = mean("off", pick), mean("on", pick)
            change = f"{(on - off) / off * 100:+.1f}%" if off else "-"
            print(f"  on vs off, {label:<13} {off:>10,.2f} -> {on:>10,.2f}  ({change})")
        on_runs = by_mode["on"]
        print(
            f"  on: {sum(r['scrapes'] for r in on_runs)} /metrics scrapes, OTLP "
            f"{json.dumps({k: sum(r['otlp_requests'].get(k, 0) for r in on_runs) for k in ('/v1/traces', '/v1/metrics')})} "
            f"requests, {sum(r['otlp_bytes'] for r in on_runs) / 1024:.0f} KiB"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.telemetry_cost", description=__doc__.split("\n")[0]
    )
    p.add_argument("--sessions", type=int, default=4, help="concurrent devices (default 4)")
    p.add_argument("--sentences", type=int, default=4, help="sentences per session (default 4)")
    p.add_argument("--rounds", type=int, default=1, help="off/on pairs, alternating (default 1)")
    p.add_argument("--ramp", type=float, default=3.0, help="start devices over N s (default 3)")
    p.add_argument("--model", help="the worker's model (default tiny.en)")
    p.add_argument("--corpus-cache", help="where the built-in corpus is cached")
    p.add_argument("--out", help="also write the numbers as JSON here")
    return p.parse_args(argv)


async def run(args: argparse.Namespace) -> int:
    spec = corpus_mod.CorpusSpec(sentences=args.sentences, cache_dir=args.corpus_cache)
    try:
        await asyncio.to_thread(corpus_mod.build, spec)
    except corpus_mod.CorpusError as exc:
        print(f"loadtest.telemetry_cost: {exc}", file=sys.stderr)
        return 2
    results = []
    async with Receiver().serving() as receiver:
        try:
            for i in range(args.rounds):
                for mode in MODES if i % 2 == 0 else tuple(reversed(MODES)):
                    print(f"round {i + 1}: telemetry {mode} ...", file=sys.stderr)
                    results.append(await one_mode(mode, args, spec, receiver))
        except SpawnError as exc:
            print(f"loadtest.telemetry_cost: {exc}", file=sys.stderr)
            return 3
    header = (
        f"Telemetry off vs on: {args.sessions} concurrent real-time sessions of "
        f"{args.sentences} sentences, 1 worker, {os.cpu_count()} cores, {args.rounds} round(s)"
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
