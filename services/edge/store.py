"""Session records in the KV bucket ASR_SESSIONS: where each session stands.

Written when a session opens, after each segment is queued, and when its
socket goes away, so a device can resume the session on any edge within the
resume window. Reads and writes are single JetStream requests (~1 ms).
"""

from __future__ import annotations

import logging
import time

import msgspec
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from jetstream import subjects
from schemas.pipeline import SessionRecord, decode_record, encode_record

log = logging.getLogger(__name__)


class ResumeRefused(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


class SessionStore:
    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self._kv: KeyValue | None = None

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self.nc.jetstream().key_value(subjects.KV_SESSIONS)
        return self._kv

    async def put(self, record: SessionRecord) -> None:
        """Best effort: a lost write only narrows what a resume can recover."""
        try:
            await (await self._bucket()).put(
                subjects.check_token(record.session_id), encode_record(record)
            )
        except (NatsError, TimeoutError) as exc:
            log.warning("session %s: record not saved: %r", record.session_id, exc)

    async def get(self, session_id: str) -> SessionRecord | None:
        try:
            entry = await (await self._bucket()).get(subjects.check_token(session_id))
        except KeyNotFoundError:
            return None
        try:
            return decode_record(entry.value or b"")
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None

    async def for_resume(self, session_id: str, tenant: str, window_s: float) -> SessionRecord:
        record = await self.get(session_id)
        if record is None:
            raise ResumeRefused(410, "resume_expired", "that session is no longer known")
        if record.tenant != tenant:
            raise ResumeRefused(
                401, "invalid_credentials", "that session belongs to another tenant"
            )
        if record.state == "closed":
            raise ResumeRefused(410, "session_closed", "that session was closed with CloseStream")
        if record.state == "detached" and time.time() - record.detached_at > window_s:
            raise ResumeRefused(
                410, "resume_expired", f"the resume window ({window_s:g} s) has passed"
            )
        return record
