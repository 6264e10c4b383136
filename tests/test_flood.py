"""The gap flood: numbered chunks that each claim a long gap must not freeze the edge.

A 29-byte msgpack `AudioChunk` claiming a 9.99 s gap makes the edge fill 9.99 s
of 48 kHz silence and run the VAD over it. Sent back to back, such frames would
cost the edge's event loop more than it has. The edge paces on the repaired
timeline (silence it filled in counts as audio the device sent), so one device
gets at most `max_audio_rate` times real time of timeline, whatever it claims.

The edge runs as its own process (`python -m services.edge`): `/healthz` is
timed from outside, as a load balancer would. A worker (tiny.en) decodes a
second session's real-time speech meanwhile.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from loadtest.edge_bench import Edge
from schemas import device as ev
from services.cli.client import stream_audio
from tests.support import run_worker, until, wer

pytestmark = pytest.mark.slow

FLOOD_S = 12.0
GAP_MS = 9990  # just under the 10 s a chunk may claim before it is refused as no loss
SENTENCES = [
    "please turn on the lights in the kitchen",
    "what is the weather going to be like tomorrow morning",
    "add milk and eggs to my shopping list",
]


@pytest.fixture
async def edge_process(nats_server, nc, tmp_path: Path) -> AsyncIterator[Edge]:  # type: ignore[no-untyped-def]
    edge = await asyncio.to_thread(Edge, nats_server.url, tmp_path / "edge.log", log_level="INFO")
    try:
        async with aiohttp.ClientSession() as http:
            await edge.ready(http)
        yield edge
    finally:
        await asyncio.to_thread(edge.stop)


def gap_frame(k: int) -> bytes:
    """The k-th frame of the flood: one sample of audio, 9.99 s after the one before."""
    return ev.encode_chunk(ev.AudioChunk(seq=k * 1000, pcm=b"\0\0", capture_ms=k * GAP_MS))


class Flooder:
    """A device sending gap frames as fast as its socket takes them, until cancelled.

    It answers pings (a reader runs) but never waits for anything else. Once the
    edge stops reading it (pacing), TCP pushes back and its sends block."""

    def __init__(self) -> None:
        self.sent_at: list[float] = []  # when each frame was handed to the socket
        self.closed_by_edge: int | None = None

    async def run(self, http: aiohttp.ClientSession, url: str) -> None:
        async with http.ws_connect(f"{url}/v1/stream?framing=msgpack&sample_rate=48000") as ws:
            started = ev.decode_event((await ws.receive(timeout=10)).data)
            assert isinstance(started, ev.SessionStarted)
            reader = asyncio.create_task(_drain(ws))
            try:
                while not ws.closed:
                    await ws.send_bytes(gap_frame(len(self.sent_at)))
                    self.sent_at.append(time.monotonic())
                    if len(self.sent_at) % 50 == 0:
                        await asyncio.sleep(0)  # let the probes run on this loop too
                self.closed_by_edge = ws.close_code
            finally:
                reader.cancel()

    def in_first_second(self) -> int:
        return sum(1 for t in self.sent_at if t - self.sent_at[0] <= 1.0) if self.sent_at else 0


async def _drain(ws: aiohttp.ClientWebSocketResponse) -> None:
    async for _ in ws:
        pass


async def probe_healthz(
    http: aiohttp.ClientSession, url: str, stop: asyncio.Event, every: float = 0.05
) -> list[float]:
    """`/healthz` latencies (ms), one request every `every` s until `stop`."""
    latencies: list[float] = []
    while not stop.is_set():
        before = time.monotonic()
        async with http.get(f"{url}/healthz", timeout=aiohttp.ClientTimeout(total=5)) as r:
            assert r.status == 200
            await r.read()
        latencies.append((time.monotonic() - before) * 1000)
        await asyncio.sleep(every)
    return latencies


async def ready(http: aiohttp.ClientSession, url: str) -> bool:
    """`/readyz` says a session would be admitted (the worker answers discovery)."""
    async with http.get(f"{url}/readyz") as r:
        return r.status == 200


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


async def test_gap_flood_does_not_freeze_the_edge(
    edge_process: Edge, nats_server, engine, make_test_speech
) -> None:  # type: ignore[no-untyped-def]
    """A device sending gap-claiming chunks at full speed, while another speaks in real
    time: `/healthz` answers in under 100 ms (p99), and the speaker gets its finals."""
    speech = make_test_speech(SENTENCES)
    stop = asyncio.Event()
    async with (
        run_worker(nats_server.url, engine),
        aiohttp.ClientSession() as flooding_http,
        aiohttp.ClientSession() as prober,
        aiohttp.ClientSession() as speaker,
    ):
        await until(lambda: ready(prober, edge_process.url), within=30, message="edge ready")
        cpu_before = edge_process.cpu_s()
        flooder = Flooder()
        flooding = asyncio.create_task(flooder.run(flooding_http, edge_process.url))
        probing = asyncio.create_task(probe_healthz(prober, edge_process.url, stop))
        try:
            await asyncio.sleep(1.0)  # the flood is on before the speaker starts
            started = time.monotonic()
            run = await stream_audio(
                speaker, edge_process.url, speech.pcm, speech.sample_rate, interim_results=False
            )
            spoken = time.monotonic() - started
            await asyncio.sleep(max(0.0, FLOOD_S - spoken))
        finally:
            stop.set()
            latencies = await probing
            flood_s = time.monotonic() - started + 1.0
            assert not flooding.done(), flooding  # still pushing (or blocked pushing)
            flooding.cancel()
        cpu = edge_process.cpu_s() - cpu_before
    frames, burst = len(flooder.sent_at), flooder.in_first_second()
    print(
        f"\nflood: {frames} frames each claiming {GAP_MS} ms ({burst} in its first second);"
        f" /healthz p50 {statistics.median(latencies):.1f} ms, p99 {p99(latencies):.1f} ms,"
        f" max {max(latencies):.1f} ms over {len(latencies)} requests in {flood_s:.1f} s;"
        f" edge CPU {cpu:.1f} s; finals {len(run.finals)}, WER {wer(speech.text, run.text):.2f}"
    )
    assert burst >= 55, f"the flood was too slow to test anything: {burst} frames in 1 s"
    assert p99(latencies) < 100, latencies
    assert run.close_code == 1000, (run.close_code, run.close_reason)
    assert len(run.finals) >= len(SENTENCES), [f.text for f in run.finals]
    assert wer(speech.text, run.text) <= 0.25, run.text
