"""The edge's aiohttp application: `/v1/stream`, health, and the web page."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from nats.aio.client import Client as NATS
from nats.micro import add_service
from nats.micro.request import Request

from jetstream import subjects
from jetstream.setup import streams_exist
from schemas.device import REASON_HEADER
from services.edge.params import BadRequest, parse_stream_params
from services.edge.router import ResultRouter
from services.edge.session import Session
from services.edge.settings import EdgeSettings
from services.natsconn import connect

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"

settings_key = web.AppKey("settings", EdgeSettings)
nats_key = web.AppKey("nats", NATS)
router_key = web.AppKey("router", ResultRouter)
edge_id_key = web.AppKey("edge_id", str)
sessions_key = web.AppKey("sessions", set)


@dataclass
class EdgeStats:
    """What this edge saw, for `/v1/stats` and the load generator to compare against."""

    admitted: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    closed: Counter[int] = field(default_factory=Counter)  # by close code
    segments: int = 0
    finals: int = 0
    errors: int = 0

    def as_dict(self, active: int) -> dict[str, object]:
        return {
            "sessions": {
                "admitted": self.admitted,
                "active": active,
                "refused": dict(self.refused),
                "closed": {str(k): v for k, v in self.closed.items()},
            },
            "segments": self.segments,
            "finals": self.finals,
            "errors": self.errors,
        }


stats_key = web.AppKey("stats", EdgeStats)


def refuse(
    request: web.Request, status: int, reason: str, message: str, retry_after: float | None = None
) -> web.Response:
    request.app[stats_key].refused[reason] += 1
    headers = {REASON_HEADER: reason}
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, round(retry_after)))
    return web.json_response({"reason": reason, "message": message}, status=status, headers=headers)


async def stream_handler(request: web.Request) -> web.StreamResponse:
    settings = request.app[settings_key]
    try:
        params = parse_stream_params(request.query, settings.default_language)
    except BadRequest as exc:
        return refuse(request, 400, exc.reason, exc.message)
    nc = request.app[nats_key]
    if not nc.is_connected:
        return refuse(request, 503, "nats_unavailable", "the queue is unreachable", retry_after=2)
    ws = web.WebSocketResponse(
        max_msg_size=settings.max_frame_bytes,
        heartbeat=settings.heartbeat_s,
        autoping=True,
    )
    await ws.prepare(request)
    session = Session(
        ws=ws,
        js=nc.jetstream(),
        settings=settings,
        params=params,
        edge_id=request.app[edge_id_key],
        session_id=secrets.token_urlsafe(12),
        resume_token=secrets.token_urlsafe(24),
        tenant="default",
    )
    stats = request.app[stats_key]
    stats.admitted += 1
    router = request.app[router_key]
    router.register(session)
    request.app[sessions_key].add(session)
    log.info(
        "session %s opened (rate %d, %s, %s)",
        session.id,
        params.sample_rate,
        params.language,
        params.framing,
    )
    try:
        await session.run()
    finally:
        router.unregister(session)
        request.app[sessions_key].discard(session)
        stats.closed[ws.close_code or 1006] += 1
        stats.segments += session.counters.segments
        stats.finals += session.counters.finals
        stats.errors += session.counters.errors
        log.info("session %s closed: %s", session.id, session.counters)
    return ws


async def stats_handler(request: web.Request) -> web.Response:
    body = request.app[stats_key].as_dict(active=len(request.app[sessions_key]))
    body["edge_id"] = request.app[edge_id_key]
    return web.json_response(body)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    nc = request.app[nats_key]
    if not nc.is_connected:
        return web.json_response(
            {"reason": "nats_unavailable", "message": "not connected to NATS"}, status=503
        )
    try:
        ok = await asyncio.wait_for(streams_exist(nc.jetstream()), timeout=2)
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        return web.json_response(
            {"reason": "jetstream_unavailable", "message": f"JetStream not answering: {exc!r}"},
            status=503,
        )
    if not ok:
        return web.json_response(
            {"reason": "streams_missing", "message": "streams not created yet"}, status=503
        )
    return web.json_response({"status": "ready", "edge_id": request.app[edge_id_key]})


async def index(request: web.Request) -> web.StreamResponse:
    page = STATIC / "index.html"
    if not page.is_file():
        return web.Response(text="Escapement edge: connect a WebSocket to /v1/stream\n")
    return web.FileResponse(page)


def _nats_ctx(settings: EdgeSettings, nc: NATS | None):  # type: ignore[no-untyped-def]
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        own = nc is None
        conn = (
            nc
            if nc is not None
            else await connect(settings.nats_url, f"escapement-edge-{app[edge_id_key]}")
        )
        app[nats_key] = conn
        router = ResultRouter(conn, app[edge_id_key])
        await router.start()
        app[router_key] = router

        async def status(req: Request) -> None:
            body = {
                "edge_id": app[edge_id_key],
                "sessions": len(router.sessions),
                "unroutable": router.unroutable,
            }
            await req.respond(json.dumps(body).encode())

        service = await add_service(
            conn,
            name=subjects.EDGE_SERVICE,
            version="0.1.0",
            description="Escapement WebSocket edge",
            metadata={"edge_id": app[edge_id_key]},
        )
        await service.add_endpoint(
            name="status", subject=f"{subjects.EDGE_STATUS}.{app[edge_id_key]}", handler=status
        )
        yield
        await service.stop()
        await router.stop()
        if own:
            try:
                await asyncio.wait_for(conn.drain(), timeout=5)
            except TimeoutError:
                await conn.close()

    return ctx


async def _close_sessions(app: web.Application) -> None:
    await asyncio.gather(*(s.abort() for s in list(app[sessions_key])), return_exceptions=True)


def create_app(settings: EdgeSettings, nc: NATS | None = None) -> web.Application:
    """The edge. Pass `nc` to share a connection (tests); otherwise it connects to settings.nats_url."""
    app = web.Application()
    app[settings_key] = settings
    app[edge_id_key] = subjects.check_token(settings.edge_id or f"edge-{secrets.token_hex(4)}")
    app[sessions_key] = set()
    app[stats_key] = EdgeStats()
    app.cleanup_ctx.append(_nats_ctx(settings, nc))
    app.on_shutdown.append(_close_sessions)
    app.router.add_get("/v1/stream", stream_handler)
    app.router.add_get("/v1/stats", stats_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/", index)
    return app
