"""The session timeline: numbered chunks in, PCM in capture order out.

Devices that number their chunks (`AudioChunk.seq`, optionally `capture_ms`)
get loss and reordering repaired here: duplicates are dropped, late chunks
within the reorder window are put back in place, and a chunk given up as lost
is replaced by silence of its length, so every later timestamp stays true.
No I/O; fed by the edge, tested on its own.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from schemas.device import AudioChunk


@dataclass
class TimelineStats:
    chunks: int = 0
    duplicates: int = 0
    late: int = 0  # arrived after their place was filled with silence
    reordered: int = 0
    lost: int = 0
    silence_ms: float = 0.0


class TimelineGap(ValueError):
    """A device claims a gap too long to be loss (a jump in seq or capture_ms)."""


class Timeline:
    def __init__(self, sample_rate: int, reorder_chunks: int = 8, max_gap_ms: int = 10_000) -> None:
        self.max_gap_bytes = self._bytes_for_ms_at(max_gap_ms, sample_rate)
        self.sample_rate = sample_rate
        self.reorder_chunks = reorder_chunks
        self.stats = TimelineStats()
        self._next: int | None = None
        self._first = 0  # seq of the first chunk
        self._pending: dict[int, AudioChunk] = {}
        self._typical_len = 0  # bytes of a usual chunk, to size a lost one
        self._pos_bytes = 0  # bytes emitted so far
        self._origin_ms: int | None = None  # capture_ms of the first chunk
        # seqs given up as lost (recent gaps), to tell a late chunk from a duplicate
        self._lost: deque[range] = deque(maxlen=256)

    @staticmethod
    def _bytes_for_ms_at(ms: float, sample_rate: int) -> int:
        return int(ms * sample_rate / 1000) * 2

    def _bytes_for_ms(self, ms: float) -> int:
        return int(ms * self.sample_rate / 1000) * 2

    def push(self, chunk: AudioChunk) -> list[bytes]:
        self.stats.chunks += 1
        if self._next is None:
            self._next = self._first = chunk.seq
            if chunk.capture_ms is not None:
                self._origin_ms = chunk.capture_ms
        if chunk.seq < self._next:
            if chunk.seq < self._first or any(chunk.seq in gap for gap in self._lost):
                self.stats.late += 1
            else:
                self.stats.duplicates += 1  # already delivered
            return []
        if chunk.seq in self._pending:
            self.stats.duplicates += 1
            return []
        if chunk.seq != self._next:
            self.stats.reordered += 1
        self._pending[chunk.seq] = chunk
        out = self._drain()
        while len(self._pending) > self.reorder_chunks:
            out.extend(self._skip_to_first_pending())
            out.extend(self._drain())
        return out

    def flush(self) -> list[bytes]:
        """Give up on every gap: emit what is held, silence for what is missing."""
        out: list[bytes] = []
        while self._pending:
            out.extend(self._skip_to_first_pending())
            out.extend(self._drain())
        return out

    def _drain(self) -> list[bytes]:
        out = []
        assert self._next is not None
        while self._next in self._pending:
            chunk = self._pending.pop(self._next)
            if chunk.pcm:
                self._typical_len = max(self._typical_len, len(chunk.pcm))
            out.append(chunk.pcm)
            self._pos_bytes += len(chunk.pcm)
            self._next += 1
        return out

    def _skip_to_first_pending(self) -> list[bytes]:
        """Declare the chunks before the earliest held one lost; fill with silence."""
        assert self._next is not None
        first = min(self._pending)
        missing = first - self._next
        held = self._pending[first]
        if held.capture_ms is not None and self._origin_ms is not None:
            fill = self._bytes_for_ms(held.capture_ms - self._origin_ms) - self._pos_bytes
        else:
            fill = missing * self._typical_len
        fill = max(0, fill)
        if fill > self.max_gap_bytes:
            raise TimelineGap(
                f"chunk seq {first} would leave a gap of {fill / 2 / self.sample_rate:.1f} s "
                f"after seq {self._next - 1}; more than {self.max_gap_bytes / 2 / self.sample_rate:g} s is not loss"
            )
        self.stats.lost += missing
        if missing:
            self._lost.append(range(self._next, first))
        self.stats.silence_ms += fill / 2 / self.sample_rate * 1000
        self._pos_bytes += fill
        self._next = first
        return [bytes(fill)] if fill else []
