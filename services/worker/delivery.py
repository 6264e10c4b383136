"""One delivery of a queued segment, and the lease that says whether it is still ours.

A `Delivery` is the only way the worker answers JetStream, so the lease rule
(`services.worker.service`) holds by construction: once the lease may have
lapsed, `ack`, `nak`, `term` and `in_progress` refuse (they return False, and
the lapse is logged and counted), because the server may have redelivered
the segment and would take the answer for the new delivery (nats-server
#4786). `kept_alive()` renews the lease with in-progress acks (+WPI) sent as
requests: only a +WPI the server confirmed extends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError

from jetstream import subjects

log = logging.getLogger(__name__)

IN_PROGRESS_TIMEOUT_S = 2.0  # the most a +WPI waits for the server's confirmation


class Lease:
    """Until when this worker may answer for one delivery.

    `granted_at` and every renewal are taken no later than the server starts
    its own timer, so the lease may look shorter than it is, never longer.
    """

    def __init__(self, granted_at: float, ack_wait: float, margin: float) -> None:
        self.ack_wait = ack_wait
        self.margin = margin
        self.expires = granted_at + ack_wait

    def held(self) -> bool:
        return time.monotonic() + self.margin < self.expires

    def renewed(self, sent_at: float) -> None:
        self.expires = max(self.expires, sent_at + self.ack_wait)


class Delivery:
    """A message fetched from a pull consumer, answerable only while its lease holds."""

    def __init__(
        self,
        msg: Msg,
        lease: Lease,
        nc: NATS,
        on_lapsed: Callable[[], None] | None = None,
    ) -> None:
        self._msg = msg
        self._meta = msg.metadata
        self.lease = lease
        self._nc = nc
        self._on_lapsed = on_lapsed
        self._lapse_counted = False
        self.answered = False  # acked, naked or termed: nothing more to say

    @property
    def subject(self) -> str:
        return self._msg.subject

    @property
    def data(self) -> bytes:
        return self._msg.data

    @property
    def headers(self) -> Mapping[str, str]:
        return self._msg.headers or {}

    @property
    def seq(self) -> int:
        """Its sequence on the stream."""
        return self._meta.sequence.stream

    @property
    def num_delivered(self) -> int:
        """1 for the first delivery, one more for each redelivery."""
        return self._meta.num_delivered

    @property
    def replay(self) -> str:
        """The replay tag of a segment queued again from the dead letters, else ''."""
        return subjects.replay_tag_of(self.headers)

    def held(self) -> bool:
        return self.lease.held()

    def answerable(self, doing: str) -> bool:
        """True while the lease holds; else False, logged and counted (once per delivery)."""
        if self.lease.held():
            return True
        if not self._lapse_counted:
            self._lapse_counted = True
            if self._on_lapsed is not None:
                self._on_lapsed()
        log.warning(
            "seq %d (delivery %d): no %s: its lease may have lapsed; "
            "leaving it to the current holder",
            self.seq, self.num_delivered, doing,
        )  # fmt: skip
        return False

    async def ack(self) -> bool:
        """Done with it: the server removes it. False (nothing sent) once the lease may have lapsed."""
        if not self.answerable("ack"):
            return False
        await self._msg.ack()
        self.answered = True
        return True

    async def nak(self, delay: float | None = None) -> bool:
        """Hand it back, to be redelivered after `delay` seconds (at once if None)."""
        if not self.answerable("nak"):
            return False
        await self._msg.nak(delay=delay)
        self.answered = True
        return True

    async def term(self) -> bool:
        """Never deliver it again."""
        if not self.answerable("term"):
            return False
        await self._msg.term()
        self.answered = True
        return True

    async def in_progress(self, within: float = IN_PROGRESS_TIMEOUT_S) -> bool:
        """A +WPI the server must confirm `within` seconds; True when it did, and the
        lease is renewed from when it was sent."""
        if self.answered:
            return False  # after a nak it may be another worker's: renewing it would be theirs
        if not self.answerable("in-progress ack"):
            return False
        sent = time.monotonic()
        try:
            await self._nc.request(self._msg.reply, Msg.Ack.Progress, timeout=within)
        except (NatsError, TimeoutError) as exc:
            log.info("seq %d: in-progress ack unconfirmed (%r)", self.seq, exc)
            return False
        self.lease.renewed(sent)
        return True

    @contextlib.asynccontextmanager
    async def kept_alive(self, every: float) -> AsyncIterator[None]:
        """Renew the lease every `every` seconds while the body runs.

        Stops quietly once the lease may have lapsed (a +WPI then could renew
        another worker's delivery); whoever answers next hears about it.
        """
        task = asyncio.create_task(self._keep_alive(every))
        try:
            yield
        finally:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # we are being cancelled too, not only the keep-alive

    async def _keep_alive(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            if not self.lease.held() or self.answered:
                return
            await self.in_progress(within=min(every, IN_PROGRESS_TIMEOUT_S))
