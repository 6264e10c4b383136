"""Drive N devices: ramp them up, keep them talking for a duration, collect what they saw.

A device opens a session, streams one corpus item in real time, sends
CloseStream, checks its own finals, and starts its next session until the
duration is over (it always finishes the session it is in). `--procs K`
spreads the devices over K processes; each sends progress messages to the
parent and, at the end, its session records and its HDR histograms encoded,
which the parent merges.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from loadtest import corpus as corpus_mod
from loadtest.device import (
    COMPLETED,
    REFUSED,
    FinalTiming,
    SessionOptions,
    SessionRecord,
    retry_delay_s,
    run_session,
)
from loadtest.metrics import Histograms

# Progress messages, (kind, *payload): ("begin",), ("admitted",),
# ("final", t, latency_ms), ("end", outcome, reason).
Sink = Callable[..., None]


@dataclass(frozen=True)
class Plan:
    """Everything a generator process needs; picklable."""

    session: SessionOptions
    corpus: corpus_mod.CorpusSpec
    devices: int = 1
    ramp_s: float = 0.0
    duration_s: float = 0.0  # devices start no new session after this
    drain_s: float = 120.0  # after the duration, how long unfinished sessions get
    once: bool = False  # each device runs exactly one session


@dataclass
class ShardResult:
    records: list[SessionRecord] = field(default_factory=list)
    histograms: dict[str, dict[str, object]] = field(default_factory=dict)  # encoded
    final_points: list[tuple[float, float]] = field(default_factory=list)  # (t, latency ms)
    error: str = ""


def http_session() -> aiohttp.ClientSession:
    """No connection limit: every device holds its own socket."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))


def record_histograms(hist: Histograms, rec: SessionRecord) -> None:
    if rec.session_started_ms is not None:
        hist["session_started"].record(rec.session_started_ms)
    hist["speech_started"].record_all(rec.speech_started_ms)
    hist["send_lag"].record_all(rec.send_lags_ms)
    for f in rec.finals:
        if f.latency_ms is not None:
            hist["final"].record(f.latency_ms)
        if f.endpoint_ms is not None:
            hist["endpoint_wait"].record(f.endpoint_ms)
        if f.overhead_ms is not None:
            hist["overhead"].record(f.overhead_ms)
        hist["inference"].record(f.inference_ms)


async def watch_loop_lag(hist: Histograms, every: float = 0.1) -> None:
    """How late the event loop wakes up: a busy generator measures itself, not the server."""
    while True:
        before = time.monotonic()
        await asyncio.sleep(every)
        hist["loop_lag"].record((time.monotonic() - before - every) * 1000)


async def run_devices(plan: Plan, device_ids: list[int], clock0: float, sink: Sink) -> ShardResult:
    """This process's share of the devices."""
    corpus = await asyncio.to_thread(corpus_mod.build, plan.corpus)
    result = ShardResult()
    hist = Histograms()
    end = clock0 + plan.duration_s

    async def device(d: int, http: aiohttp.ClientSession) -> None:
        delay = clock0 + (d * plan.ramp_s / plan.devices if plan.devices else 0) - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        seq = 0
        while True:
            item = corpus.item_for(d, seq)
            rec = SessionRecord(device=d, seq=seq, item=item.name)
            result.records.append(rec)
            sink("begin")

            def on_final(f: FinalTiming) -> None:
                if f.latency_ms is not None:
                    sink("final", f.t, f.latency_ms)

            try:
                await run_session(
                    http, rec, item, plan.session, clock0, on_final, lambda: sink("admitted")
                )
            finally:
                record_histograms(hist, rec)
                result.final_points.extend(
                    (f.t, f.latency_ms) for f in rec.finals if f.latency_ms is not None
                )
                sink("end", rec.outcome, rec.reason)
            seq += 1
            if plan.once or time.monotonic() >= end:
                return
            if rec.outcome == REFUSED:
                await asyncio.sleep(retry_delay_s(rec.retry_after))
            elif rec.outcome != COMPLETED:
                await asyncio.sleep(1.0)  # failed, timed out, could not connect: do not spin

    lag = asyncio.create_task(watch_loop_lag(hist))
    try:
        async with http_session() as http:
            tasks = [asyncio.create_task(device(d, http)) for d in device_ids]
            deadline = max(end, clock0 + plan.ramp_s) + plan.drain_s
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()))
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for task in tasks:
                exc = task.exception() if not task.cancelled() else None
                if exc is not None:
                    result.error = f"device task failed: {exc!r}"
    finally:
        lag.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await lag
    result.histograms = hist.encode()
    return result


# --- several processes -----------------------------------------------------------


def _child(
    plan: Plan, device_ids: list[int], ready: Any, go: Any, start: Any, out: Any, index: int
) -> None:
    """A generator process: build the corpus, say ready, wait for the common start, run, report."""

    def sink(*message: object) -> None:
        out.put(("progress", index, message))

    try:
        corpus_mod.build(plan.corpus)  # warm (cached on disk) before the clock starts
        ready.put(index)
        go.wait()
        result = asyncio.run(run_devices(plan, device_ids, start.value, sink))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which decides
        result = ShardResult(error=f"generator process {index} failed: {exc!r}")
    out.put(("done", index, result))


async def run_sharded(
    plan: Plan, procs: int, sink: Sink, on_start: Callable[[float, list[int]], None] | None = None
) -> tuple[ShardResult, float]:
    """Run the plan in `procs` processes (1: in this one). Returns the merged result and clock0."""
    devices = list(range(plan.devices))
    if procs <= 1:
        clock0 = time.monotonic()
        if on_start is not None:
            on_start(clock0, [])
        return await run_devices(plan, devices, clock0, sink), clock0

    ctx = multiprocessing.get_context("spawn")
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    start = ctx.Value("d", 0.0)
    shards = [devices[k::procs] for k in range(procs)]
    children = [
        ctx.Process(
            target=_child,
            args=(plan, ids, ready, go, start, out, k),
            name=f"loadtest-{k}",
            daemon=True,
        )
        for k, ids in enumerate(shards)
    ]
    for child in children:
        child.start()
    loop = asyncio.get_running_loop()
    try:
        for _ in children:
            await loop.run_in_executor(None, ready.get, True, 120)
    except queue.Empty:
        for child in children:
            child.terminate()
        raise RuntimeError("generator processes did not start within 120 s") from None
    clock0 = time.monotonic() + 0.2
    start.value = clock0
    go.set()
    if on_start is not None:
        on_start(clock0, [c.pid for c in children if c.pid is not None])

    results: dict[int, ShardResult] = {}
    finished = asyncio.Event()

    def pump() -> None:
        while len(results) < len(children):
            try:
                kind, index, payload = out.get(timeout=0.5)
            except queue.Empty:
                dead = [
                    k
                    for k, c in enumerate(children)
                    if k not in results and c.exitcode not in (None, 0)
                ]
                for k in dead:
                    results[k] = ShardResult(
                        error=f"generator process {k} died with {children[k].exitcode}"
                    )
                continue
            if kind == "progress":
                loop.call_soon_threadsafe(sink, *payload)
            else:
                results[index] = payload
        loop.call_soon_threadsafe(finished.set)

    thread = threading.Thread(target=pump, name="loadtest-pump", daemon=True)
    thread.start()
    await finished.wait()
    for child in children:
        await loop.run_in_executor(None, child.join, 10)
    merged = merge([results[k] for k in sorted(results)])
    return merged, clock0


def merge(results: list[ShardResult]) -> ShardResult:
    hist = Histograms()
    merged = ShardResult()
    for r in results:
        merged.records.extend(r.records)
        merged.final_points.extend(r.final_points)
        hist.merge_encoded(r.histograms)
        if r.error:
            merged.error = "; ".join(filter(None, [merged.error, r.error]))
    merged.records.sort(key=lambda r: (r.start, r.device, r.seq))
    merged.final_points.sort()
    merged.histograms = hist.encode()
    return merged
