"""Session records in the KV bucket ASR_SESSIONS: where each session stands.

Written when a session opens, after each segment is queued, and when its
socket goes away, so a device can resume the session on any edge within the
resume window. Reads and writes are single JetStream requests (~1 ms).

Every write is a compare-and-set on the record's KV revision. A record has an
owner, the socket of its current `epoch`: a resume claims it with the next
epoch, so a socket of an older epoch (a half-open one on another edge) can no
longer save it, and its stale `next_segment` cannot overwrite a newer one.
"""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from jetstream import subjects
from schemas.pipeline import SessionRecord, decode_record, encode_record

log = logging.getLogger(__name__)

SAVE_ATTEMPTS = 4  # a transient NATS error is retried, 0.1, 0.2, 0.4 s apart


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
        # (session, epoch) -> the KV revision this edge last wrote or read for that owner
        self._revisions: dict[tuple[str, int], int] = {}
        self.stale_writes = 0  # saves refused: the session was resumed on a newer socket
        self.failed_writes = 0  # saves lost to NATS errors after every retry

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self.nc.jetstream().key_value(subjects.KV_SESSIONS)
        return self._kv

    async def put(self, record: SessionRecord) -> bool:
        """Save `record` if its socket still owns the session. False when it does not
        (a newer epoch holds the record: the write is refused) or NATS kept failing
        (logged as an error: a resume would start from an older position)."""
        key = (subjects.check_token(record.session_id), record.epoch)
        data = encode_record(record)
        error: Exception | None = None
        for attempt in range(SAVE_ATTEMPTS):
            if attempt:
                await asyncio.sleep(0.1 * 2 ** (attempt - 1))
            try:
                saved = await self._write(key, data)
            except KeyWrongLastSequenceError:
                try:  # written by someone else: a newer owner, or our own lost answer
                    if not await self._still_owner(record):
                        return False
                except (NatsError, TimeoutError) as exc:
                    error = exc
                continue
            except (NatsError, TimeoutError) as exc:
                error = exc
                continue
            if record.state == "open":
                self._revisions[key] = saved
            else:
                self._revisions.pop(key, None)  # this socket is done with the record
            return True
        self.failed_writes += 1
        log.error(
            "session %s: record not saved after %d tries: %r",
            record.session_id, SAVE_ATTEMPTS, error or "it kept changing under this edge",
        )  # fmt: skip
        return False

    async def _write(self, key: tuple[str, int], data: bytes) -> int:
        kv = await self._bucket()
        revision = self._revisions.get(key)
        if revision is None:
            return await kv.create(key[0], data)  # a new session's first write
        return await kv.update(key[0], data, last=revision)

    async def _still_owner(self, record: SessionRecord) -> bool:
        """After a refused compare-and-set: whether `record`'s epoch still owns the session
        (then the revision to write over is remembered)."""
        key = (record.session_id, record.epoch)
        found = await self.entry(record.session_id)
        if found is None:
            self._revisions.pop(key, None)  # gone (aged out): the next try creates it
            return True
        current, revision = found
        if current.epoch > record.epoch:
            self._revisions.pop(key, None)
            self.stale_writes += 1
            log.warning(
                "session %s: not saved: resumed on another socket (epoch %d, this one %d)",
                record.session_id, current.epoch, record.epoch,
            )  # fmt: skip
            return False
        self._revisions[key] = revision
        return True

    async def entry(self, session_id: str) -> tuple[SessionRecord, int] | None:
        """The record and its KV revision; None if unknown or unreadable."""
        try:
            entry = await (await self._bucket()).get(subjects.check_token(session_id))
        except KeyNotFoundError:
            return None
        try:
            return decode_record(entry.value or b""), int(entry.revision or 0)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None

    async def get(self, session_id: str) -> SessionRecord | None:
        found = await self.entry(session_id)
        return found[0] if found else None

    async def claim(self, record: SessionRecord, revision: int) -> None:
        """A resume takes the session over: `record` (its epoch one above the one read at
        `revision`) is written only if nobody wrote since; else ResumeRefused (409)."""
        key = (subjects.check_token(record.session_id), record.epoch)
        try:
            saved = await (await self._bucket()).update(
                key[0], encode_record(record), last=revision
            )
        except KeyWrongLastSequenceError:
            raise ResumeRefused(
                409, "resume_conflict", "the session was resumed on another connection meanwhile"
            ) from None
        self._revisions[key] = saved

    async def for_resume(self, session_id: str, tenant: str, window_s: float) -> SessionRecord:
        return (await self.resumable(session_id, tenant, window_s))[0]

    async def resumable(
        self, session_id: str, tenant: str, window_s: float
    ) -> tuple[SessionRecord, int]:
        """The record of a session `tenant` may resume now, with its KV revision."""
        found = await self.entry(session_id)
        if found is None:
            raise ResumeRefused(410, "resume_expired", "that session is no longer known")
        record, revision = found
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
        return record, revision
