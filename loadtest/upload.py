"""Does a long upload slow live sessions down? Live latency with and without one.

    python -m loadtest.upload [--spawn [--workers 2] | --url URL] [--minutes 10] [--sessions 4]

Two phases on the same pipeline:

1. baseline: `--sessions` devices stream real speech in real time (recorded
   prompts in room noise, `loadtest.realspeech`) for `--live-s` seconds;
2. with upload: the same devices again, and meanwhile one `--minutes` file of
   real speech (the corpus' minutes laid end to end, looped) is posted to
   `POST /v1/audio/transcriptions`, as the `openai` SDK would.

Reported: the live sessions' speech end -> Final p50/p95 in each phase (in the
second, also only the finals that arrived while the upload was running), the
upload's wall time, its audio seconds per wall second and its WER. The upload's
segments wait on their own consumer, which workers pull only when no live
final waits, one segment of the file at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from loadtest import realspeech as rs
from loadtest.corpus import Item
from loadtest.device import (
    COMPLETED,
    FinalTiming,
    SessionOptions,
    SessionRecord,
    retry_delay_s,
    run_session,
)
from loadtest.metrics import percentile
from loadtest.runner import ready_target, run_command
from loadtest.target import SpawnedUp, SpawnError
from loadtest.workload import http_session
from services.cli import workers_option
from services.common.audio import wav_bytes

PATH = "/v1/audio/transcriptions"


@dataclass
class Upload:
    status: int = 0
    wall_s: float = 0.0
    started: float = 0.0  # seconds since the phase started
    text: str = ""
    error: str = ""


@dataclass
class Phase:
    name: str
    finals: list[FinalTiming] = field(default_factory=list)
    records: list[SessionRecord] = field(default_factory=list)
    upload: Upload | None = None

    def latencies(self, during: tuple[float, float] | None = None) -> list[float]:
        return [
            f.latency_ms
            for f in self.finals
            if f.latency_ms is not None and (during is None or during[0] <= f.t <= during[1])
        ]

    def parts(self) -> dict[str, float | None]:
        """p50 of the Finals' inference and pipeline overhead (queueing included)."""
        inference = sorted(f.inference_ms for f in self.finals if f.latency_ms is not None)
        overhead = sorted(
            f.overhead_ms for f in self.finals if f.overhead_ms is not None and f.latency_ms
        )
        return {
            "inference_p50": percentile(inference, 50),
            "overhead_p50": percentile(overhead, 50),
            "overhead_p95": percentile(overhead, 95),
        }


def _summary(values: list[float]) -> dict[str, Any]:
    ordered = sorted(values)
    return {
        "count": len(values),
        "p50": percentile(ordered, 50) if values else None,
        "p95": percentile(ordered, 95) if values else None,
        "max": ordered[-1] if values else None,
    }


async def post_file(
    http: aiohttp.ClientSession,
    url: str,
    wav: bytes,
    token: str | None,
    clock0: float,
    model: str = "whisper-1",
    limit_s: float = 3600.0,
) -> Upload:
    """One upload, as the SDK sends it (multipart `file` + `model`)."""
    out = Upload(started=time.monotonic() - clock0)
    form = aiohttp.FormData()
    form.add_field("file", wav, filename="long.wav", content_type="audio/wav")
    form.add_field("model", model)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    started = time.monotonic()
    try:
        timeout = aiohttp.ClientTimeout(total=limit_s)
        async with http.post(f"{url}{PATH}", data=form, headers=headers, timeout=timeout) as r:
            out.status = r.status
            body = await r.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
        return out
    finally:
        out.wall_s = time.monotonic() - started
    if out.status == 200:
        out.text = str(body.get("text", ""))
    else:
        out.error = json.dumps(body.get("error", body))[:300]
    return out


async def run_phase(
    name: str,
    url: str,
    live: list[Item],
    token: str | None,
    upload: bytes | None = None,
    upload_limit_s: float = 3600.0,
) -> Phase:
    """The live devices (real time, one session each); with an upload, each device
    starts its session again until the upload has finished, so live speech covers it."""
    phase = Phase(name)
    opts = SessionOptions(url=url, token=token)
    clock0 = time.monotonic()
    async with http_session() as http:
        posting = (
            asyncio.create_task(post_file(http, url, upload, token, clock0, limit_s=upload_limit_s))
            if upload is not None
            else None
        )

        async def device(i: int, item: Item) -> None:
            seq = 0
            while True:
                rec = SessionRecord(device=i, seq=seq, item=item.name)
                phase.records.append(rec)
                await run_session(http, rec, item, opts, clock0, on_final=phase.finals.append)
                seq += 1
                if posting is None or posting.done():
                    return
                if rec.outcome != COMPLETED:  # refused or failed: as a device would, wait
                    await asyncio.sleep(retry_delay_s(rec.retry_after))

        try:
            await asyncio.gather(*(device(i, item) for i, item in enumerate(live)))
            if posting is not None:
                phase.upload = await posting
        finally:
            if posting is not None and not posting.done():
                posting.cancel()
    return phase


def build_audio(
    sessions: int, live_s: float, minutes: float, cache_dir: Path | None
) -> tuple[list[Item], Item]:
    """Live sessions' speech, and the file: other recorded minutes, looped to `minutes`."""
    cache = rs._cache_root(cache_dir)
    sources = rs.ensure_sources(cache)
    prompts = rs.load_prompts(sources)
    live = [rs.real_session(prompts, i, cache, 16000, session_s=live_s) for i in range(sessions)]
    minutes_of_speech = [rs.real_session(prompts, 100 + i, cache, 16000, 60.0) for i in range(3)]
    pcm, texts = bytearray(), []
    want = int(minutes * 60 * 16000 * 2)
    slack = 15 * 16000 * 2  # whole recordings: the file ends within 15 s of `minutes`
    while len(pcm) < want - slack:
        for item in minutes_of_speech:
            if len(pcm) + len(item.pcm) > want + slack:
                break
            pcm += item.pcm
            texts.append(item.text)
    file = Item(f"{minutes:g}-minute file", bytes(pcm), 16000, " ".join(texts))
    return live, file


def report(phases: list[Phase], file: Item, header: str) -> dict[str, Any]:
    base, loaded = phases
    up = loaded.upload
    assert up is not None
    during = (up.started, up.started + up.wall_s)
    counts = rs.score(file.text, up.text) if up.text else None
    out: dict[str, Any] = {
        "header": header,
        "baseline": _summary(base.latencies()),
        "with_upload": _summary(loaded.latencies()),
        "with_upload_during": _summary(loaded.latencies(during)),
        "parts_ms": {p.name: p.parts() for p in phases},
        "sessions_completed": {
            p.name: sum(r.outcome == COMPLETED for r in p.records) for p in phases
        },
        "sessions_not_completed": {
            p.name: sum(r.outcome != COMPLETED for r in p.records) for p in phases
        },
        "upload": {
            "status": up.status,
            "error": up.error,
            "audio_s": round(file.duration_s, 1),
            "wall_s": round(up.wall_s, 1),
            "audio_s_per_wall_s": round(file.duration_s / up.wall_s, 2) if up.wall_s else None,
            "wer": round(counts.errors / counts.ref_words, 4)
            if counts and counts.ref_words
            else None,
        },
    }
    return out


def print_report(r: dict[str, Any]) -> None:
    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:,.0f}"

    print(r["header"])
    print(f"{'live speech end -> Final (ms)':<44}{'finals':>8}{'p50':>8}{'p95':>8}{'max':>8}")
    for key, label in (
        ("baseline", "live sessions alone"),
        ("with_upload", "with the upload (whole phase)"),
        ("with_upload_during", "with the upload (while it ran)"),
    ):
        h = r[key]
        print(f"{label:<44}{h['count']:>8}{f(h['p50']):>8}{f(h['p95']):>8}{f(h['max']):>8}")
    for name, parts in r["parts_ms"].items():
        print(
            f"  {name}: inference p50 {f(parts['inference_p50'])}, pipeline overhead (queueing) "
            f"p50 {f(parts['overhead_p50'])} / p95 {f(parts['overhead_p95'])}"
        )
    u = r["upload"]
    print(
        f"upload: HTTP {u['status']}, {u['audio_s']:.0f} s of audio in {u['wall_s']:.1f} s "
        f"({u['audio_s_per_wall_s']}x real time), WER {u['wer']}"
        + (f", error {u['error']}" if u["error"] else "")
    )
    print(
        f"sessions completed: {r['sessions_completed']}, "
        f"not completed: {r['sessions_not_completed']}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.upload", description=__doc__.split("\n")[0]
    )
    p.add_argument("--url", default="http://127.0.0.1:8080", help="the edge")
    p.add_argument("--token", help="API key or token (env ESCAPEMENT_TOKEN)")
    p.add_argument("--spawn", action="store_true", help="start an embedded pipeline for the run")
    p.add_argument(
        "--workers",
        type=workers_option,
        default="auto",
        help="workers of the spawned pipeline (default auto: one per core)",
    )
    p.add_argument("--model", help="model of the spawned pipeline")
    p.add_argument("--sessions", type=int, default=4, help="live real-time sessions (4)")
    p.add_argument("--live-s", type=float, default=90.0, help="speech per live session (90 s)")
    p.add_argument("--minutes", type=float, default=10.0, help="length of the upload (10)")
    p.add_argument(
        "--upload-limit-s", type=float, default=900.0, help="give up on the upload after (900 s)"
    )
    p.add_argument("--cache-dir", type=Path, help="speech cache (loadtest.realspeech)")
    p.add_argument("--out", help="also write the numbers as JSON here")
    return p.parse_args(argv)


async def run(args: argparse.Namespace) -> int:
    try:
        live, file = await asyncio.to_thread(
            build_audio, args.sessions, args.live_s, args.minutes, args.cache_dir
        )
    except (rs.CorpusError, rs.SpeechError) as exc:
        print(f"loadtest.upload: {exc}", file=sys.stderr)
        return 2
    wav = wav_bytes(file.pcm, file.sample_rate)
    token = args.token or os.environ.get("ESCAPEMENT_TOKEN") or None
    spawned = SpawnedUp(workers=args.workers, model=args.model) if args.spawn else None
    try:
        url = await ready_target(args.url, spawned, "loadtest.upload")
        if url is None:
            return 3
        print(f"baseline: {args.sessions} live session(s) ...", file=sys.stderr)
        base = await run_phase("baseline", url, live, token)
        print(f"with a {args.minutes:g}-minute upload ...", file=sys.stderr)
        loaded = await run_phase(
            "with_upload", url, live, token, upload=wav, upload_limit_s=args.upload_limit_s
        )
    except SpawnError as exc:
        print(f"loadtest.upload: {exc}", file=sys.stderr)
        return 3
    finally:
        if spawned is not None:
            await asyncio.to_thread(spawned.stop)
    where = f"spawned {spawned.layout}" if spawned else url
    header = (
        f"{args.sessions} live real-time sessions of recorded speech ({args.live_s:g} s each), "
        f"then again with one {args.minutes:g}-minute upload; {where}; {os.cpu_count()} cores"
    )
    result = report([base, loaded], file, header)
    print_report(result)
    if args.out:
        text = json.dumps(result, indent=1) + "\n"
        await asyncio.to_thread(Path(args.out).write_text, text)
    return 0 if result["upload"]["status"] == 200 else 1


def main(argv: list[str] | None = None) -> int:
    return run_command(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
