"""Results back to sockets: ONE wildcard subscription per edge, routed by session id.

Core NATS delivers at most once: a result published while this edge was
reconnecting never reaches it. Results are also stored on ASR_TRANSCRIPTS, so
after a reconnect, and for any result owed longer than `recheck_after_s`, the
router looks the session's results up there; the session's dedup makes the
second copy harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from opentelemetry.metrics import Counter

from jetstream import subjects
from schemas.pipeline import ResultMessage, decode_result
from services.common.supervise import start_supervised
from services.edge.replay import stored_results

log = logging.getLogger(__name__)


class Routed(Protocol):
    """What the router needs of a session."""

    @property
    def id(self) -> str: ...
    @property
    def owing(self) -> bool: ...
    def owes(self, number: int) -> bool: ...
    def stale(self, older_than_s: float) -> bool: ...
    def on_result(self, result: ResultMessage) -> None: ...
    def supersede(self) -> None: ...


class ResultRouter:
    def __init__(
        self,
        nc: NATS,
        edge_id: str,
        recheck_after_s: float = 20.0,
        restarts: Counter | None = None,  # escapement_loop_restarts_total
    ) -> None:
        self.nc = nc
        self.restarts = restarts
        self.edge_id = edge_id
        self.recheck_after_s = recheck_after_s
        self.sessions: dict[str, Routed] = {}
        self._sub: Subscription | None = None
        self._partials: Subscription | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._sweep_now = asyncio.Event()
        self.unroutable = 0
        self.recovered = 0

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(
            subjects.results_for_edge(self.edge_id), cb=self._on_msg
        )
        self._partials = await self.nc.subscribe(
            subjects.partials_for_edge(self.edge_id), cb=self._on_msg
        )
        # supervised: a sweeper that died would leave every owed result unrecovered
        self._sweeper = start_supervised("result-sweeper", self._sweep_loop, restarts=self.restarts)

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for sub in (self._sub, self._partials):
            if sub is None:
                continue
            try:
                await sub.unsubscribe()
            except NatsError as exc:
                log.info("result subscription not closed cleanly: %r", exc)
        self._sub = self._partials = None

    def reconnected(self) -> None:
        """Call after a NATS reconnect: results may have been missed meanwhile."""
        self._sweep_now.set()

    def register(self, session: Routed) -> None:
        old = self.sessions.get(session.id)
        if old is not None and old is not session:
            old.supersede()  # resumed on a new socket
        self.sessions[session.id] = session

    def unregister(self, session: Routed) -> None:
        if self.sessions.get(session.id) is session:
            del self.sessions[session.id]

    async def _on_msg(self, msg: Msg) -> None:
        session_id = subjects.session_of_results_subject(msg.subject)
        session = self.sessions.get(session_id)
        if session is None:
            self.unroutable += 1  # the device left; finals stay on ASR_TRANSCRIPTS
            return
        try:
            result = decode_result(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("undecodable result on %s: %s", msg.subject, exc)
            return
        if result.session_id != session_id:
            log.warning("result for %s arrived on %s; dropped", result.session_id, msg.subject)
            return
        session.on_result(result)

    async def _sweep_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._sweep_now.wait(), timeout=2.0)
            everyone = self._sweep_now.is_set()
            self._sweep_now.clear()
            for session in list(self.sessions.values()):
                if not session.owing:
                    continue
                if everyone or session.stale(self.recheck_after_s):
                    await self.recover(session)

    async def recover(self, session: Routed) -> None:
        """Deliver any stored result the session still waits for."""
        try:
            results = await stored_results(self.nc.jetstream(), session.id)
        except (NatsError, TimeoutError) as exc:
            log.debug("recovering results of %s failed: %r", session.id, exc)
            return
        for result in sorted(results, key=lambda r: r.segment):
            if session.owes(result.segment):
                self.recovered += 1
                session.on_result(result)
