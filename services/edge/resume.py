"""Resuming a session on a new socket: where it stands, what the device missed, what is owed.

`plan` is pure arithmetic over the session's record and its stored results;
`take_over` checks the token, claims the record and reads both from NATS.

Resume tokens are single-use: each socket of a session gets a new one (in its
`SessionStarted`), and the record names the only one that may resume it now.
A token that was used (or replaced) is refused before anything else happens,
so a leaked token cannot kick a live socket or read the transcript.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import msgspec
from nats.js import JetStreamContext

from schemas.pipeline import Result, ResultMessage, SessionRecord
from services.edge.auth import resume_claims
from services.edge.replay import stored_results
from services.edge.store import ResumeRefused, SessionStore
from services.edge.stream import StreamStart

RESUME_HEADER = "X-Escapement-Resume"  # preferred: headers stay out of URLs and their logs
RESUME_QUERY = "resume"  # browsers (no headers on a WebSocket) and older clients


def token_of(headers: Mapping[str, str], query: Mapping[str, str]) -> str:
    """The resume token presented, header first; '' for none."""
    return (headers.get(RESUME_HEADER) or query.get(RESUME_QUERY) or "").strip()


def new_token_id() -> str:
    return secrets.token_urlsafe(12)


def check_current(record: SessionRecord, token_id: str) -> None:
    """ResumeRefused unless `token_id` is the session's current resume token."""
    if record.resume_id and not secrets.compare_digest(record.resume_id, token_id):
        raise ResumeRefused(
            401,
            "resume_token_used",
            "that resume token was already used: resume with the resume_token "
            "of the latest SessionStarted",
        )


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


async def take_over(
    js: JetStreamContext,
    store: SessionStore,
    secret: bytes,
    token: str,
    tenant: str,
    last_segment: str,
    window_s: float,
    edge_id: str,
    retire: Callable[[str], Awaitable[None]],
) -> ResumePlan:
    """Resume the session `token` names on this edge's new socket.

    In order: the token (signature, tenant, expiry), the record (resumable, and
    the token is its current one), then `retire(session_id)` closes an old socket
    this edge still holds (it queues what it heard and saves first), then the
    record is claimed with the next epoch and a new token id, compare-and-set,
    so of two sockets resuming at once only one gets it. Raises AuthError,
    ResumeRefused, ValueError (last_segment), NATS errors.
    """
    session_id, token_id = resume_claims(secret, token, tenant)
    after = max(-1, int(last_segment))
    record, _ = await store.resumable(session_id, tenant, window_s)
    check_current(record, token_id)
    await retire(session_id)
    record, revision = await store.resumable(session_id, tenant, window_s)
    check_current(record, token_id)  # still: nobody resumed it meanwhile
    claimed = msgspec.structs.replace(
        record,
        epoch=record.epoch + 1,
        resume_id=new_token_id(),
        edge_id=edge_id,
        state="open",
        detached_at=0.0,
    )
    await store.claim(claimed, revision)
    return plan(claimed, await stored_results(js, session_id), after)
