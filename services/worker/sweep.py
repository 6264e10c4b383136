"""The dead-letter sweep: nothing leaves the queue unannounced.

Two kinds of segment can sit in ASR_SEGMENTS with nobody about to answer:

- **Exhausted**: its last allowed delivery went unanswered (every worker that
  held it died or stalled past `ack_wait`). The server stops redelivering it
  and says so once, in a MAX_DELIVERIES advisory on core NATS, which
  `DeadLetters.on_max_deliveries` acts on. An advisory can be lost, and a bury
  can fail; the segment then stays in the work queue, undelivered, until
  `max_age` deletes it.
- **Expiring**: it is about to reach the stream's `max_age` (1 h), after which
  the server deletes it without a word, delivered or not (a backlog, a
  paused or wedged consumer).

Every `sweep_every_s` (10 s) each worker looks at the queue's own state and
dead-letters both kinds through `DeadLetters.give_up_on`, the advisory's own
path: ASR_DEAD keeps one copy (its Nats-Msg-Id is the stream sequence), the
device gets one `ErrorResult` (deduplicated by the result's Nats-Msg-Id) and
the segment is deleted from the queue. So the sweep needs no owner: every
worker runs it, at a random phase, and two that find the same segment, or the
sweep and the advisory, bury it once.

Finding exhausted segments. Per consumer (`workers`, `file-workers`), a
message of its subjects still in the work queue is either not delivered yet
(`num_pending`), delivered and awaiting its answer (`num_ack_pending`, naks
waiting for their redelivery included), or exhausted: the server drops a
message from the ack-pending set once it has used up `max_deliver`. So

    exhausted = messages on the consumer's subjects - num_pending - num_ack_pending

and only when that is above zero are messages read. The count and the
consumer's figures come from separate requests: a segment published between
them is counted and not yet pending, one acked between them is counted and no
longer pending. So the consumer is read before the count and after it, and
the larger figure is taken. Among those delivered (stream sequence up to
`delivered.stream_seq`), one at or below the ack floor is certainly exhausted
(everything up to the floor was answered or given up). Above the floor the
server does not say which are still awaiting an answer (an exhausted segment
stays above it), so the oldest (the count of them) are buried once they have
been candidates for `sweep_settle_s`, sweep after sweep: a count thrown by
publishes and acks around it never lasts that long, and a segment exhausted
early sits below ones delivered after it. The cost while nothing is stuck: one stream info and, per
consumer, two consumer infos and one filtered stream info per sweep; no
message is read.

Finding expiring segments: the oldest message's timestamp (read once per
first sequence), then messages in order while older than `max_age` minus
`sweep_expiry_margin_s` (at most half of `max_age`). Each sweep reads at most
`sweep_max_scan` messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import NotFoundError

from jetstream import subjects
from services.worker.deadletter import EXPIRED, MAX_DELIVERIES, DeadLetters

log = logging.getLogger(__name__)

# The consumers whose exhausted segments the sweep finds (both on ASR_SEGMENTS).
CONSUMERS = (subjects.CONSUMER_WORKERS, subjects.CONSUMER_FILES)


@dataclass
class SweepStats:
    sweeps: int = 0
    exhausted: int = 0  # dead-lettered as exhausted
    expired: int = 0  # dead-lettered before max_age
    failures: int = 0  # sweeps that NATS cut short
    last: dict[str, int] = field(default_factory=dict)  # what the last sweep found


def _held(ci: js_api.ConsumerInfo) -> int:
    """Messages a consumer still holds: not delivered yet, or awaiting their answer."""
    return (ci.num_pending or 0) + (ci.num_ack_pending or 0)


def stamp(when: datetime | None) -> float | None:
    """A stored message's time (nats-py parses it, in UTC) as Unix seconds."""
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


class Sweep:
    """Dead-letters exhausted and expiring segments of ASR_SEGMENTS (see the module doc)."""

    def __init__(
        self,
        js: JetStreamContext,
        dead: DeadLetters,
        every_s: float = 10.0,
        expiry_margin_s: float = 300.0,
        settle_s: float = 30.0,
        max_scan: int = 1000,
        consumers: tuple[str, ...] = CONSUMERS,
    ) -> None:
        self.js = js
        self.consumers = consumers  # the lane's: each worker sweeps its own model's
        self.dead = dead
        self.every_s = every_s
        self.expiry_margin_s = expiry_margin_s
        self.settle_s = settle_s
        self.max_scan = max(1, max_scan)
        self.stats = SweepStats()
        # consumer -> {seq: when first seen as maybe exhausted}
        self._candidates: dict[str, dict[int, float]] = {}
        self._first: tuple[int, float | None] = (0, None)  # (first seq, its timestamp)

    async def run(self, stop: asyncio.Event) -> None:
        """Sweep every `every_s` (at a random phase, so workers spread out) until `stop`.

        An unexpected exception ends it; the worker runs it supervised
        (services/common/supervise.py), which logs, counts and restarts it."""
        pause = random.uniform(0, self.every_s)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=pause)
            if stop.is_set():
                return
            pause = self.every_s
            try:
                await self.sweep_once()
            except (NatsError, TimeoutError) as exc:  # an outage: the next sweep retries
                self.stats.failures += 1
                log.warning("dead-letter sweep cut short (%r); next in %g s", exc, self.every_s)
            # anything else ends this run: the worker supervises it and starts it again

    async def sweep_once(self) -> dict[str, int]:
        """One look at the queue; what was dead-lettered, by reason."""
        info = await self.js.stream_info(subjects.STREAM_SEGMENTS)
        found = {MAX_DELIVERIES: 0, EXPIRED: 0}
        if info.state.messages:
            found[EXPIRED] = await self._expiring(info)
            for name in self.consumers:
                found[MAX_DELIVERIES] += await self._exhausted(name, info.state.first_seq)
        else:
            self._candidates.clear()
        self.stats.sweeps += 1
        self.stats.exhausted += found[MAX_DELIVERIES]
        self.stats.expired += found[EXPIRED]
        self.stats.last = found
        return found

    # --- exhausted ------------------------------------------------------------

    async def _exhausted(self, consumer: str, first_seq: int) -> int:
        try:
            ci = await self.js.consumer_info(subjects.STREAM_SEGMENTS, consumer)
        except NotFoundError:
            return 0  # an older deployment without it
        filter_subject = ci.config.filter_subject or ">"
        queued = await self._count(filter_subject)
        # The count and the consumer's figures cannot be read at one instant. A segment
        # published in between is counted but not yet pending, one acked in between is
        # counted but no longer pending: a figure read before the count and one read
        # after bracket both, and the larger one counts no live segment as stuck.
        try:
            after = await self.js.consumer_info(subjects.STREAM_SEGMENTS, consumer)
        except NotFoundError:
            return 0
        held = max(_held(ci), _held(after))
        ci = after
        stuck = queued - held
        delivered = ci.delivered.stream_seq if ci.delivered else 0
        if stuck <= 0 or not delivered:
            self._candidates.pop(consumer, None)
            return 0
        floor = ci.ack_floor.stream_seq if ci.ack_floor else 0
        seen = await self._read(first_seq, delivered, filter_subject)
        certain = [m for m in seen if (m.seq or 0) <= floor]
        maybe = [m for m in seen if (m.seq or 0) > floor]
        now = time.monotonic()
        before = self._candidates.get(consumer, {})
        since = {m.seq or 0: before.get(m.seq or 0, now) for m in maybe}
        self._candidates[consumer] = since
        # Above the floor, the oldest `left` of them, once they have stayed candidates a
        # while: even a count that says all of them are exhausted may have been thrown by
        # segments published and acked around it, and one of them may be being decoded.
        left = stuck - len(certain)
        oldest = maybe[: max(0, left)]
        chosen = certain + [m for m in oldest if now - since[m.seq or 0] >= self.settle_s]
        max_deliver = ci.config.max_deliver or 0
        buried = 0
        for m in chosen:
            seq = m.seq or 0
            reason = (
                f"no answer in {max_deliver} deliveries: each worker holding it died or "
                "stalled past ack_wait (found by the dead-letter sweep)"
            )
            if await self.dead.give_up_on(seq, max_deliver, MAX_DELIVERIES, reason, raw=m):
                buried += 1
            since.pop(seq, None)
        if buried:
            log.warning("sweep: %d exhausted segment(s) on %s dead-lettered", buried, consumer)
        return buried

    async def _count(self, filter_subject: str) -> int:
        """Messages of ASR_SEGMENTS on `filter_subject` (counted by the server, none read)."""
        info = await self.js.stream_info(subjects.STREAM_SEGMENTS, subjects_filter=filter_subject)
        return sum((info.state.subjects or {}).values())

    async def _read(self, first: int, last: int, filter_subject: str) -> list[js_api.RawStreamMsg]:
        """The messages on `filter_subject` with sequences `first`..`last` (bounded)."""
        out: list[js_api.RawStreamMsg] = []
        seq = max(1, first)
        while seq <= last and len(out) < self.max_scan:
            try:
                raw = await self.js.get_msg(
                    subjects.STREAM_SEGMENTS, seq, subject=filter_subject, next=True
                )
            except NotFoundError:
                break
            if (raw.seq or 0) > last:
                break
            out.append(raw)
            seq = (raw.seq or seq) + 1
        return out

    # --- expiring -------------------------------------------------------------

    async def _expiring(self, info: js_api.StreamInfo) -> int:
        max_age = info.config.max_age or 0.0
        if max_age <= 0:
            return 0
        margin = min(self.expiry_margin_s, max_age / 2)
        cutoff = time.time() - (max_age - margin)
        first = info.state.first_seq
        if self._first[0] == first and self._first[1] is not None and self._first[1] > cutoff:
            return 0  # the oldest message is the one seen before, and it is young enough
        buried = 0
        seq = first
        for _ in range(self.max_scan):
            try:
                raw = await self.js.get_msg(subjects.STREAM_SEGMENTS, seq, subject=">", next=True)
            except NotFoundError:
                break
            when = stamp(raw.time)
            seq = (raw.seq or seq) + 1
            if when is not None and when > cutoff:
                self._first = (raw.seq or 0, when)
                break
            waited = (time.time() - when) / 60 if when is not None else max_age / 60
            reason = (
                f"waited {waited:.0f} min in the queue with no worker answering; the queue "
                f"deletes segments after {max_age / 60:g} min"
            )
            if await self.dead.give_up_on(raw.seq or 0, 0, EXPIRED, reason, raw=raw):
                buried += 1
        if buried:
            log.warning("sweep: %d segment(s) near max_age dead-lettered", buried)
        return buried
