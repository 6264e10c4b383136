"""Timestamps that survive loss: numbered chunks (framing=msgpack) through the real pipeline.

What a user would notice: the same recording streamed once clean and once over
a bad network (a tenth of the chunks lost, a tenth late by up to 80 ms, a few
lost ones arriving much later) gives words at the same times, and the device
is told exactly which audio was lost (`Gap`) and how many chunks came too late
(`ChunkStats`), while nothing late is spliced in at the wrong place.
"""

from __future__ import annotations

import asyncio
import difflib
import random
import time
from pathlib import Path

import aiohttp
import pytest

from loadtest.speech import SENTENCES, make_speech
from schemas import device as ev
from tests.support import RunningEdge

CHUNK_MS = 20
RATE = 16000
JITTER_MS = 200  # the edge's default


@pytest.fixture(scope="module")
def recording(speech_dir: Path) -> bytes:
    """About 9 s of speech: three sentences with pauses between them, 16 kHz mono."""
    sentences = [SENTENCES[1], SENTENCES[2], SENTENCES[6]]
    return make_speech(sentences, speech_dir, RATE, gap_s=0.8).pcm


def _chunks(pcm: bytes) -> list[ev.AudioChunk]:
    size = RATE * CHUNK_MS // 1000 * 2
    return [
        ev.AudioChunk(seq=i // size, pcm=pcm[i : i + size], capture_ms=i // 2 * 1000 // RATE)
        for i in range(0, len(pcm) - size + 1, size)
    ]


def _bad_network(n: int, seed: int = 7) -> tuple[list[tuple[float, int]], set[int], set[int]]:
    """(send time in s, seq) in sending order: 10 % of chunks lost, 10 % of the others
    held back 1-4 chunks (20-80 ms, inside the jitter buffer); 3 of the lost ones
    arrive 500 ms late (beyond it). The first and last few are left alone."""
    rng = random.Random(seed)
    inner = list(range(5, n - 15))
    lost = set(rng.sample(inner, n // 10))
    kept = [s for s in inner if s not in lost]
    delayed = set(rng.sample(kept, n // 10))
    late = set(rng.sample(sorted(lost), 3))
    step = CHUNK_MS / 1000
    plan = [(s * step + (rng.randint(1, 4) * step if s in delayed else 0.0), s) for s in range(n)]
    plan += [(s * step + 0.5, s) for s in late]
    sent = sorted((t, s) for t, s in plan if s not in lost or t > s * step)
    return sent, lost, late


async def _session(
    http: aiohttp.ClientSession,
    edge: RunningEdge,
    chunks: list[ev.AudioChunk],
    plan: list[tuple[float, int]],
) -> list[ev.ServerEvent]:
    """One device: chunks at their send times (real time), CloseStream, every event back."""
    url = f"{edge.url}/v1/stream?sample_rate={RATE}&framing=msgpack&interim_results=false"
    events: list[ev.ServerEvent] = []
    async with http.ws_connect(url) as ws:

        async def read() -> None:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    events.append(ev.decode_event(msg.data))

        reader = asyncio.create_task(read())
        t0 = time.monotonic()
        for at, seq in plan:
            await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
            await ws.send_bytes(ev.encode_chunk(chunks[seq]))
        await ws.send_str(ev.encode_control(ev.CloseStream()))
        await asyncio.wait_for(reader, timeout=60)
    assert ws.close_code == 1000, ws.close_code
    return events


def _words(events: list[ev.ServerEvent]) -> list[tuple[str, int]]:
    finals = sorted((e for e in events if isinstance(e, ev.Final)), key=lambda f: f.segment)
    norm = ("".join(c for c in w.word.lower() if c.isalnum()) for f in finals for w in f.words)
    starts = (w.start_ms for f in finals for w in f.words)
    return [(w, t) for w, t in zip(norm, starts, strict=True) if w]


@pytest.mark.slow
async def test_word_times_survive_loss_and_reordering(
    edge: RunningEdge, worker, http, recording: bytes
) -> None:  # type: ignore[no-untyped-def]
    chunks = _chunks(recording)
    clean_plan = [(s * CHUNK_MS / 1000, s) for s in range(len(chunks))]
    lossy_plan, lost, late = _bad_network(len(chunks))
    clean, lossy = await asyncio.gather(
        _session(http, edge, chunks, clean_plan), _session(http, edge, chunks, lossy_plan)
    )

    # the device is told of exactly the chunks that were lost, where they were
    gaps = [e for e in lossy if isinstance(e, ev.Gap)]
    assert sum(g.lost_chunks for g in gaps) == len(lost)
    assert {g.first_seq + k for g in gaps for k in range(g.lost_chunks)} == lost
    for g in gaps:
        assert (g.t_ms, g.lost_ms) == (g.first_seq * CHUNK_MS, g.lost_chunks * CHUNK_MS), g
    assert not [e for e in clean if isinstance(e, ev.Gap)]
    # and, at CloseStream, of the chunks that came too late to be put back
    summary = [e for e in lossy if isinstance(e, ev.ChunkStats)][-1]
    assert (summary.lost_chunks, summary.late, summary.duplicates) == (len(lost), len(late), 0)
    assert summary.chunks == len(chunks) - len(lost) + len(late)
    assert summary.lost_ms == len(lost) * CHUNK_MS

    # the words land at the same times
    a, b = _words(clean), _words(lossy)
    assert len(a) >= 20, a  # "please turn on the lights in the kitchen what is ..."
    match = difflib.SequenceMatcher(a=[w for w, _ in a], b=[w for w, _ in b], autojunk=False)
    pairs = [(a[i + k], b[j + k]) for i, j, n in match.get_matching_blocks() for k in range(n)]
    assert len(pairs) >= 0.8 * len(a), (a, b)
    moved = [(wa, ta, tb) for (wa, ta), (_, tb) in pairs if abs(ta - tb) > 100]
    assert not moved, moved
