"""The edge's aiohttp application: `/v1/stream`, health, and the web page."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import WSCloseCode, web
from aiohttp.abc import AbstractAccessLogger
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.micro import add_service
from nats.micro.request import Request

from jetstream import subjects
from jetstream.setup import apply_all, streams_exist
from observability.metrics import ATTR_REASON, Metrics
from schemas.device import REASON_HEADER
from schemas.pipeline import Result, ResultMessage, SessionRecord
from services.edge.admission import Admission, AdmissionConfig
from services.edge.auth import (
    Authenticator,
    AuthError,
    load_api_keys,
    mint_resume_token,
    verify_resume_token,
)
from services.edge.params import BadRequest, parse_stream_params
from services.edge.replay import stored_results
from services.edge.router import ResultRouter
from services.edge.session import Session
from services.edge.settings import EdgeSettings
from services.edge.store import ResumeRefused, SessionStore
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
    resumed: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    closed: Counter[int] = field(default_factory=Counter)  # by close code
    segments: int = 0
    finals: int = 0
    errors: int = 0
    publish_retries: int = 0

    def as_dict(self, active: int) -> dict[str, object]:
        return {
            "sessions": {
                "admitted": self.admitted,
                "resumed": self.resumed,
                "active": active,
                "refused": dict(self.refused),
                "closed": {str(k): v for k, v in self.closed.items()},
            },
            "segments": self.segments,
            "finals": self.finals,
            "errors": self.errors,
            "publish_retries": self.publish_retries,
        }


stats_key = web.AppKey("stats", EdgeStats)
auth_key = web.AppKey("auth", Authenticator)
secret_key = web.AppKey("secret", bytes)
admission_key = web.AppKey("admission", Admission)
tenants_key = web.AppKey("tenants", Counter)
store_key = web.AppKey("store", SessionStore)
metrics_key = web.AppKey("metrics", Metrics)


def refuse(
    request: web.Request, status: int, reason: str, message: str, retry_after: float | None = None
) -> web.Response:
    request.app[stats_key].refused[reason] += 1
    request.app[metrics_key].sessions_refused.add(1, {ATTR_REASON: reason})
    headers = {REASON_HEADER: reason}
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, round(retry_after)))
    return web.json_response({"reason": reason, "message": message}, status=status, headers=headers)


async def stream_handler(request: web.Request) -> web.StreamResponse:
    app = request.app
    settings = app[settings_key]
    try:
        params = parse_stream_params(request.query, settings.default_language)
    except BadRequest as exc:
        return refuse(request, 400, exc.reason, exc.message)
    try:
        principal = app[auth_key].authenticate(request.headers, request.query)
    except AuthError as exc:
        return refuse(request, exc.status, exc.reason, exc.message)
    refusal = app[admission_key].check()
    if refusal is not None:
        return refuse(request, refusal.status, refusal.reason, refusal.message, refusal.retry_after)
    tenants = app[tenants_key]
    if len(app[sessions_key]) >= settings.max_connections:
        return refuse(
            request,
            503,
            "too_many_connections",
            "this edge is at its connection limit",
            retry_after=1,
        )
    if tenants[principal.tenant] >= settings.max_connections_per_tenant:
        return refuse(
            request,
            429,
            "too_many_connections",
            "your tenant is at its connection limit",
            retry_after=1,
        )
    edge_id = app[edge_id_key]
    store = app[store_key]
    missed: list[ResultMessage] = []
    owed: list[int] = []
    resume = request.query.get("resume")
    after = -1
    if resume:
        try:
            session_id = verify_resume_token(app[secret_key], resume, principal.tenant)
            after = max(-1, int(request.query.get("last_segment", "-1")))
            await _retire(app[router_key].sessions.get(session_id), settings)
            record = await store.for_resume(session_id, principal.tenant, settings.resume_window_s)
            stored = await stored_results(app[nats_key].jetstream(), session_id)
        except AuthError as exc:
            return refuse(request, exc.status, exc.reason, exc.message)
        except ResumeRefused as exc:
            return refuse(request, exc.status, exc.reason, exc.message)
        except ValueError:
            return refuse(request, 400, "bad_last_segment", "last_segment must be an integer")
        except (NatsError, TimeoutError):
            return refuse(
                request, 503, "nats_unavailable", "session store unreachable", retry_after=2
            )
        missed = _missed(stored, after)
        have = {r.segment for r in stored}
        owed = [
            n
            for n in range(after + 1, record.next_segment)
            if n not in have and n not in record.failed
        ]
        record.edge_id = edge_id
        record.state = "open"
        context = [r.text for r in sorted(stored, key=lambda r: r.segment) if isinstance(r, Result)]
    else:
        session_id = secrets.token_urlsafe(12)
        record = SessionRecord(
            session_id=session_id,
            tenant=principal.tenant,
            edge_id=edge_id,
            sample_rate=params.sample_rate,
            language=params.language,
            framing=params.framing,
        )
        context = []
    ws = web.WebSocketResponse(
        max_msg_size=settings.max_frame_bytes,
        heartbeat=settings.heartbeat_s,
        autoping=True,
    )
    session = Session(
        ws=ws,
        js=app[nats_key].jetstream(),
        store=store,
        settings=settings,
        params=params,
        record=record,
        metrics=app[metrics_key],
        delivered_below=after + 1,
        resume_token=mint_resume_token(
            app[secret_key],
            principal.tenant,
            session_id,
            settings.max_session_s + settings.resume_window_s,
        ),
    )
    for text in context[-5:]:
        session.remember(text)
    session.expect(owed)
    stats = app[stats_key]
    router = app[router_key]
    tenants[principal.tenant] += 1
    app[sessions_key].add(session)
    router.register(session)
    try:
        await ws.prepare(request)
        await store.put(record)
        stats.admitted += 1
        app[metrics_key].sessions_admitted.add(1, {"tenant": principal.tenant})
        app[metrics_key].sessions_active.add(1, {"tenant": principal.tenant})
        if resume:
            stats.resumed += 1
        log.info(
            "session %s %s (tenant %s, %d Hz, %s, %s)",
            session.id,
            "resumed" if resume else "opened",
            principal.tenant,
            params.sample_rate,
            params.language,
            params.framing,
        )
        await session.run(before_read=missed)
    finally:
        router.unregister(session)
        app[sessions_key].discard(session)
        tenants[principal.tenant] -= 1
        if tenants[principal.tenant] <= 0:
            del tenants[principal.tenant]
        code = session.close_code or ws.close_code or 1006
        stats.closed[code] += 1
        if ws.prepared:
            app[metrics_key].sessions_active.add(-1, {"tenant": principal.tenant})
        stats.segments += session.counters.segments
        stats.finals += session.counters.finals
        stats.errors += session.counters.errors
        stats.publish_retries += session.counters.publish_retries
        log.info("session %s closed %s: %s", session.id, code, session.counters)
    return ws


def _missed(stored: list[ResultMessage], after: int) -> list[ResultMessage]:
    """The stored results after `after`, one per segment (a Final over an earlier Error), in order."""
    best: dict[int, ResultMessage] = {}
    for result in stored:
        if result.segment > after and not isinstance(best.get(result.segment), Result):
            best[result.segment] = result
    return [best[n] for n in sorted(best)]


async def _retire(previous: Session | None, settings: EdgeSettings) -> None:
    """A device resumes a session whose old socket this edge still holds (half-open):
    close the old one and let it queue what it heard and save where it stands first."""
    if previous is None:
        return
    await previous.abort(WSCloseCode.POLICY_VIOLATION, "session resumed on another connection")
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(
            previous.finished.wait(), timeout=settings.outage_buffer_s + settings.publish_timeout_s
        )


async def stats_handler(request: web.Request) -> web.Response:
    body = request.app[stats_key].as_dict(active=len(request.app[sessions_key]))
    body["edge_id"] = request.app[edge_id_key]
    router = request.app[router_key]
    body["results"] = {"unroutable": router.unroutable, "recovered": router.recovered}
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


def _nats_ctx(settings: EdgeSettings):  # type: ignore[no-untyped-def]
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        router: ResultRouter | None = None

        def reconnected() -> None:
            if router is not None:
                router.reconnected()

        conn = await connect(
            settings.nats_url,
            f"escapement-edge-{app[edge_id_key]}",
            on_reconnect=reconnected,
            creds=settings.nats_creds,
        )
        app[nats_key] = conn
        await apply_all(conn.jetstream(), replicas=settings.stream_replicas)
        app[store_key] = SessionStore(conn)
        router = ResultRouter(conn, app[edge_id_key], settings.recheck_after_s)
        await router.start()
        app[router_key] = router
        admission = Admission(
            conn,
            AdmissionConfig(
                refresh_s=settings.admission_refresh_s,
                backlog_high_per_worker=settings.backlog_high_per_worker,
                backlog_low_per_worker=settings.backlog_low_per_worker,
                require_workers=settings.require_workers,
                retry_after_s=settings.retry_after_s,
                max_sessions_per_worker=settings.max_sessions_per_worker,
            ),
            active_sessions=lambda: len(app[sessions_key]),
        )
        await admission.start()
        app[admission_key] = admission

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
            name="status", subject=subjects.edge_status(app[edge_id_key]), handler=status
        )
        yield
        # Bounded: a NATS that does not answer must not hold the edge's shutdown.
        for step in (admission.stop, service.stop, router.stop, conn.drain):
            try:
                await asyncio.wait_for(step(), timeout=5)
            except (TimeoutError, NatsError) as exc:
                log.warning("shutdown: %s did not finish cleanly: %r", step.__qualname__, exc)
        if not conn.is_closed:
            await conn.close()

    return ctx


async def _drain_sessions(app: web.Application) -> None:
    """Shutdown: refuse new sessions, give open ones `drain_s` to get what is owed, then 1001."""
    if admission_key in app:
        app[admission_key].draining = True
    sessions = list(app[sessions_key])
    if sessions:
        log.info("draining %d session(s) for up to %.0fs", len(sessions), app[settings_key].drain_s)
    drain_s = app[settings_key].drain_s
    try:  # bounded as a whole: a socket that will not close must not hold the shutdown
        await asyncio.wait_for(
            asyncio.gather(*(s.drain(drain_s) for s in sessions), return_exceptions=True),
            timeout=drain_s + 5,
        )
    except TimeoutError:
        log.warning("shutdown: some sessions did not close within %.0fs", drain_s + 5)


LOOPBACK = ("127.0.0.1", "localhost", "::1")


class EdgeConfigError(ValueError):
    pass


def _auth_setup(settings: EdgeSettings) -> tuple[Authenticator, bytes]:
    if not settings.auth_enabled and settings.host not in LOOPBACK:
        raise EdgeConfigError(
            f"auth may be switched off only on a loopback host, not {settings.host!r}"
        )
    if settings.auth_secret:
        secret = settings.auth_secret.encode()
    else:
        secret = secrets.token_bytes(32)
        if settings.auth_enabled:
            log.warning("no ESCAPEMENT_AUTH_SECRET: tokens minted elsewhere will not verify here")
    keys = load_api_keys(settings.api_keys_file or None, settings.api_keys or None)
    if settings.auth_enabled and not keys and not settings.auth_secret:
        log.warning(
            "auth is on but no API keys and no secret are configured: every device is refused"
        )
    if not settings.auth_enabled:
        log.warning("auth is OFF (loopback only): any local program may stream")
    return Authenticator(secret, keys, enabled=settings.auth_enabled), secret


class AccessLogger(AbstractAccessLogger):
    """Access log lines without the query string: `?token=` and `?resume=` carry secrets."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            '%s "%s %s" %s %.3fs',
            request.remote,
            request.method,
            request.path,
            response.status,
            time,
        )


def make_runner(app: web.Application) -> web.AppRunner:
    """An AppRunner whose keep-alive timeout also bounds slow handshakes."""
    settings = app[settings_key]
    return web.AppRunner(
        app,
        handle_signals=False,
        keepalive_timeout=settings.handshake_timeout_s,
        access_log_class=AccessLogger,
        shutdown_timeout=settings.drain_s + 5,  # handlers still running after the drain
    )


def create_app(settings: EdgeSettings) -> web.Application:
    """The edge, connecting to settings.nats_url when it starts."""
    app = web.Application()
    app[settings_key] = settings
    app[edge_id_key] = subjects.check_token(settings.edge_id or f"edge-{secrets.token_hex(4)}")
    app[sessions_key] = set()
    app[stats_key] = EdgeStats()
    app[metrics_key] = Metrics()
    app[tenants_key] = Counter()
    app[auth_key], app[secret_key] = _auth_setup(settings)
    app.cleanup_ctx.append(_nats_ctx(settings))
    app.on_shutdown.append(_drain_sessions)
    app.router.add_get("/v1/stream", stream_handler)
    app.router.add_get("/v1/stats", stats_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/", index)
    return app
