"""The session timeline: numbered chunks in, PCM in capture order out.

What a listener would notice: audio arrives byte-exact and in order whatever
the network did to it (within the jitter buffer, measured in audio time), and a
lost chunk becomes silence of its own length, so every later timestamp stays
true; the device is told where (`Gap`) and how many chunks came late.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loadtest.speech import SENTENCES, make_speech
from schemas.device import AudioChunk, ChunkStats, Gap
from services.edge.timeline import Timeline

RATE = 16000
CHUNK_MS = 20
CHUNK = RATE * CHUNK_MS // 1000 * 2  # bytes


@pytest.fixture(scope="session")
def speech_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("speech")


@pytest.fixture(scope="session")
def pcm(speech_cache: Path) -> bytes:
    """About 3 s of speech, onset to end, cut to whole 20 ms chunks."""
    speech = make_speech(SENTENCES[:1], speech_cache, RATE)
    (onset, offset), *_ = speech.spans
    start, n = int(onset * RATE) * 2, int((offset - onset) * RATE) * 2
    return speech.pcm[start : start + n // CHUNK * CHUNK]


def chunked(pcm: bytes, size: int = CHUNK, capture: bool = False) -> list[AudioChunk]:
    return [
        AudioChunk(
            seq=i // size,
            pcm=pcm[i : i + size],
            capture_ms=i // 2 * 1000 // RATE if capture else None,
        )
        for i in range(0, len(pcm), size)
    ]


def deliver(tl: Timeline, chunks: list[AudioChunk]) -> bytes:
    """Push everything, then flush; the timeline's whole output."""
    out = [p for c in chunks for p in tl.push(c)]
    return b"".join(out + tl.flush())


def silence_at(out: bytes, seq: int, size: int = CHUNK) -> bool:
    return out[seq * size : (seq + 1) * size] == bytes(size)


def test_in_order_passes_through_byte_exact(pcm: bytes) -> None:
    tl = Timeline(RATE)
    chunks = chunked(pcm)
    for c in chunks:
        assert tl.push(c) == [c.pcm]  # no added latency in order
    assert tl.flush() == []
    s = tl.stats
    assert (s.chunks, s.duplicates, s.late, s.reordered, s.lost) == (len(chunks), 0, 0, 0, 0)
    assert s.silence_ms == 0


def test_sequence_may_start_anywhere_and_sizes_may_vary(pcm: bytes) -> None:
    sizes = [2, 640, 2, 6, 320, 4096, 962]
    chunks, i = [], 0
    while i < len(pcm):
        n = sizes[len(chunks) % len(sizes)]
        chunks.append(AudioChunk(seq=10_000 + len(chunks), pcm=pcm[i : i + n]))
        i += n
    assert deliver(Timeline(RATE), chunks) == pcm


def test_duplicates_are_dropped(pcm: bytes) -> None:
    chunks = chunked(pcm)
    tl = Timeline(RATE)
    # each chunk twice at once, and the first ten again at the end (a resend)
    arrivals = [c for c in chunks for _ in range(2)] + chunks[:10]
    assert deliver(tl, arrivals) == pcm
    assert tl.stats.duplicates == len(chunks) + 10
    assert (tl.stats.late, tl.stats.lost) == (0, 0)


def test_a_duplicate_of_a_held_chunk_is_dropped(pcm: bytes) -> None:
    c = chunked(pcm)
    tl = Timeline(RATE)
    assert tl.push(c[0]) == [c[0].pcm]
    assert tl.push(c[2]) == [] and tl.push(c[2]) == []
    assert tl.push(c[1]) == [c[1].pcm, c[2].pcm]
    assert tl.stats.duplicates == 1 and tl.stats.reordered == 1


@pytest.mark.parametrize(("window", "jitter_ms"), [(1, 40), (4, 100), (9, 200), (4, 81)])
def test_reordering_within_the_window_is_repaired(pcm: bytes, window: int, jitter_ms: int) -> None:
    chunks = chunked(pcm)
    # every block of window+1 chunks arrives back to front: the first of each
    # block is overtaken by `window` later ones, less than jitter_ms of audio
    arrivals = []
    for i in range(0, len(chunks), window + 1):
        arrivals += reversed(chunks[i : i + window + 1])
    arrivals.remove(chunks[0])
    arrivals.insert(0, chunks[0])  # the stream's first chunk comes first
    tl = Timeline(RATE, jitter_ms=jitter_ms)
    assert deliver(tl, arrivals) == pcm
    assert (tl.stats.lost, tl.stats.late, tl.stats.duplicates) == (0, 0, 0)
    assert tl.stats.reordered > 0
    assert [r for r in tl.reports(0.0) if isinstance(r, Gap)] == []


def test_a_chunk_overtaken_by_jitter_ms_of_audio_is_late(pcm: bytes) -> None:
    """200 ms: chunk 1 is waited for until chunk 11 (starting 200 ms after it) arrives."""
    c = chunked(pcm)
    tl = Timeline(RATE, jitter_ms=200)
    assert tl.push(c[0]) == [c[0].pcm]
    assert [tl.push(c[k]) for k in range(2, 11)] == [[]] * 9  # 9 chunks held: 180 ms
    assert tl.push(c[11]) == [bytes(CHUNK)] + [c[k].pcm for k in range(2, 12)]
    assert tl.push(c[1]) == []
    assert (tl.stats.lost, tl.stats.late) == (1, 1)


def test_a_held_chunk_goes_out_as_soon_as_the_gap_closes(pcm: bytes) -> None:
    c = chunked(pcm)
    tl = Timeline(RATE)
    assert tl.push(c[0]) == [c[0].pcm]
    for k in (2, 3, 4):
        assert tl.push(c[k]) == []
    assert tl.push(c[1]) == [c[k].pcm for k in (1, 2, 3, 4)]


@pytest.mark.parametrize("capture", [False, True])
def test_a_lost_chunk_becomes_silence_of_its_length(pcm: bytes, capture: bool) -> None:
    chunks = chunked(pcm, capture=capture)
    lost = {5, 40, 41, 42, len(chunks) // 2}
    tl = Timeline(RATE, jitter_ms=80)
    out = deliver(tl, [c for c in chunks if c.seq not in lost])
    assert len(out) == len(pcm)  # every later timestamp stays true
    for c in chunks:
        expected = bytes(CHUNK) if c.seq in lost else c.pcm
        assert out[c.seq * CHUNK : (c.seq + 1) * CHUNK] == expected, c.seq
    assert tl.stats.lost == len(lost)
    assert tl.stats.silence_ms == pytest.approx(len(lost) * CHUNK_MS)


def test_loss_is_given_up_once_the_window_is_full(pcm: bytes) -> None:
    """No flush needed: a chunk starting jitter_ms past the gap releases it as silence."""
    c = chunked(pcm)
    tl = Timeline(RATE, jitter_ms=80)
    assert tl.push(c[0]) == [c[0].pcm]
    assert [tl.push(c[k]) for k in (2, 3, 4)] == [[], [], []]
    assert tl.push(c[5]) == [bytes(CHUNK)] + [c[k].pcm for k in (2, 3, 4, 5)]
    assert tl.stats.lost == 1


def test_capture_ms_sizes_a_lost_chunk_the_chunk_size_cannot(pcm: bytes) -> None:
    """A device that sends 20 ms chunks but lost a 100 ms one: capture_ms knows."""
    sizes_ms = [20, 20, 20, 100, 20, 20, 20, 20, 20, 20]
    chunks, t = [], 0
    for seq, ms in enumerate(sizes_ms):
        n = ms * RATE // 1000 * 2
        chunks.append(AudioChunk(seq=seq, pcm=pcm[t * 32 : t * 32 + n], capture_ms=t))
        t += ms
    sent = b"".join(c.pcm for c in chunks)
    tl = Timeline(RATE, jitter_ms=40)
    out = deliver(tl, [c for c in chunks if c.seq != 3])
    assert len(out) == len(sent)
    gap = slice(60 * 32, 160 * 32)
    assert out[gap] == bytes(100 * 32)
    assert out[: gap.start] == sent[: gap.start] and out[gap.stop :] == sent[gap.stop :]
    assert tl.stats.silence_ms == pytest.approx(100)


def test_without_capture_ms_a_lost_chunk_is_sized_like_the_others(pcm: bytes) -> None:
    chunks = chunked(pcm)
    del chunks[7:10]  # three in a row
    tl = Timeline(RATE, jitter_ms=40)
    out = deliver(tl, chunks)
    assert len(out) == len(pcm)
    assert all(silence_at(out, k) for k in (7, 8, 9))
    assert tl.stats.lost == 3


def test_a_late_chunk_after_its_gap_was_filled_is_dropped_and_counted(pcm: bytes) -> None:
    c = chunked(pcm)
    tl = Timeline(RATE, jitter_ms=60)
    out = tl.push(c[0]) + tl.push(c[2]) + tl.push(c[3]) + tl.push(c[4])
    assert out == [c[0].pcm, bytes(CHUNK), c[2].pcm, c[3].pcm, c[4].pcm]
    assert tl.push(c[1]) == []  # too late: its place is already silence
    assert tl.stats.late == 1 and tl.stats.duplicates == 0
    assert tl.push(c[5]) == [c[5].pcm]  # and the stream goes on
    # resending a chunk that was delivered is a duplicate, not a late one
    assert tl.push(c[3]) == []
    assert tl.stats.late == 1 and tl.stats.duplicates == 1


def test_a_chunk_from_before_the_first_is_late(pcm: bytes) -> None:
    c = chunked(pcm)
    tl = Timeline(RATE)
    assert tl.push(c[1]) == [c[1].pcm]
    assert tl.push(c[0]) == []
    assert tl.stats.late == 1 and tl.stats.duplicates == 0


def test_flush_gives_up_on_every_gap(pcm: bytes) -> None:
    c = chunked(pcm)
    tl = Timeline(RATE)
    out = [p for k in (0, 1, 3, 4, 7) for p in tl.push(c[k])]
    assert out == [c[0].pcm, c[1].pcm]  # 3, 4 and 7 wait for their gaps
    assert tl.flush() == [bytes(CHUNK), c[3].pcm, c[4].pcm, bytes(2 * CHUNK), c[7].pcm]
    assert tl.flush() == []
    assert tl.stats.lost == 3
    # after a flush the stream goes on where it was
    assert tl.push(c[8]) == [c[8].pcm]
    assert tl.push(c[2]) == [] and tl.stats.late == 1


def test_flush_with_nothing_held_is_empty() -> None:
    tl = Timeline(RATE)
    assert tl.flush() == []
    assert tl.push(AudioChunk(seq=0, pcm=bytes(CHUNK))) == [bytes(CHUNK)]
    assert tl.flush() == []


def test_gaps_and_late_chunks_are_reported(pcm: bytes) -> None:
    """A `Gap` for each silence filled, where it is on the session timeline; late and
    duplicate chunks in `ChunkStats`, at most once a second, and always at the end."""
    c = chunked(pcm)
    tl = Timeline(RATE, jitter_ms=40, start_ms=5000)  # a resumed session: 5 s before
    for k in (0, 1, 4, 5, 6):  # 2 and 3 lost
        tl.push(c[k])
    assert tl.reports(10.0) == [Gap(t_ms=5040, lost_ms=40, lost_chunks=2, first_seq=2)]
    assert tl.reports(10.0) == []  # each reported once
    tl.push(c[2])  # late
    (stats,) = tl.reports(10.1)
    assert isinstance(stats, ChunkStats) and (stats.late, stats.duplicates) == (1, 0)
    tl.push(c[3])
    tl.push(c[5])
    assert tl.reports(10.5) == []  # within a second of the last
    (stats,) = tl.reports(11.2)
    assert (stats.late, stats.duplicates, stats.lost_chunks, stats.lost_ms) == (2, 1, 2, 40)
    assert tl.reports(12.5) == []  # nothing new
    (stats,) = tl.reports(12.6, final=True)
    assert (stats.chunks, stats.reordered) == (8, 1)


def test_tiny_chunks_are_held_in_bounded_number() -> None:
    """One-sample chunks behind a gap: the buffer gives up after max_held chunks."""
    tl = Timeline(RATE, jitter_ms=2000, max_held=64)
    tl.push(AudioChunk(seq=0, pcm=bytes(2)))
    for seq in range(2, 200):
        tl.push(AudioChunk(seq=seq, pcm=bytes(2)))
        assert len(tl._pending) <= 64
    assert tl.stats.lost == 1


# --- property: whatever the network does --------------------------------------


@st.composite
def network(draw: st.DrawFn) -> dict:
    """Chunks 0..n-1 as a network might deliver them: late, lost or twice."""
    n = draw(st.integers(1, 80))
    window = draw(st.integers(0, 10))  # how far a chunk may be overtaken
    delays = draw(st.lists(st.integers(0, window), min_size=n, max_size=n))
    lost = draw(st.sets(st.integers(1, n - 1), max_size=n // 3)) if n > 1 else set()
    dups = draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, 3 * window + 3))))
    keyed = [(-1.0, 0)] + [(s + delays[s], s) for s in range(1, n) if s not in lost]
    keyed += [(s + d + 0.5, s) for s, d in dups if s not in lost]
    return {
        "arrivals": [s for _, s in sorted(keyed)],
        "window": window,
        "jitter_ms": draw(st.integers(0, 400)),
        "chunk_ms": draw(st.integers(1, 40)),
        "capture": draw(st.booleans()),
        "lost": lost,
    }


@settings(max_examples=300, deadline=None)
@given(net=network())
def test_every_byte_lands_at_its_place(net: dict) -> None:
    size = net["chunk_ms"] * RATE // 1000 * 2

    def chunk(seq: int) -> AudioChunk:
        pcm = np.full(size // 2, seq + 1, np.int16).tobytes()  # never silence
        capture_ms = seq * net["chunk_ms"] if net["capture"] else None
        return AudioChunk(seq=seq, pcm=pcm, capture_ms=capture_ms)

    tl = Timeline(RATE, jitter_ms=net["jitter_ms"])
    held = 0  # the most audio the buffer held at once
    out_parts = []
    for s in net["arrivals"]:
        out_parts += tl.push(chunk(s))
        held = max(held, tl._pending_bytes)
    out = b"".join(out_parts + tl.flush())
    # bounded: jitter_ms of audio (and the chunk that ends it) at most
    assert held < tl.jitter_bytes + size

    top = max(net["arrivals"])
    assert len(out) == (top + 1) * size
    delivered = set()
    for seq in range(top + 1):
        place = out[seq * size : (seq + 1) * size]
        if place == chunk(seq).pcm:
            delivered.add(seq)
        else:
            assert place == bytes(size), f"chunk {seq}: neither its bytes nor silence"
    assert delivered <= set(net["arrivals"])
    if not net["lost"] and (net["window"] - 1) * net["chunk_ms"] < net["jitter_ms"]:
        assert delivered == set(range(top + 1))  # repaired, byte-exact

    s = tl.stats
    arrivals = net["arrivals"]
    assert s.chunks == len(arrivals)
    assert s.lost == top + 1 - len(delivered)
    assert s.silence_ms == pytest.approx(s.lost * net["chunk_ms"])
    assert s.late == sum(1 for a in arrivals if a not in delivered)
    assert s.duplicates == sum(arrivals.count(d) - 1 for d in delivered)
    # every silence filled was reported, where it is on the timeline
    gaps = [r for r in tl.reports(0.0) if isinstance(r, Gap)]
    assert sum(g.lost_chunks for g in gaps) == s.lost
    for g in gaps:
        assert g.t_ms == g.first_seq * net["chunk_ms"]
        assert g.lost_ms == g.lost_chunks * net["chunk_ms"]


def test_capture_ms_that_never_advances_cannot_hold_audio_forever(pcm: bytes) -> None:
    """A device that leaves out one chunk and stamps every later one capture_ms=0
    would keep the gap open forever: held audio stays within the jitter buffer."""
    tl = Timeline(RATE, jitter_ms=200)
    chunks = [AudioChunk(seq=c.seq, pcm=c.pcm, capture_ms=0) for c in chunked(pcm)]
    held_max = 0
    for c in chunks[:1] + chunks[2:]:  # seq 1 never comes
        tl.push(c)
        held_max = max(held_max, tl._pending_bytes)
    assert held_max <= tl.jitter_bytes + 3 * CHUNK
