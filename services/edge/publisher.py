"""Queue a session's segments on JetStream, in order, through NATS outages.

One task per session drains a queue: a final segment is retried through an
outage for up to `outage_buffer_s` (dedup by `Nats-Msg-Id` makes retries
safe), then reported as failed; an interim look is tried once and dropped on
any failure (a newer one follows). Bounded: audio waiting to be queued may
not exceed `buffer_bytes`; beyond that a final is refused at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nats.errors import Error as NatsError
from nats.errors import MaxPayloadError
from nats.js import JetStreamContext
from nats.js.errors import APIError

from jetstream import subjects
from observability.tracing import get_tracer, inject_headers
from schemas.pipeline import Segment, Withdrawn, encode_segment, encode_withdrawn

log = logging.getLogger(__name__)
tracer = get_tracer("escapement.edge")


@dataclass(frozen=True, slots=True)
class PublishFailure:
    segment: Segment
    # queue_refused | segment_too_large | publish_failed | publish_buffer_full | duplicate_segment
    code: str
    message: str
    overloaded: bool = False  # JetStream's own limits: tell the device `Overloaded`


@dataclass(frozen=True, slots=True)
class _Queued:
    segment: Segment
    queued_at: float


class SegmentPublisher:
    def __init__(
        self,
        js: JetStreamContext,
        *,
        outage_buffer_s: float,
        publish_timeout_s: float,
        buffer_bytes: int,
        on_failure: Callable[[PublishFailure], None],
        on_published: Callable[[Segment], Awaitable[None]],
        notify: Callable[[str, bytes], Awaitable[None]] | None = None,
    ) -> None:
        self.js = js
        self.notify = notify  # core NATS publish: a withdrawn candidate's notice to workers
        self.outage_buffer_s = outage_buffer_s
        self.publish_timeout_s = publish_timeout_s
        self.buffer_bytes = buffer_bytes
        self.on_failure = on_failure
        self.on_published = on_published
        self._queue: asyncio.Queue[_Queued | tuple[int, int] | None] = asyncio.Queue()
        self._bytes = 0
        self.published = 0
        self.retries = 0
        self.interims_dropped = 0
        self.duplicates = 0
        self.withdrawn = 0
        # stream sequence of recent finals, by (number, revision): a void candidate
        # still waiting for a worker can be taken back out of the queue
        self._seqs: dict[tuple[int, int], int] = {}
        self._session: tuple[str, str] | None = None  # (edge id, session id) of its segments

    def enqueue(self, segment: Segment) -> None:
        size = len(segment.pcm) + len(segment.context_pcm)
        if segment.final and self._bytes + size > self.buffer_bytes:
            message = f"segment {segment.segment} could not be queued: buffer full"
            self.on_failure(PublishFailure(segment, "publish_buffer_full", message))
            return
        if not segment.final and self._bytes + size > self.buffer_bytes // 2:
            self.interims_dropped += 1  # behind on finals: an interim look can wait
            return
        self._bytes += size
        self._queue.put_nowait(_Queued(segment, time.monotonic()))

    def withdraw(self, number: int, revision: int) -> None:
        """A void candidate: taken back out of the queue, in order after its publish."""
        self._queue.put_nowait((number, revision))

    def close(self) -> None:
        """No more segments: the task ends once the queue is empty."""
        self._queue.put_nowait(None)

    async def run(self) -> None:
        try:
            while True:
                item = await self._queue.get()
                if item is None:
                    return
                if isinstance(item, tuple):
                    await self._withdraw(*item)
                    continue
                try:
                    if item.segment.final:
                        await self._publish_final(item)
                    else:
                        await self._publish_interim(item.segment)
                finally:
                    self._bytes -= len(item.segment.pcm) + len(item.segment.context_pcm)
        except asyncio.CancelledError:
            # out of time (the session is closing): whatever is still waiting is told, not lost
            while not self._queue.empty():
                left = self._queue.get_nowait()
                if isinstance(left, _Queued) and left.segment.final:
                    number = left.segment.segment
                    message = f"segment {number} could not be queued"
                    self.on_failure(PublishFailure(left.segment, "publish_failed", message))
            raise

    async def purge_interims(self, session_id: str, edge_id: str, model: str = "") -> None:
        """Interrupt: interim looks still waiting for a worker are dropped."""
        lane = subjects.lane_of_model(model)
        try:
            await self.js.purge_stream(
                subjects.STREAM_INTERIMS,
                subject=subjects.interims_subject(edge_id, session_id, lane),
            )
        except (NatsError, TimeoutError) as exc:
            log.info("session %s: pending interims not purged: %r", session_id, exc)

    async def _withdraw(self, number: int, revision: int) -> bool:
        """Take a void candidate out of the queue if no worker has finished it yet, and
        say so on core NATS: a worker decoding it stops after the encoder (its result
        would be ignored anyway)."""
        seq = self._seqs.pop((number, revision), None)
        if seq is None or self._session is None:
            return False
        try:
            removed = await self.js.delete_msg(subjects.STREAM_SEGMENTS, seq)
        except APIError as exc:  # already acked by a worker: gone from the work queue
            log.debug("void segment %d-%d not withdrawn: %s", number, revision, exc.description)
            return False
        except (NatsError, TimeoutError) as exc:
            log.info("void segment %d-%d not withdrawn: %r", number, revision, exc)
            return False
        if not removed:
            return False
        self.withdrawn += 1
        if self.notify is not None:
            edge_id, session_id = self._session
            notice = Withdrawn(session_id=session_id, segment=number, revision=revision)
            try:
                await self.notify(
                    subjects.withdrawn_subject(edge_id, session_id), encode_withdrawn(notice)
                )
            except NatsError as exc:  # a worker decoding it finishes it; nothing is lost
                log.info("void segment %d-%d: no notice to workers: %r", number, revision, exc)
        return True

    async def _publish_interim(self, segment: Segment) -> None:
        lane = subjects.lane_of_model(segment.model)
        subject = subjects.interims_subject(segment.edge_id, segment.session_id, lane)
        headers = {
            subjects.Header.TENANT: segment.tenant,
            subjects.Header.SESSION: segment.session_id,
        }
        try:
            await self.js.publish(
                subject, encode_segment(segment), headers=headers, timeout=self.publish_timeout_s
            )
        except (NatsError, TimeoutError) as exc:
            self.interims_dropped += 1
            log.debug("interim of %s:%d dropped: %r", segment.session_id, segment.segment, exc)

    async def _publish_final(self, item: _Queued) -> None:
        segment = item.segment
        number = segment.segment
        headers = {
            subjects.Header.MSG_ID: subjects.segment_msg_id(
                segment.session_id, number, segment.revision
            ),
            subjects.Header.TENANT: segment.tenant,
            subjects.Header.SESSION: segment.session_id,
        }
        payload = encode_segment(segment)
        lane = subjects.lane_of_model(segment.model)
        subject = subjects.segments_subject(segment.edge_id, segment.session_id, lane)
        with tracer.start_as_current_span(
            "segment.publish",
            attributes={
                "escapement.session": segment.session_id,
                "escapement.segment": number,
                "escapement.tenant": segment.tenant,
            },
        ):
            inject_headers(headers)
            retried = False  # a duplicate after a retry is our own earlier attempt, stored
            while True:
                try:
                    left = self.outage_buffer_s - (time.monotonic() - item.queued_at)
                    timeout = max(1.0, min(self.publish_timeout_s, left))
                    ack = await self.js.publish(subject, payload, headers=headers, timeout=timeout)
                    if ack.duplicate and not retried:
                        # Someone else queued this number first (another socket of the session):
                        # JetStream dropped ours. Never silent: the device hears of it.
                        self.duplicates += 1
                        message = (
                            f"segment {number} was already queued by another connection of "
                            "this session; this audio was not queued"
                        )
                        self.on_failure(PublishFailure(segment, "duplicate_segment", message))
                        return
                    self._seqs[(number, segment.revision)] = ack.seq
                    self._session = (segment.edge_id, segment.session_id)
                    while len(self._seqs) > 64:
                        del self._seqs[next(iter(self._seqs))]
                    break
                except APIError as exc:  # JetStream's own limits (discard: new)
                    message = f"the queue refused segment {number}: {exc.description}"
                    self.on_failure(PublishFailure(segment, "queue_refused", message, True))
                    return
                except MaxPayloadError as exc:  # not an outage: it will never fit
                    message = f"segment {number}: {exc}"
                    self.on_failure(PublishFailure(segment, "segment_too_large", message))
                    return
                except (NatsError, TimeoutError) as exc:
                    waited = time.monotonic() - item.queued_at
                    if waited >= self.outage_buffer_s:
                        why = type(exc).__name__
                        message = f"segment {number} could not be queued for {waited:.0f} s ({why})"
                        self.on_failure(PublishFailure(segment, "publish_failed", message))
                        return
                    self.retries += 1
                    retried = True
                    await asyncio.sleep(min(0.5, self.outage_buffer_s - waited))
        self.published += 1
        await self.on_published(segment)
