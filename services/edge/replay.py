"""Read a session's stored results back from ASR_TRANSCRIPTS.

Used when a device resumes a session (it gets the finals it missed) and when
the edge suspects it missed a result on core NATS (after a reconnect, or a
segment outstanding for too long): results are stored whatever edge they
were addressed to, so nothing a worker published is lost to the device.
"""

from __future__ import annotations

import logging

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from jetstream import subjects
from schemas.pipeline import ResultMessage, decode_result

log = logging.getLogger(__name__)


async def stored_results(
    js: JetStreamContext, session_id: str, limit: int = 10_000
) -> list[ResultMessage]:
    """Every stored result of the session, in storage order (walks the stream by subject)."""
    out: list[ResultMessage] = []
    seq = 1
    subject = subjects.results_for_session(session_id)
    while len(out) < limit:
        try:
            msg = await js.get_msg(subjects.STREAM_TRANSCRIPTS, seq=seq, subject=subject, next=True)
        except NotFoundError:
            break
        seq = int(msg.seq or seq) + 1
        try:
            result = decode_result(msg.data or b"")
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("stored result %d of %s undecodable: %s", seq - 1, session_id, exc)
            continue
        if result.session_id == session_id:
            out.append(result)
    return out
