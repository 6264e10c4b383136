"""`/healthz`: the edge answers. `/readyz`: a new session would be admitted now.

Ready means NATS is connected, the streams exist and, when the edge requires
workers, admission has seen at least one live worker (workers register their
micro service once their model is loaded). `/readyz` says what it waits for:

    200 {"status": "ready", "waiting_for": [], "workers": 1, ...}
    503 {"status": "waiting", "waiting_for": ["workers"], "workers": 0, ...}
    503 {"status": "draining", ...}   (shutting down)
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiohttp import web
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError

from jetstream.setup import streams_exist
from services.edge.admission import Admission

_WAITING = {
    "nats": "not connected to NATS",
    "streams": "the streams do not exist yet (or JetStream does not answer)",
    "workers": "no transcription worker has its model loaded yet",
}


@dataclass(frozen=True, slots=True)
class Readiness:
    waiting_for: tuple[str, ...]  # of "nats", "streams", "workers"; empty when ready
    workers: int
    draining: bool = False

    @property
    def ready(self) -> bool:
        return not self.waiting_for and not self.draining

    @property
    def status(self) -> str:
        return "draining" if self.draining else "waiting" if self.waiting_for else "ready"

    @property
    def message(self) -> str:
        if self.draining:
            return "this edge is shutting down"
        return "; ".join(_WAITING[w] for w in self.waiting_for) or "sessions are admitted"


async def readiness(admission: Admission) -> Readiness:
    """What a new session waits for, judged as admission judges it (its view of the workers)."""
    waiting = []
    if not admission.nc.is_connected:
        waiting.append("nats")
    elif not await _streams_exist(admission.nc):
        waiting.append("streams")
    if admission.config.require_workers and admission.workers == 0:
        waiting.append("workers")
    return Readiness(tuple(waiting), admission.workers, admission.draining)


async def _streams_exist(nc: NATS) -> bool:
    try:
        return await asyncio.wait_for(streams_exist(nc.jetstream()), timeout=2)
    except (NatsError, TimeoutError):
        return False


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def routes(admission: web.AppKey[Admission], edge_id: web.AppKey[str]) -> list[web.RouteDef]:
    """`/healthz` and `/readyz` for an app that keeps its Admission and edge id under these keys."""

    async def readyz(request: web.Request) -> web.Response:
        state = await readiness(request.app[admission])
        body = {
            "status": state.status,
            "waiting_for": list(state.waiting_for),
            "workers": state.workers,
            "message": state.message,
            "edge_id": request.app[edge_id],
        }
        return web.json_response(body, status=200 if state.ready else 503)

    return [web.get("/healthz", healthz), web.get("/readyz", readyz)]
