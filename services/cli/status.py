"""`escapement status`: the pipeline on one terminal screen, without the NATS CLI.

    escapement status [--nats-url URL] [--url EDGE] [--window 60] [--json]

- Queue: each Escapement stream's messages and bytes; the workers'
  consumers: waiting, in flight, redelivered, idle pulls, acknowledged.
- Workers (and edges): every instance answering NATS micro discovery
  (`$SRV.STATS`), with its engine and how long it has run.
- Throughput: the results stored on ASR_TRANSCRIPTS over the last `--window`
  seconds, by engine: segments, audio decoded per second, RTF, inference time.
- Recent latency and sessions: the edge's `/v1/dashboard` (`--url`), speech
  end to Final over its last minute, sessions open and refusals.

NATS: `--nats-url`, else `NATS_URL`, else the URL `escapement up` keeps in its
data dir (`nats.url`, with credentials), else nats://127.0.0.1:4222.
Exit status: 0; 3 NATS unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.micro.service import ServiceVerb, control_subject

from jetstream import subjects
from schemas.pipeline import ErrorResult, Result, decode_result
from services.common.config import nats_servers
from services.common.discovery import lane_of
from services.common.natsconn import redact
from services.edge.queue_view import QueueState, read_queue

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
MAX_RESULTS = 20_000  # read at most this many stored results for the throughput table


class Unreachable(Exception):
    pass


@dataclass
class EngineLoad:
    finals: int = 0
    errors: int = 0
    audio_s: float = 0.0
    rtf: list[float] = field(default_factory=list)
    inference_ms: list[float] = field(default_factory=list)

    def add(self, result: Result) -> None:
        audio_s = max(0, result.end_ms - result.start_ms) / 1000
        self.finals += 1
        self.audio_s += audio_s
        self.inference_ms.append(result.inference_ms)
        if audio_s > 0:
            self.rtf.append(result.inference_ms / 1000 / audio_s)


@dataclass
class Status:
    nats_url: str
    queue: QueueState
    workers: list[dict[str, Any]]
    edges: list[dict[str, Any]]
    engines: dict[str, EngineLoad]
    window_s: float
    edge_url: str
    edge: dict[str, Any] | None  # /v1/dashboard, None if unreachable
    edge_error: str = ""


def default_nats_url() -> str:
    if os.environ.get("NATS_URL"):
        return os.environ["NATS_URL"]
    from services.runtime.up import default_data_dir

    kept = default_data_dir() / "nats.url"
    with contextlib.suppress(OSError):
        return kept.read_text().strip()
    return DEFAULT_NATS_URL


async def _stats_of(nc: NATS, service: str, wait: float) -> list[dict[str, Any]]:
    """Every instance of a NATS micro service answering `$SRV.STATS.<name>` within `wait`."""
    inbox = nc.new_inbox()
    replies: list[dict[str, Any]] = []

    async def collect(msg) -> None:  # type: ignore[no-untyped-def]
        with contextlib.suppress(ValueError):
            replies.append(json.loads(msg.data))

    sub = await nc.subscribe(inbox, cb=collect)
    try:
        await nc.publish(control_subject(ServiceVerb.STATS, name=service), b"", reply=inbox)
        await nc.flush()
        await asyncio.sleep(wait)
    finally:
        await sub.unsubscribe()
    return sorted(replies, key=lambda r: str(r.get("id", "")))


async def _recent_results(nc: NATS, window_s: float) -> dict[str, EngineLoad]:
    """Results stored on ASR_TRANSCRIPTS in the last `window_s`, by engine (a
    short-lived consumer of our own, memory only, removed after)."""
    js = nc.jetstream(timeout=5)
    info = await js.stream_info(subjects.STREAM_TRANSCRIPTS)
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.BY_START_TIME,
        opt_start_time=datetime.now(UTC) - timedelta(seconds=window_s),
        ack_policy=AckPolicy.NONE,
        mem_storage=True,
        inactive_threshold=30.0,
    )
    sub = await js.pull_subscribe(
        info.config.subjects[0], stream=subjects.STREAM_TRANSCRIPTS, config=config
    )
    engines: dict[str, EngineLoad] = {}
    consumer = await sub.consumer_info()
    try:
        waiting = consumer.num_pending or 0
        seen = 0
        while seen < min(waiting, MAX_RESULTS):
            try:
                batch = await sub.fetch(batch=min(500, waiting - seen), timeout=2)
            except TimeoutError:
                break
            seen += len(batch)
            for msg in batch:
                try:
                    result = decode_result(msg.data)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    continue
                if isinstance(result, ErrorResult):
                    engines.setdefault("(errors)", EngineLoad()).errors += 1
                else:
                    engines.setdefault(result.engine or "?", EngineLoad()).add(result)
    finally:
        await sub.unsubscribe()
        with contextlib.suppress(NatsError, TimeoutError):
            await js.delete_consumer(subjects.STREAM_TRANSCRIPTS, consumer.name)
    return engines


async def _edge_view(url: str) -> tuple[dict[str, Any] | None, str]:
    timeout = aiohttp.ClientTimeout(total=3)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as http,
            http.get(f"{url.rstrip('/')}/v1/dashboard") as r,
        ):
            if r.status != 200:
                return None, f"HTTP {r.status}"
            return await r.json(), ""
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return None, str(exc) or type(exc).__name__


async def collect(nats_url: str, edge_url: str, window_s: float) -> Status:
    async def quiet(exc: Exception) -> None:  # the failure is reported once, below
        pass

    try:
        nc = await nats.connect(
            servers=nats_servers(nats_url),
            name="escapement-status",
            allow_reconnect=False,
            max_reconnect_attempts=1,
            reconnect_time_wait=0.1,
            connect_timeout=3,
            error_cb=quiet,
        )
    except (NatsError, OSError, TimeoutError) as exc:
        raise Unreachable(f"cannot reach NATS at {redact(nats_url)}: {exc}") from None
    try:
        edge_task = asyncio.create_task(_edge_view(edge_url))
        workers, edges = await asyncio.gather(
            _stats_of(nc, subjects.WORKER_SERVICE, 0.3), _stats_of(nc, subjects.EDGE_SERVICE, 0.3)
        )
        queue = await read_queue(nc.jetstream(timeout=3), {lane_of(w) for w in workers})
        try:
            engines = await _recent_results(nc, window_s)
        except (NatsError, TimeoutError):
            engines = {}
        edge, edge_error = await edge_task
    finally:
        await nc.close()
    return Status(nats_url, queue, workers, edges, engines, window_s, edge_url, edge, edge_error)


# --- one screen ---------------------------------------------------------------------


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _ago(started: str) -> str:
    try:
        since = datetime.fromisoformat(started.replace("Z", "+00:00"))
    except ValueError:
        return "?"
    if since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    s = max(0, int((datetime.now(UTC) - since).total_seconds()))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f} ms"


def _num(v: float | None, fmt: str = ".2f") -> str:
    return "-" if v is None else format(v, fmt)


def render(st: Status) -> str:
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    out = [f"Escapement status  {now}  (NATS {redact(st.nats_url)})", ""]
    out.append("Queue (JetStream)")
    out.append(f"  {'stream':<18}{'messages':>10}{'bytes':>12}")
    for s in st.queue.streams.values():
        out.append(f"  {s.name:<18}{s.messages:>10,}{_bytes(s.bytes):>12}")
    if not st.queue.streams:
        out.append("  (no Escapement streams: nothing has started yet)")
    out.append(
        f"  {'consumer':<30}{'waiting':>8}{'in flight':>10}{'redeliv.':>9}{'idle pulls':>11}"
        f"{'acked':>9}"
    )
    for c in st.queue.consumers.values():
        out.append(
            f"  {c.stream + '/' + c.name:<30}{c.pending:>8}{c.ack_pending:>10}"
            f"{c.redelivered:>9}{c.waiting:>11}{c.acked:>9,}"
        )
    out.append("")
    looks = [w for w in st.workers if (w.get("metadata") or {}).get("role") == "looks"]
    extra = f" (+ {len(looks)} for interim looks only)" if looks else ""
    out.append(f"Workers: {len(st.workers) - len(looks)} alive{extra}")
    for w in st.workers:
        meta = w.get("metadata") or {}
        lane = f" [model {meta.get('serves')}]" if meta.get("lane") else ""
        engine = (
            str(meta.get("engine") or "?")
            + lane
            + (" (looks)" if meta.get("role") == "looks" else "")
        )
        out.append(f"  {str(w.get('id', '?')):<24}{engine:<36}up {_ago(str(w.get('started', '')))}")
    out.append(f"Edges: {len(st.edges)} alive")
    for e in st.edges:
        edge_id = (e.get("metadata") or {}).get("edge_id") or e.get("id", "?")
        out.append(f"  {edge_id:<24}{'':<36}up {_ago(str(e.get('started', '')))}")
    out.append("")
    out.append(f"Throughput, last {st.window_s:g} s (results on {subjects.STREAM_TRANSCRIPTS})")
    out.append(
        f"  {'engine':<36}{'segments':>9}{'audio s/s':>10}{'RTF p50':>9}{'RTF p90':>9}"
        f"{'inference p50':>15}"
    )
    for name, load in sorted(st.engines.items()):
        if load.finals == 0:
            out.append(f"  {name:<36}{load.errors:>9} error result(s)")
            continue
        out.append(
            f"  {name:<36}{load.finals:>9}{load.audio_s / st.window_s:>10.2f}"
            f"{_num(_pct(load.rtf, 0.5), '.3f'):>9}{_num(_pct(load.rtf, 0.9), '.3f'):>9}"
            f"{_ms(_pct(load.inference_ms, 0.5)):>15}"
        )
    if not st.engines:
        out.append("  (nothing decoded)")
    out.append("")
    if st.edge is None:
        out.append(f"Edge {st.edge_url}: not reachable ({st.edge_error}); no latency or sessions")
    else:
        e = st.edge
        lat = e.get("latency_ms") or {}
        sessions = e.get("sessions") or {}
        refused = e.get("refused") or {}
        admitting = e.get("admitting") or {}
        out.append(f"Edge {e.get('edge_id', '?')} ({st.edge_url})")
        out.append(
            f"  latency, speech end -> Final, last minute: p50 {_ms(lat.get('p50'))}, "
            f"p90 {_ms(lat.get('p90'))}, p99 {_ms(lat.get('p99'))} ({int(lat.get('count') or 0)} finals)"
        )
        out.append(
            f"  sessions: {sessions.get('active', 0)} open, {sessions.get('admitted', 0)} admitted;"
            f" refused: {', '.join(f'{k} {v}' for k, v in sorted(refused.items())) or 'none'}"
        )
        if admitting:
            verdict = "yes" if admitting.get("ok") else f"NO ({admitting.get('reason')})"
            out.append(f"  admitting new sessions: {verdict}: {admitting.get('message', '')}")
    return "\n".join(out)


def as_json(st: Status) -> dict[str, Any]:
    return {
        "time": time.time(),
        "streams": {
            s.name: {"messages": s.messages, "bytes": s.bytes} for s in st.queue.streams.values()
        },
        "consumers": {
            f"{c.stream}/{c.name}": {
                "pending": c.pending,
                "ack_pending": c.ack_pending,
                "redelivered": c.redelivered,
                "waiting": c.waiting,
                "acked": c.acked,
            }
            for c in st.queue.consumers.values()
        },
        "workers": [
            {
                "id": w.get("id"),
                "engine": (w.get("metadata") or {}).get("engine"),
                "started": w.get("started"),
            }
            for w in st.workers
        ],
        "edges": [
            {
                "id": e.get("id"),
                "edge_id": (e.get("metadata") or {}).get("edge_id"),
                "started": e.get("started"),
            }
            for e in st.edges
        ],
        "throughput": {
            "window_s": st.window_s,
            "engines": {
                name: {
                    "segments": load.finals,
                    "errors": load.errors,
                    "audio_s": round(load.audio_s, 3),
                    "rtf_p50": _pct(load.rtf, 0.5),
                    "rtf_p90": _pct(load.rtf, 0.9),
                    "inference_ms_p50": _pct(load.inference_ms, 0.5),
                }
                for name, load in st.engines.items()
            },
        },
        "edge": st.edge,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="escapement status",
        description="Queue, consumers, workers, throughput and recent latency on one screen.",
        epilog="Exit status: 0, or 3 when NATS cannot be reached.",
    )
    p.add_argument(
        "--nats-url",
        help="NATS server(s) (default: env NATS_URL, else escapement up's data dir, "
        f"else {DEFAULT_NATS_URL})",
    )
    p.add_argument(
        "--url", default="http://127.0.0.1:8080", help="an edge, for latency and sessions"
    )
    p.add_argument(
        "--window", type=float, default=60.0, help="seconds of results for throughput (default 60)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    nats_url = args.nats_url or default_nats_url()
    try:
        st = asyncio.run(collect(nats_url, args.url, max(1.0, args.window)))
    except Unreachable as exc:
        print(f"escapement status: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130
    print(json.dumps(as_json(st), indent=1) if args.json else render(st))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
