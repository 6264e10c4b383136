"""Runs a scenario end to end: target, monitors, load, report.

`execute` finds (or spawns) the system under test, waits for `/readyz`, reads
`/v1/stats`, starts the samplers when the load begins, runs the scenario's
body, and turns what it saw into the report, the summary and the plot.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import resource
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import psutil

from loadtest import corpus as corpus_mod
from loadtest import report as report_mod
from loadtest.chaos import Chaos
from loadtest.device import SessionOptions, SessionRecord
from loadtest.herd import run_herd
from loadtest.metrics import Histograms, percentile
from loadtest.monitor import QueueSampler, ResourceSampler, Targets, settled_stats
from loadtest.progress import Live
from loadtest.slowloris import Attack
from loadtest.target import SpawnedUp, SpawnError
from loadtest.workload import Plan, http_session, run_devices, run_sharded

log = logging.getLogger(__name__)


class UsageError(Exception):
    """A scenario cannot run with these arguments (exit 2)."""


@dataclass
class Outcome:
    records: list[SessionRecord]
    histograms: Histograms
    final_points: list[tuple[float, float]] = field(default_factory=list)
    sections: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    extra_admitted: int = 0
    extra_checks: dict[str, tuple[bool, Any, bool]] = field(default_factory=dict)
    strict: bool = False  # abandoned finals fail the run
    post: Callable[[Context], dict[str, Any]] | None = (
        None  # sections computed after the monitors stop
    )


@dataclass
class Context:
    args: argparse.Namespace
    url: str
    token: str | None
    targets: Targets
    nats_url: str
    live: Live
    spawned: SpawnedUp | None = None
    clock0: float = 0.0
    resources: ResourceSampler | None = None
    queue: QueueSampler | None = None
    longest_s: float = 30.0  # the longest corpus item
    cleanup: list[Callable[[], None]] = field(
        default_factory=list
    )  # after the spawned `up` has stopped
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def begin(self, clock0: float, generator_pids: list[int]) -> None:
        """The load starts now: start the clocks of everything that samples over time."""
        self.clock0 = clock0
        for pid in generator_pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                self.targets.generator.append(psutil.Process(pid))
        self.resources = ResourceSampler(self.targets, clock0, every=self.args.sample_every)
        self._tasks.append(asyncio.create_task(self.resources.run()))
        if self.nats_url:
            self.queue = QueueSampler(self.nats_url, clock0, every=self.args.sample_every)
            self._tasks.append(asyncio.create_task(self.queue.run()))
        self._tasks.append(asyncio.create_task(self.live.run(clock0, generator_pids)))

    async def stop_monitors(self) -> None:
        if self.resources is not None:
            self.resources.samples.append(self.resources.sample())  # the end, however short the run
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def session_options(self) -> SessionOptions:
        a = self.args
        return SessionOptions(
            url=self.url, token=self.token, language=a.language, chunk_ms=a.chunk_ms,
            session_timeout_s=a.session_timeout, trailing_pad_ms=a.trailing_pad_ms,
        )  # fmt: skip

    def corpus_spec(self) -> corpus_mod.CorpusSpec:
        a = self.args
        return corpus_mod.CorpusSpec(
            audio_dir=a.audio, sentences=a.sentences, cache_dir=a.corpus_cache
        )


Body = Callable[[Context], Awaitable[Outcome]]


# --- scenario bodies --------------------------------------------------------------


def _plan(ctx: Context, devices: int, duration_s: float, once: bool = False) -> Plan:
    a = ctx.args
    return Plan(
        session=ctx.session_options(),
        corpus=ctx.corpus_spec(),
        devices=devices,
        ramp_s=getattr(a, "ramp", 0.0),
        duration_s=duration_s,
        once=once,
        drain_s=ctx.longest_s * 1.5 + a.session_timeout + 10,
    )


def _from_shards(result: Any) -> Outcome:
    hist = Histograms()
    hist.merge_encoded(result.histograms)
    out = Outcome(result.records, hist, result.final_points)
    if result.error:
        out.warnings.append(result.error)
    return out


async def concurrency(ctx: Context) -> Outcome:
    a = ctx.args
    result, _ = await run_sharded(
        _plan(ctx, a.sessions, a.duration, a.once), a.procs, ctx.live, ctx.begin
    )
    return _from_shards(result)


async def soak(ctx: Context) -> Outcome:
    a = ctx.args
    result, _ = await run_sharded(_plan(ctx, a.sessions, a.duration), a.procs, ctx.live, ctx.begin)
    out = _from_shards(result)

    def drift(c: Context) -> dict[str, Any]:
        points = out.final_points
        span = (points[-1][0] - points[0][0]) if points else 0.0
        first = [v for t, v in points if t < points[0][0] + span / 3]
        last = [v for t, v in points if t >= points[0][0] + 2 * span / 3]
        p_first, p_last = percentile(first, 95), percentile(last, 95)
        res = c.resources.summary(warmup_s=min(60.0, a.duration * 0.1)) if c.resources else {}
        return {
            "soak": {
                "duration_s": a.duration,
                "latency_p95_first_third_ms": p_first,
                "latency_p95_last_third_ms": p_last,
                "latency_p95_drift_ms": None
                if p_first is None or p_last is None
                else round(p_last - p_first, 1),
                "rss_mb_per_hour": {
                    role: v["rss_mb_per_hour"] for role, v in res.items() if role != "generator"
                },
                "rss_mb_growth": {
                    role: round(v["rss_mb_end"] - v["rss_mb_start"], 1) for role, v in res.items()
                },
            }
        }

    out.post = drift
    return out


async def chaos(ctx: Context) -> Outcome:
    a = ctx.args
    if not a.kill_workers_every and not a.restart_nats_every:
        raise UsageError("chaos needs --kill-workers-every and/or --restart-nats-every")
    if a.kill_workers_every and not ctx.targets.workers():
        raise UsageError("no worker PIDs known: give --spawn-up, --up-pid or --worker-pids")
    if a.restart_nats_every and not ctx.targets.nats():
        raise UsageError("no nats-server PID known: give --spawn-up, --up-pid or --nats-pid")
    monkey = Chaos(
        ctx.targets, 0.0, kill_every_s=a.kill_workers_every, restart_nats_every_s=a.restart_nats_every,
        max_kills=a.max_kills, max_nats_restarts=a.max_nats_restarts, sig=signal.Signals[f"SIG{a.signal}"],
        nats_down_s=a.nats_down, nats_url=ctx.nats_url,
    )  # fmt: skip
    tasks: list[asyncio.Task[None]] = []

    def begin(clock0: float, pids: list[int]) -> None:
        ctx.begin(clock0, pids)
        monkey.clock0 = clock0
        tasks.append(asyncio.create_task(monkey.run()))

    try:
        result, _ = await run_sharded(_plan(ctx, a.sessions, a.duration), a.procs, ctx.live, begin)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if ctx.spawned is not None:
            ctx.cleanup.append(monkey.stop_started_nats)
    out = _from_shards(result)
    out.strict = True
    summary = monkey.summary()
    out.sections["chaos"] = summary
    acted = summary["workers_killed"] + summary["nats_restarts"]
    out.extra_checks["chaos_acted"] = (acted > 0, acted, False)
    if ctx.spawned is None and summary["nats_started"]:
        out.warnings.append(
            f"nats-server restarted by this run keeps running: pid(s) {summary['nats_started']}"
        )
    return out


async def herd(ctx: Context) -> Outcome:
    a = ctx.args
    clock0 = time.monotonic()
    ctx.begin(clock0, [])
    records, hist, section = await run_herd(
        ctx.url, ctx.token, a.connections, a.within, a.session_timeout, clock0, ctx.live
    )
    return Outcome(records, hist, sections={"herd": section})


async def slowloris(ctx: Context) -> Outcome:
    a = ctx.args
    attack = Attack(ctx.url, ctx.token, a.connections, a.idle_fraction, a.drip_every)
    clock0 = time.monotonic()
    ctx.begin(clock0, [])
    async with http_session() as http:
        await attack.start(http)
        await asyncio.sleep(a.settle)  # let the attack take hold before probing
        try:
            probe = await run_devices(_plan(ctx, 1, a.duration), [0], time.monotonic(), ctx.live)
        finally:
            await attack.stop()
    out = _from_shards(probe)
    section = attack.summary(a.duration)
    out.sections["slowloris"] = section
    out.extra_admitted = section["idle"]["admitted"]
    completed = sum(1 for r in probe.records if r.outcome == "completed")
    out.extra_checks["probe_completed"] = (completed > 0, completed, True)
    return out


SCENARIOS: dict[str, Body] = {
    "concurrency": concurrency,
    "herd": herd,
    "slowloris": slowloris,
    "chaos": chaos,
    "soak": soak,
}


# --- the run ------------------------------------------------------------------------


def _raise_fd_limit(need: int) -> str | None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = (
        min(hard, max(soft, need + 256))
        if hard != resource.RLIM_INFINITY
        else max(soft, need + 256)
    )
    if want > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
    if soft < need + 64:
        return f"only {soft} file descriptors allowed; {need} connections may fail here (ulimit -n)"
    return None


def run_command(
    run: Callable[[argparse.Namespace], Awaitable[int]], args: argparse.Namespace
) -> int:
    """A benchmark's `main`: run it to its exit code; Ctrl-C exits 130."""
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130


async def ready_target(url: str | None, spawned: SpawnedUp | None, tool: str) -> str | None:
    """The edge to load, once `/readyz` says so: `url`, or that of `spawned` (started
    here). None, with the reason on stderr, when it is not ready within 30 s."""
    if spawned is not None:
        print(f"starting {spawned.layout} ...", file=sys.stderr)
        await asyncio.to_thread(spawned.start)
        url = spawned.url
    assert url is not None
    async with http_session() as http:
        why = await wait_ready(http, url, 30.0)
    if why is not None:
        print(f"{tool}: {url} is not ready: {why}", file=sys.stderr)
        return None
    return url


async def wait_ready(http: aiohttp.ClientSession, url: str, limit_s: float) -> str | None:
    """None once `/readyz` says ready; else why not."""
    deadline = time.monotonic() + limit_s
    why = "no answer"
    while True:
        try:
            async with http.get(
                f"{url.rstrip('/')}/readyz", timeout=aiohttp.ClientTimeout(total=3)
            ) as r:
                if r.status == 200:
                    return None
                why = f"HTTP {r.status}: {(await r.text())[:200]}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            why = f"{type(exc).__name__}: {exc}"
        if time.monotonic() >= deadline:
            return why
        await asyncio.sleep(0.5)


def _params(args: argparse.Namespace) -> dict[str, Any]:
    skip = {"func", "token", "progress", "quiet"}
    return {k: v for k, v in vars(args).items() if k not in skip and not callable(v)}


async def execute(args: argparse.Namespace, body: Body) -> int:
    token = args.token or os.environ.get("ESCAPEMENT_TOKEN") or None
    spawned: SpawnedUp | None = None
    warnings: list[str] = []
    need = max(getattr(args, "sessions", 0), getattr(args, "connections", 0))
    if (fd_warning := _raise_fd_limit(need * 2)) is not None:
        warnings.append(fd_warning)
    try:
        spec = corpus_mod.CorpusSpec(
            audio_dir=args.audio, sentences=args.sentences, cache_dir=args.corpus_cache
        )
        longest_s = (await asyncio.to_thread(corpus_mod.build, spec)).longest_s
    except corpus_mod.CorpusError as exc:
        print(f"escapement loadtest: {exc}", file=sys.stderr)
        return 2
    if args.spawn_up:
        spawned = SpawnedUp(workers=args.up_workers, model=args.up_model)
        if not args.quiet:
            print(f"starting escapement up ({args.up_workers} worker(s)) ...", file=sys.stderr)
        try:
            await asyncio.to_thread(spawned.start)
        except SpawnError as exc:
            print(f"escapement loadtest: {exc}", file=sys.stderr)
            return 3
        url, nats_url = spawned.url, args.nats_url or spawned.nats_url
        targets = Targets(up=psutil.Process(spawned.pid))
    else:
        url, nats_url = args.url, args.nats_url or ""
        try:
            targets = Targets.from_pids(args.up_pid, args.edge_pid, args.worker_pids, args.nats_pid)
        except psutil.Error as exc:
            print(f"escapement loadtest: {exc}", file=sys.stderr)
            return 2
    live = Live(enabled=(args.progress or sys.stderr.isatty()) and not args.quiet)
    ctx = Context(
        args=args,
        url=url,
        token=token,
        targets=targets,
        nats_url=nats_url,
        live=live,
        spawned=spawned,
        longest_s=longest_s,
    )
    try:
        async with http_session() as http:
            why = await wait_ready(http, url, args.wait_ready)
            if why is not None:
                print(f"escapement loadtest: {url} is not ready: {why}", file=sys.stderr)
                return 3
            before = await settled_stats(http, url, token, wait_s=2.0)
            if before is None:
                warnings.append(
                    f"no /v1/stats from {url}: the report cannot be checked against the edge"
                )
            started_at = datetime.now(UTC).isoformat(timespec="seconds")
            try:
                outcome = await body(ctx)
            except UsageError as exc:
                print(f"escapement loadtest: {exc}", file=sys.stderr)
                return 2
            finally:
                await ctx.stop_monitors()
            wall_s = time.monotonic() - ctx.clock0
            after = await settled_stats(http, url, token) if before is not None else None
            sections = dict(outcome.sections)
            if outcome.post is not None:
                sections.update(outcome.post(ctx))
            if ctx.queue is not None and ctx.queue.error:
                warnings.append(f"no queue depth: {ctx.queue.error}")
            if not targets.known:
                warnings.append(
                    "no server PIDs known (--spawn-up, --up-pid, --edge-pid ...): no server CPU/RSS"
                )
            observed = report_mod.Observed(
                scenario=args.scenario, url=url, params=_params(args), started_at=started_at, wall_s=wall_s,
                records=outcome.records, histograms=outcome.histograms, final_points=outcome.final_points,
                resources=ctx.resources, queue=ctx.queue, stats_before=before, stats_after=after,
                sections=sections, warnings=warnings + outcome.warnings, window_s=args.window,
                procs=getattr(args, "procs", 1), corpus=ctx.corpus_spec().describe(),
                extra_admitted=outcome.extra_admitted,
                strict=outcome.strict, extra_checks=outcome.extra_checks,
            )  # fmt: skip
            report = report_mod.build(observed)
    finally:
        if spawned is not None:
            await asyncio.to_thread(spawned.stop)
        for fn in ctx.cleanup:
            fn()
    if args.out:
        report_mod.write(report, args.out)
    if args.plot:
        from loadtest.plot import plot_report

        plot_report(report, args.plot)
    if not args.quiet:
        report_mod.print_summary(report, sys.stdout)
        if args.out:
            print(f"report: {args.out}", file=sys.stdout)
    return 0 if report["ok"] else 1
