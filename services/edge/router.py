"""Results back to sockets: ONE wildcard subscription per edge, routed by session id."""

from __future__ import annotations

import logging

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from jetstream import subjects
from schemas.pipeline import decode_result
from services.edge.session import Session

log = logging.getLogger(__name__)


class ResultRouter:
    def __init__(self, nc: NATS, edge_id: str) -> None:
        self.nc = nc
        self.edge_id = edge_id
        self.sessions: dict[str, Session] = {}
        self._sub: Subscription | None = None
        self.unroutable = 0

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(
            subjects.results_for_edge(self.edge_id), cb=self._on_msg
        )

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    def register(self, session: Session) -> None:
        self.sessions[session.id] = session

    def unregister(self, session: Session) -> None:
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
