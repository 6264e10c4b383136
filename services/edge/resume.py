"""Resuming a session on a new socket: where it stands, what the device missed, what is owed.

`plan` is pure arithmetic over the session's record and its stored results;
`load` reads both from NATS (after checking the token).
"""

from __future__ import annotations

from dataclasses import dataclass

from nats.js import JetStreamContext

from schemas.pipeline import Result, ResultMessage, SessionRecord
from services.edge.auth import verify_resume_token
from services.edge.replay import stored_results
from services.edge.store import SessionStore
from services.edge.stream import StreamStart

CONTEXT_FINALS = 5  # earlier finals given to the resumed stream as prompt context


@dataclass(frozen=True)
class ResumePlan:
    record: SessionRecord
    start: StreamStart
    missed: list[ResultMessage]  # stored results after the device's last segment, in order


def plan(record: SessionRecord, stored: list[ResultMessage], after: int) -> ResumePlan:
    """`after`: the last segment the device says it has (-1: none)."""
    counts = record.revisions
    kept = [r for r in stored if r.segment not in counts or counts[r.segment] == r.revision]
    best: dict[int, ResultMessage] = {}
    for result in kept:  # one per segment: a Final over an earlier Error
        if result.segment > after and not isinstance(best.get(result.segment), Result):
            best[result.segment] = result
    have = {r.segment for r in kept}
    owed = tuple(
        n for n in range(after + 1, record.next_segment) if n not in have and n not in record.failed
    )
    finals = sorted((r for r in kept if isinstance(r, Result)), key=lambda r: r.segment)
    start = StreamStart(
        next_segment=record.next_segment,
        position_ms=record.position_ms,
        delivered_below=after + 1,
        owed=owed,
        context=tuple(r.text for r in finals[-CONTEXT_FINALS:]),
        confirmed=tuple(counts.items()),
    )
    return ResumePlan(record, start, [best[n] for n in sorted(best)])


async def load(
    js: JetStreamContext,
    store: SessionStore,
    secret: bytes,
    token: str,
    tenant: str,
    last_segment: str,
    window_s: float,
) -> ResumePlan:
    """Raises AuthError (bad token), ResumeRefused, ValueError (last_segment), NATS errors."""
    session_id = verify_resume_token(secret, token, tenant)
    after = max(-1, int(last_segment))
    record = await store.for_resume(session_id, tenant, window_s)
    return plan(record, await stored_results(js, session_id), after)


def session_of(secret: bytes, token: str, tenant: str) -> str:
    """The session a resume token names (AuthError if it is not valid for this tenant)."""
    return verify_resume_token(secret, token, tenant)
