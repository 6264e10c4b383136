"""Segments the edge took back out of the queue while a worker may be decoding them.

An early final is published at a pause; when speech resumes before the endpoint, the
edge deletes it from ASR_SEGMENTS and says so on core NATS (`subjects.withdrawn_subject`,
`schemas.pipeline.Withdrawn`). A worker already decoding it cannot be reached through
JetStream, so each worker keeps the recent notices here, and the decode looks once its
encoder pass is done (`decoding.decode(wanted=...)`): the decoder's part, a third or
more of a final's time, goes to the next segment instead. Nothing depends on a notice
arriving: without one the decode finishes and the edge ignores its result, as it did
before there were notices.

One registry per process (`WITHDRAWN`): the worker loop adds to it on the event loop,
the engine reads it in its executor thread (a dict's `in` and assignment are atomic).
"""

from __future__ import annotations

import logging

import msgspec
from nats.aio.msg import Msg

from schemas.pipeline import Segment, decode_withdrawn

log = logging.getLogger(__name__)


class WithdrawnSegments:
    """The last `keep` withdrawn (session, segment, revision) keys."""

    def __init__(self, keep: int = 4096) -> None:
        self.keep = keep
        self._keys: dict[tuple[str, int, int], None] = {}
        self.heard = 0  # notices taken in
        self.stopped = 0  # decodes stopped early because of one

    def add(self, session_id: str, segment: int, revision: int) -> None:
        self._keys[(session_id, segment, revision)] = None
        self.heard += 1
        while len(self._keys) > self.keep:
            del self._keys[next(iter(self._keys))]

    def of(self, segment: Segment) -> bool:
        """Has the edge withdrawn this very revision of the segment?"""
        return (segment.session_id, segment.segment, segment.revision) in self._keys

    async def on_notice(self, msg: Msg) -> None:
        """Handler of the edges' notices (`subjects.WITHDRAWN_ALL`)."""
        try:
            notice = decode_withdrawn(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("unreadable withdrawal notice on %s: %s", msg.subject, exc)
            return
        self.add(notice.session_id, notice.segment, notice.revision)


WITHDRAWN = WithdrawnSegments()
