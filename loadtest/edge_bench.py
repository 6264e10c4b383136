"""The edge's own costs, measured on a real edge process and a real nats-server.

    python -m loadtest.edge_bench [--idle 1000] [--active 100] [--seconds 20]

Prints:
- memory per idle connection (upgraded, silent) and per active session
  (streaming speech in real time, VAD running, segments queued);
- edge CPU per 100 real-time sessions of ingest (VAD included);
- refusal latency (no workers -> 503) p50/p99;
- connections accepted per second (upgrade + SessionStarted + close).
No worker runs: this measures the edge alone (segments wait in the queue).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil

from loadtest.speech import SENTENCES, make_speech
from schemas import device as ev
from services.runtime.natsserver import NatsServer
from services.runtime.procs import spawn

_LISTENING = re.compile(r"edge listening on (\S+)")


class Edge:
    """`python -m services.edge` as a process of its own, so its costs are its own.

    It binds any free port; `ready()` learns which from its first line."""

    def __init__(self, nats_url: str, log: Path, **settings: str) -> None:
        env = {
            **os.environ,
            "NATS_URL": nats_url,
            "ESCAPEMENT_PORT": "0",
            "ESCAPEMENT_AUTH_ENABLED": "false",
            "ESCAPEMENT_LOG_LEVEL": "WARNING",
            "ESCAPEMENT_IDLE_TIMEOUT_S": "600",
            "ESCAPEMENT_MAX_CONNECTIONS": "20000",
            "ESCAPEMENT_MAX_CONNECTIONS_PER_TENANT": "20000",
            **{f"ESCAPEMENT_{k.upper()}": v for k, v in settings.items()},
        }
        self.log_path = log
        self.child = spawn([sys.executable, "-m", "services.edge"], log, env=env, name="edge")
        self.proc = self.child.proc
        self.ps = psutil.Process(self.child.pid)
        self.url = ""

    async def ready(self, http: aiohttp.ClientSession, within: float = 30.0) -> None:
        """Once it listens and `/readyz` waits for nothing but (perhaps) workers: none run here."""
        self.url = (await self.child.wait_for_async(_LISTENING, within)).group(1)
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"{self.url}/readyz") as r:
                    if set((await r.json())["waiting_for"]) <= {"workers"}:
                        return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"edge not ready within {within:g} s:\n{self.child.tail()}")

    def rss(self) -> int:
        return int(self.ps.memory_info().rss)

    def cpu_s(self) -> float:
        t = self.ps.cpu_times()
        return float(t.user + t.system)

    async def __aenter__(self) -> Edge:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.child.returncode is None:
            await self.child.stop_async(grace=30)

    def stop(self) -> int:
        """SIGTERM, as an operator would (SIGKILL after 30 s); the exit code."""
        return self.child.stop(grace=30)


async def idle_and_active(nats_url: str, tmp: Path, idle: int, active: int, seconds: float) -> None:
    speech = make_speech(SENTENCES, tmp / "speech", 16000, gap_s=0.8)
    edge = Edge(nats_url, tmp / "edge1.log", require_workers="false")
    connector = aiohttp.TCPConnector(limit=0)
    async with edge, aiohttp.ClientSession(connector=connector) as http:
        await edge.ready(http)
        await asyncio.sleep(0.5)
        base = edge.rss()
        url = f"{edge.url}/v1/stream"
        sockets = []
        for i in range(0, idle, 100):
            sockets += await asyncio.gather(
                *(http.ws_connect(url) for _ in range(min(100, idle - i)))
            )
        await asyncio.sleep(1.0)
        idle_rss = edge.rss()
        for ws in sockets:
            await ws.close()
        await asyncio.sleep(1.0)
        print(
            f"idle connections: {idle}; edge RSS {base / 2**20:.1f} -> {idle_rss / 2**20:.1f} MiB: {(idle_rss - base) / idle / 1024:.1f} KiB per idle connection"
        )

        # active: real-time speech, 100 ms frames, VAD and segment publishing on
        step = 3200
        base2 = edge.rss()

        async def talker(i: int) -> int:
            offset = (i * 7919 * step) % len(speech.pcm)
            pcm = (speech.pcm[offset:] + speech.pcm[:offset]) * 3
            frames = int(seconds * 10)
            async with http.ws_connect(url) as ws:
                t0 = time.monotonic()
                for n in range(frames):
                    delay = t0 + n / 10 - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    await ws.send_bytes(pcm[(n * step) % (len(pcm) - step) :][:step])
                return 1

        started_cpu, started = edge.cpu_s(), time.monotonic()
        tasks = [asyncio.create_task(talker(i)) for i in range(active)]
        await asyncio.sleep(seconds * 0.8)
        active_rss = edge.rss()
        await asyncio.gather(*tasks)
        cpu = edge.cpu_s() - started_cpu
        wall = time.monotonic() - started
        per100 = cpu / wall * 100 * 100 / active
        print(
            f"active sessions: {active} for {seconds:.0f} s; edge RSS {base2 / 2**20:.1f} -> {active_rss / 2**20:.1f} MiB: {(active_rss - base2) / active / 1024:.1f} KiB per active session"
        )
        print(
            f"edge CPU: {cpu / wall * 100:.1f} % of one core for {active} sessions = {per100:.1f} % per 100 real-time sessions"
        )


async def refusals_and_accepts(nats_url: str, tmp: Path, n: int) -> None:
    edge = Edge(nats_url, tmp / "edge2.log", require_workers="true")
    async with edge, aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        await edge.ready(http)
        url = f"{edge.url}/v1/stream"
        times = []
        for _ in range(200):
            t = time.perf_counter()
            try:
                await http.ws_connect(url)
            except aiohttp.WSServerHandshakeError as exc:
                assert exc.status == 503
            times.append((time.perf_counter() - t) * 1000)
        q = statistics.quantiles(times, n=100)
        print(
            f"refusal latency (503 no_workers, 200 sequential): p50 {q[49]:.2f} ms, p99 {q[98]:.2f} ms"
        )

    edge = Edge(nats_url, tmp / "edge3.log", require_workers="false")
    client = psutil.Process()
    async with edge, aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        await edge.ready(http)
        url = f"{edge.url}/v1/stream"
        sem = asyncio.Semaphore(200)

        async def one() -> None:
            async with sem, http.ws_connect(url) as ws:
                event = ev.decode_event((await ws.receive()).data)
                assert isinstance(event, ev.SessionStarted)

        c0, e0, t0 = client.cpu_times(), edge.cpu_s(), time.monotonic()
        await asyncio.gather(*(one() for _ in range(n)))
        wall = time.monotonic() - t0
        c1 = client.cpu_times()
        client_cpu = (c1.user + c1.system - c0.user - c0.system) / wall * 100
        print(
            f"connections accepted: {n} in {wall:.2f} s = {n / wall:.0f}/s "
            f"(edge CPU {(edge.cpu_s() - e0) / wall * 100:.0f} %, client CPU {client_cpu:.0f} %"
            f"{' - the client is the limit' if client_cpu > 90 else ''})"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.edge_bench", description=__doc__)
    p.add_argument("--idle", type=int, default=1000)
    p.add_argument("--active", type=int, default=100)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--connects", type=int, default=2000)
    args = p.parse_args(argv)

    async def run() -> None:
        with tempfile.TemporaryDirectory() as tmp_s:
            tmp = Path(tmp_s)
            with NatsServer(tmp / "nats1") as server:
                await idle_and_active(server.url, tmp, args.idle, args.active, args.seconds)
            with NatsServer(tmp / "nats2") as server:  # an empty queue: nothing refused as full
                await refusals_and_accepts(server.url, tmp, args.connects)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
