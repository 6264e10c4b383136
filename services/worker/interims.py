"""Interim looks: decoded only when no final waits, dropped when stale, never retried.

The edge publishes a look at speech still going on to `ASR_INTERIMS`, a memory
stream that keeps one message per session subject (`max_msgs_per_subject: 1`,
discard old): a newer look replaces one still waiting, so at most one look per
session is ever queued. The worker asks for a look only after a fetch of
finals came back empty, so finals always go first; a look that waited longer
than `interim_max_age_s` is acked unread (stale: the device has moved on).
The answer goes out on core NATS (`asr.partials.<edge>.<session>`), never
stored; the edge drops any that arrives after its utterance's Final.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Awaitable, Callable

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext

from jetstream import subjects
from schemas.pipeline import Segment, decode_segment, encode_result
from services.worker.engines import Transcription, result_of

log = logging.getLogger(__name__)

Decode = Callable[[Segment], Awaitable[tuple[Transcription, str]]]


class InterimLooks:
    def __init__(
        self,
        nc: NATS,
        decode: Decode,
        max_age_s: float,
        poll_s: float,
        consumer: str = subjects.CONSUMER_INTERIMS,
    ) -> None:
        self.nc = nc
        self.consumer = consumer  # the worker's lane's
        self.js: JetStreamContext = nc.jetstream()
        self.decode = decode  # the worker's engine, on its executor: (transcription, engine)
        self.max_age_s = max_age_s
        self.poll_s = poll_s
        self._psub: JetStreamContext.PullSubscription | None = None
        self.stats = {"looks": 0, "stale": 0, "failed": 0}

    async def start(self) -> None:
        self._psub = await self.js.pull_subscribe_bind(
            self.consumer, stream=subjects.STREAM_INTERIMS
        )

    async def stop(self) -> None:
        if self._psub is None or self.nc.is_closed:
            return
        try:
            await self._psub.unsubscribe()
        except NatsError as exc:
            log.warning("could not unsubscribe from interim looks: %r", exc)

    async def take(self) -> Msg | None:
        """One waiting look, if any (waits at most `poll_s`)."""
        if self._psub is None:
            return None
        try:
            [msg] = await self._psub.fetch(1, timeout=self.poll_s)
        except TimeoutError:  # nats' own, or the plain one a fetch raises between its pulls
            return None
        except NatsError as exc:
            log.info("interim fetch failed: %r", exc)
            return None
        return msg

    async def handle(self, msg: Msg) -> None:
        age = datetime.datetime.now(datetime.UTC) - msg.metadata.timestamp
        try:
            if age.total_seconds() > self.max_age_s:
                self.stats["stale"] += 1
                return
            try:
                segment = decode_segment(msg.data)
                subjects.check_token(segment.edge_id)
                subjects.check_token(segment.session_id)
            except (msgspec.DecodeError, msgspec.ValidationError, subjects.InvalidToken) as exc:
                log.warning("undecodable interim look on %s: %s", msg.subject, exc)
                self.stats["failed"] += 1
                return
            try:
                transcription, engine = await self.decode(segment)
            except Exception as exc:  # noqa: BLE001 - a look is never retried: a newer one follows
                log.info("interim look of %s failed: %r", segment.session_id, exc)
                self.stats["failed"] += 1
                return
            result = result_of(segment, transcription, engine)
            await self.nc.publish(
                subjects.partials_subject(segment.edge_id, segment.session_id),
                encode_result(result),
            )
            self.stats["looks"] += 1
        finally:
            try:
                await msg.ack()
            except NatsError as exc:
                log.info("interim look not acked: %r", exc)
