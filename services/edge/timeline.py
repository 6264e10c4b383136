"""The session timeline: numbered chunks in, PCM in capture order out.

Devices that number their chunks (`AudioChunk.seq`, optionally `capture_ms`)
get loss and reordering repaired here, by a jitter buffer measured in audio
time:

- A chunk that arrives after a later one is held back and put in its place.
- A missing chunk is waited for until a chunk that starts `jitter_ms` or more
  after the missing one's place has arrived (so a chunk overtaken by less
  than `jitter_ms` of audio is put back). Then it is given up as lost and
  replaced by silence of its length (from `capture_ms` when the device sends
  it, else the size of the usual chunk), so every later timestamp stays true,
  and a `Gap` event says where and how much.
- A chunk that arrives after its place was filled with silence is late: it is
  counted, never spliced in; so is a duplicate. `ChunkStats` reports the counts.

Measured in audio rather than wall-clock time, the rule needs no timer and is
deterministic: the same arrivals give the same timeline. A device streaming in
real time waits at most `jitter_ms` (plus one chunk) for a lost chunk. What is
held is bounded by `jitter_ms` of audio plus two chunks (counted in bytes, whatever
`capture_ms` claims), and by `max_held` chunks.
No I/O; fed by the edge, tested on its own.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from schemas.device import AudioChunk, ChunkStats, Gap

MAX_HELD_CHUNKS = 1024  # tiny chunks must not make the buffer's bookkeeping unbounded
STATS_EVERY_S = 1.0  # late or duplicate chunks are reported at most this often


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
    def __init__(
        self,
        sample_rate: int,
        jitter_ms: int = 200,
        max_gap_ms: int = 10_000,
        start_ms: int = 0,
        max_held: int = MAX_HELD_CHUNKS,
    ) -> None:
        self.max_gap_bytes = self._bytes_for_ms_at(max_gap_ms, sample_rate)
        self.sample_rate = sample_rate
        self.jitter_ms = jitter_ms
        self.jitter_bytes = self._bytes_for_ms_at(jitter_ms, sample_rate)
        self.max_held = max(1, max_held)
        self.start_ms = start_ms  # session time of the first byte out (a resumed session)
        self.stats = TimelineStats()
        self._next: int | None = None
        self._first = 0  # seq of the first chunk
        self._pending: dict[int, AudioChunk] = {}
        self._pending_bytes = 0
        self._typical_len = 0  # bytes of a usual chunk, to size a lost one
        self._pos_bytes = 0  # bytes emitted so far
        self._origin_ms: int | None = None  # capture_ms of the first chunk
        # seqs given up as lost (recent gaps), to tell a late chunk from a duplicate
        self._lost: deque[range] = deque(maxlen=256)
        self._gaps: list[Gap] = []  # filled since the last `reports`
        self._reported: tuple[int, int] = (0, 0)  # (late, duplicates) last reported
        self._reported_at: float | None = None

    @staticmethod
    def _bytes_for_ms_at(ms: float, sample_rate: int) -> int:
        return int(ms * sample_rate / 1000) * 2

    def _bytes_for_ms(self, ms: float) -> int:
        return int(ms * self.sample_rate / 1000) * 2

    def _ms(self, n_bytes: int) -> float:
        return n_bytes / 2 / self.sample_rate * 1000

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
        self._pending_bytes += len(chunk.pcm)
        self._typical_len = max(self._typical_len, len(chunk.pcm))
        out = self._drain()
        while self._pending and (
            self._overdue()
            or len(self._pending) > self.max_held
            # bytes too: `capture_ms` that never advances must not hold audio forever
            or self._pending_bytes > self.jitter_bytes + 2 * self._typical_len
        ):
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

    def reports(self, now: float, final: bool = False) -> list[Gap | ChunkStats]:
        """What the device is told: a `Gap` for each gap filled since the last call, and
        `ChunkStats` when late or duplicate chunks came in (at most every STATS_EVERY_S)
        or, with `final`, the counts so far."""
        out: list[Gap | ChunkStats] = list(self._gaps)
        self._gaps.clear()
        s = self.stats
        counts = (s.late, s.duplicates)
        due = counts != self._reported and (
            self._reported_at is None or now - self._reported_at >= STATS_EVERY_S
        )
        if (final and s.chunks) or due:
            self._reported, self._reported_at = counts, now
            out.append(
                ChunkStats(
                    chunks=s.chunks,
                    reordered=s.reordered,
                    late=s.late,
                    duplicates=s.duplicates,
                    lost_chunks=s.lost,
                    lost_ms=round(s.silence_ms),
                )
            )
        return out

    def _overdue(self) -> bool:
        """Whether the gap at `_next` is given up: a chunk starting `jitter_ms` or more
        after the gap's start has arrived."""
        assert self._next is not None
        newest = self._pending[max(self._pending)]
        if newest.capture_ms is not None and self._origin_ms is not None:
            start = self._bytes_for_ms(newest.capture_ms - self._origin_ms) - self._pos_bytes
        else:  # what is held, and usual chunks for the seqs still missing
            missing = max(self._pending) - self._next + 1 - len(self._pending)
            start = self._pending_bytes - len(newest.pcm) + missing * self._typical_len
        return start >= self.jitter_bytes

    def _drain(self) -> list[bytes]:
        out = []
        assert self._next is not None
        while self._next in self._pending:
            chunk = self._pending.pop(self._next)
            self._pending_bytes -= len(chunk.pcm)
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
            self._gaps.append(
                Gap(
                    t_ms=self.start_ms + round(self._ms(self._pos_bytes)),
                    lost_ms=round(self._ms(fill)),
                    lost_chunks=missing,
                    first_seq=self._next,
                )
            )
            del self._gaps[: max(0, len(self._gaps) - 256)]  # bounded if nobody asks
        self.stats.silence_ms += self._ms(fill)
        self._pos_bytes += fill
        self._next = first
        return [bytes(fill)] if fill else []
