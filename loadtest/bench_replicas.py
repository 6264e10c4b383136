"""What R3 costs: segment publish throughput on an R1 stream vs an R3 cluster stream.

    python -m loadtest.bench_replicas [--segments 2000] [--audio-ms 2000] [--inflight 32]

Starts a single nats-server and a 3-node cluster on loopback (temp dirs),
applies the project's stream definitions (R1, then R3), and publishes real-size
`Segment`s to ASR_SEGMENTS the way the edge does (awaiting each JetStream ack,
with `--inflight` publishes in flight). Prints segments/s for each and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import nats

from jetstream import subjects
from jetstream.setup import apply_all
from schemas.pipeline import Segment, encode_segment
from services.runtime.natsserver import NatsCluster, NatsServer


async def publish_run(
    url: str, replicas: int, n: int, audio_ms: int, inflight: int
) -> tuple[float, list[float]]:
    nc = await nats.connect(servers=url.split(","))
    js = nc.jetstream()
    await apply_all(js, replicas=replicas)
    pcm = bytes(16 * audio_ms * 2)
    sem = asyncio.Semaphore(inflight)
    lat: list[float] = []

    async def one(i: int) -> None:
        seg = Segment(
            session_id=f"bench{i % 64}", edge_id="bench", segment=i, start_ms=0, end_ms=audio_ms,
            sample_rate=16000, pcm=pcm,
        )  # fmt: skip
        async with sem:
            t = time.perf_counter()
            await js.publish(
                subjects.segments_subject("bench", seg.session_id),
                encode_segment(seg),
                headers={subjects.Header.MSG_ID: subjects.segment_msg_id(seg.session_id, i)},
            )
            lat.append((time.perf_counter() - t) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    elapsed = time.perf_counter() - started
    await nc.close()
    return n / elapsed, lat


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench_replicas", description=__doc__)
    p.add_argument("--segments", type=int, default=2000)
    p.add_argument("--audio-ms", type=int, default=2000, help="audio per segment (16 kHz s16le)")
    p.add_argument("--inflight", type=int, default=32)
    args = p.parse_args(argv)

    async def run() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            with NatsServer(Path(tmp) / "single") as single:
                r1, lat1 = await publish_run(
                    single.url, 1, args.segments, args.audio_ms, args.inflight
                )
            with NatsCluster(Path(tmp) / "cluster") as cluster:
                r3, lat3 = await publish_run(
                    cluster.url, 3, args.segments, args.audio_ms, args.inflight
                )
        kb = 32 * args.audio_ms / 1000
        print(
            f"{args.segments} segments of {args.audio_ms} ms ({kb:.0f} KiB), {args.inflight} in flight"
        )
        print(f"{'stream':8} {'segments/s':>11} {'MiB/s':>8} {'ack p50 ms':>11} {'ack p99 ms':>11}")
        for name, rate, lat in (("R1", r1, lat1), ("R3", r3, lat3)):
            q = statistics.quantiles(lat, n=100)
            print(f"{name:8} {rate:11.0f} {rate * kb / 1024:8.1f} {q[49]:11.2f} {q[98]:11.2f}")
        print(f"R3/R1 throughput: {r3 / r1:.2f}")

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
