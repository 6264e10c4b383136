"""Dead letters: segments no worker could transcribe, kept on ASR_DEAD.

A segment becomes a dead letter in one of two ways:

- a worker gives up on it (undecodable payload, `PoisonSegment`, or the last
  allowed delivery failed): `DeadLetters.bury`, then the worker terms it;
- nobody ever answered its last delivery (the worker holding it died or
  stalled past `ack_wait`, every time). nats-server then stops redelivering
  and publishes a MAX_DELIVERIES advisory, but in a work-queue stream the
  message itself stays behind, neither delivered nor removed, and nobody has
  told the device. `on_max_deliveries` reads it back by stream sequence,
  buries it and deletes it from ASR_SEGMENTS, so the queue empties.

The server sends that advisory when the consumer next looks for something to
deliver, i.e. when some worker pulls; every worker subscribes to it (one queue
group, so one of them handles each) before it first pulls, so a worker that
pulls is always there to hear it. The advisory is core NATS, so it can be
lost (a reconnect, a slow consumer), and so can a bury that failed: the sweep
(`services.worker.sweep`) finds such segments from the queue's own state, and
also segments about to reach ASR_SEGMENTS' `max_age`, which the server would
delete unannounced. Both paths dead-letter through `give_up_on`.

Either way the steps are: copy to ASR_DEAD (its Nats-Msg-Id is the original
stream sequence, so doing it twice keeps one copy), an `ErrorResult` to the
session's results subject (deduplicated like any result of that segment),
then term or delete. A crash between steps repeats them harmlessly. When the
`ErrorResult` comes back as a duplicate of a stored `Result` (a worker whose
lease lapsed had answered after all, see `services.worker.service`), the copy
is removed again: ASR_DEAD holds exactly the segments whose device got no
transcript.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import msgspec
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg
from nats.js.errors import NotFoundError

from jetstream import subjects
from schemas.pipeline import ErrorResult, Result, decode_result, decode_segment, encode_result
from services.worker.delivery import Delivery

log = logging.getLogger(__name__)

MAX_DELIVERIES = "max_deliveries"  # the reason code of a segment nobody answered
EXPIRED = "expired"  # the reason code of a segment about to reach ASR_SEGMENTS' max_age
_HEADER_VALUE_CHARS = 400


class MaxDeliveriesAdvisory(msgspec.Struct, kw_only=True):
    """`io.nats.jetstream.advisory.v1.max_deliver` (the fields used here)."""

    stream: str
    consumer: str
    stream_seq: int
    deliveries: int


_advisory_decoder = msgspec.json.Decoder(MaxDeliveriesAdvisory)


@dataclass(frozen=True)
class Queued:
    """A message of ASR_SEGMENTS, as delivered to a worker or read back by sequence."""

    subject: str
    data: bytes
    headers: dict[str, str]
    stream_seq: int
    attempts: int

    @classmethod
    def of(cls, delivery: Delivery) -> Queued:
        return cls(
            delivery.subject,
            delivery.data,
            dict(delivery.headers),
            delivery.seq,
            delivery.num_delivered,
        )


@dataclass(frozen=True)
class Addressee:
    """Who hears about a segment: its session on its edge, and which segment."""

    edge_id: str
    session_id: str
    segment: int  # -1 when nothing says which
    replay: str  # its replay tag (`Header.REPLAY`), '' for the original
    revision: int = 0  # the segment's revision (an error must answer the one the edge awaits)


def addressee(q: Queued) -> Addressee | None:
    """From the segment itself, else from its subject and Nats-Msg-Id; None if nobody."""
    replay = subjects.replay_tag_of(q.headers)
    try:
        segment = decode_segment(q.data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        pass
    else:
        try:
            return Addressee(
                subjects.check_token(segment.edge_id),
                subjects.check_token(segment.session_id),
                segment.segment,
                replay,
                segment.revision,
            )
        except subjects.InvalidToken:
            return None
    ids = subjects.ids_from_segments_subject(q.subject)
    if ids is None:
        return None
    edge_id, session_id = ids
    parsed = subjects.parse_segment_msg_id(q.headers.get(subjects.Header.MSG_ID, ""))
    number = parsed[1] if parsed and parsed[0] == session_id else -1
    return Addressee(edge_id, session_id, number, replay)


def one_line(text: str) -> str:
    """A header value: one line, bounded."""
    return " ".join(text.split())[:_HEADER_VALUE_CHARS]


def dead_headers(q: Queued, code: str, message: str) -> dict[str, str]:
    # The original's own headers (tenant, session, trace context) travel along;
    # Nats-* ones would steer this publish (dedup, expectations), so they do not.
    headers = {k: v for k, v in q.headers.items() if not k.startswith("Nats-")}
    headers.update(
        {
            subjects.Header.MSG_ID: subjects.dead_msg_id(q.stream_seq),
            subjects.Header.DEAD_REASON: one_line(code),
            subjects.Header.DEAD_MESSAGE: one_line(message),
            subjects.Header.DEAD_ATTEMPTS: str(q.attempts),
            subjects.Header.DEAD_SUBJECT: q.subject,
            subjects.Header.DEAD_SEQUENCE: str(q.stream_seq),
        }
    )
    original_id = q.headers.get(subjects.Header.MSG_ID)
    if original_id:
        headers[subjects.Header.DEAD_SEGMENT] = one_line(original_id)
    return headers


class DeadLetters:
    """Buries segments on ASR_DEAD and tells their devices."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self.buried = 0

    async def bury(self, q: Queued, code: str, message: str) -> bool:
        """Keep `q` on ASR_DEAD and send its device an `ErrorResult`.

        Returns False when the segment turned out to be answered already (and
        so is not kept). Raises `nats.errors.Error` / `TimeoutError` when NATS
        is in trouble: the caller hands the segment back and it comes again.
        """
        to = addressee(q)
        subject = (
            subjects.dead_subject(to.edge_id, to.session_id) if to else subjects.DEAD_UNROUTABLE
        )
        kept = await self.js.publish(subject, q.data, headers=dead_headers(q, code, message))
        if to is None:
            log.warning(
                "seq %d on %s dead-lettered (%s); no session to tell", q.stream_seq, q.subject, code
            )
        elif await self._tell(to, code, message):
            log.info("segment %s:%d was answered after all; not kept", to.session_id, to.segment)
            await self.js.delete_msg(subjects.STREAM_DEAD, kept.seq)
            return False
        else:
            log.warning(
                "segment %s:%d dead-lettered after %d attempt(s): %s: %s",
                to.session_id, to.segment, q.attempts, code, message,
            )  # fmt: skip
        if not kept.duplicate:
            self.buried += 1
        return True

    async def _tell(self, to: Addressee, code: str, message: str) -> bool:
        """Publish the `ErrorResult`; True if a `Result` of that segment was stored before."""
        error = ErrorResult(
            session_id=to.session_id,
            segment=to.segment,
            code=code,
            message=message,
            revision=to.revision,
        )
        ack = await self.js.publish(
            subjects.results_subject(to.edge_id, to.session_id),
            encode_result(error),
            headers={
                subjects.Header.MSG_ID: subjects.result_msg_id(
                    to.session_id, to.segment, to.replay, to.revision
                )
            },
        )
        if not ack.duplicate:
            return False
        try:
            stored = await self.js.get_msg(subjects.STREAM_TRANSCRIPTS, ack.seq)
            return isinstance(decode_result(stored.data or b""), Result)
        except (NotFoundError, msgspec.DecodeError, msgspec.ValidationError):
            return False

    async def on_max_deliveries(self, msg: Msg) -> None:
        """Handler of the MAX_DELIVERIES advisory of the workers' consumer."""
        try:
            advisory = _advisory_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("unreadable max-deliveries advisory: %s", exc)
            return
        if advisory.stream != subjects.STREAM_SEGMENTS:
            return
        reason = (
            f"no answer in {advisory.deliveries} deliveries: each worker holding it "
            "died or stalled past ack_wait"
        )
        await self.give_up_on(advisory.stream_seq, advisory.deliveries, MAX_DELIVERIES, reason)

    async def give_up_on(
        self, seq: int, attempts: int, code: str, reason: str, raw: RawStreamMsg | None = None
    ) -> bool:
        """Dead-letter the segment at `seq` of ASR_SEGMENTS and delete it from the queue.

        The MAX_DELIVERIES advisory and the sweep (`services.worker.sweep`) both end
        here, so a segment both of them find is kept once and its device told once
        (see the module doc). `raw`: the message, when the caller has read it already.
        True when this call dead-lettered it (False: gone already, or NATS failed)."""
        if raw is None:
            try:
                raw = await self.js.get_msg(subjects.STREAM_SEGMENTS, seq)
            except NotFoundError:
                return False  # acked at the last moment, or another worker got here first
            except (NatsError, TimeoutError) as exc:
                log.error("seq %d: %s, but it cannot be read (%r); it stays queued", seq, code, exc)
                return False
        q = Queued(raw.subject or "", raw.data or b"", dict(raw.headers or {}), seq, attempts)
        try:
            await self.bury(q, code, reason)
            await self.js.delete_msg(subjects.STREAM_SEGMENTS, seq)
        except NotFoundError:
            return False  # deleted meanwhile: done
        except (NatsError, TimeoutError) as exc:
            log.error("seq %d: %s; dead-lettering failed (%r)", seq, code, exc)
            return False
        return True
