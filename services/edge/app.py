"""The edge's aiohttp application: `/v1/stream`, health, and the web page."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import WSCloseCode, web
from aiohttp.abc import AbstractAccessLogger
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.micro import add_service
from nats.micro.request import Request

from jetstream import subjects
from jetstream.setup import apply_all
from jetstream.subjects import lane_of_model
from observability.metrics import ATTR_REASON, Metrics
from schemas.device import REASON_HEADER
from schemas.pipeline import ResultMessage, SessionRecord
from services.common.discovery import last_seen, worker_languages
from services.common.metrics_http import metrics_handler
from services.common.natsconn import connect
from services.edge import dashboard, deepgram, health, probe, queue_view, resume, transcriptions
from services.edge.admission import Admission, AdmissionConfig, parse_tenant_quotas
from services.edge.auth import Authenticator, AuthError, load_api_keys, mint_resume_token
from services.edge.origins import GUARDED_PATHS, OriginPolicy
from services.edge.params import (
    BadRequest,
    ModelUnavailable,
    StreamParams,
    check_language,
    parse_stream_params,
    route_model,
)
from services.edge.router import ResultRouter
from services.edge.session import Dialect, Session, SessionCounters
from services.edge.settings import EdgeSettings
from services.edge.store import ResumeRefused, SessionStore
from services.edge.stream import StreamStart

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
    interims: int = 0
    errors: int = 0
    publish_retries: int = 0

    def add(self, counters: SessionCounters) -> None:
        self.segments += counters.segments
        self.finals += counters.finals
        self.interims += counters.interims
        self.errors += counters.errors
        self.publish_retries += counters.publish_retries

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
            "interims": self.interims,
            "errors": self.errors,
            "publish_retries": self.publish_retries,
        }


stats_key = web.AppKey("stats", EdgeStats)
auth_key = web.AppKey("auth", Authenticator)
secret_key = web.AppKey("secret", bytes)
admission_key = web.AppKey("admission", Admission)
store_key = web.AppKey("store", SessionStore)
metrics_key = web.AppKey("metrics", Metrics)
transcriptions_key = web.AppKey("transcriptions", transcriptions.Transcriptions)


def refuse(
    request: web.Request,
    status: int,
    reason: str,
    message: str,
    retry_after: float | None = None,
    detail: Mapping[str, object] | None = None,  # more for the body (tenant_quota: quota, ...)
) -> web.Response:
    request.app[stats_key].refused[reason] += 1
    request.app[metrics_key].sessions_refused.add(1, {ATTR_REASON: reason})
    headers = {REASON_HEADER: reason}
    body: dict[str, object] = {"reason": reason, "message": message, **(detail or {})}
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, round(retry_after)))
        body["retry_after"] = max(1, round(retry_after))
    return web.json_response(body, status=status, headers=headers)


class Refused(Exception):
    """A session refused before the upgrade, with an HTTP status and a reason code."""

    def __init__(
        self,
        status: int,
        reason: str,
        message: str,
        retry_after: float | None = None,
        detail: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.reason, self.message, self.retry_after = (
            status,
            reason,
            message,
            retry_after,
        )
        self.detail = detail


@dataclass(frozen=True)
class Opening:
    """What a new socket starts from: a fresh session, or a resumed one."""

    record: SessionRecord
    start: StreamStart
    missed: list[ResultMessage]
    resumed: bool


Negotiate = Callable[[], tuple[StreamParams, EdgeSettings, Dialect | None]]


async def stream_handler(request: web.Request) -> web.StreamResponse:
    """`/v1/stream`: the native device protocol."""
    settings = request.app[settings_key]
    return await _accept(
        request,
        lambda: (parse_stream_params(request.query, settings.default_language), settings, None),
    )


async def listen_handler(request: web.Request) -> web.StreamResponse:
    """`/v1/listen`: Deepgram's live-streaming protocol (services/edge/deepgram.py)."""
    return await _accept(
        request, lambda: deepgram.negotiate(request.query, request.app[settings_key])
    )


async def _accept(request: web.Request, negotiate: Negotiate) -> web.StreamResponse:
    """Check the query, authenticate, admit and open a session, then serve its socket."""
    app = request.app
    try:
        params, settings, dialect = negotiate()
        principal = app[auth_key].authenticate(request.headers, request.query)
        if params.fast and not settings.may_go_fast(principal.method, principal.tenant):
            raise Refused(
                403,
                "pace_not_allowed",
                f"tenant {principal.tenant!r} may not stream faster than real time (pace=fast); "
                "ask the operator to list it in ESCAPEMENT_FAST_PACE_TENANTS",
            )
        workers = worker_languages(last_seen(app[nats_key], subjects.WORKER_SERVICE))
        # 400 for a model nobody here knows, 503 for one no live worker runs
        params, workers = route_model(params, workers, settings.default_model)
        params = check_language(params, workers)  # 400 for a language no worker speaks
        refusal = app[admission_key].check(principal.tenant, lane_of_model(params.model))
        if refusal is not None:
            raise Refused(
                refusal.status, refusal.reason, refusal.message, refusal.retry_after, refusal.detail
            )
        opening = await _open(app, request, principal.tenant, params)
    except BadRequest as exc:
        return refuse(request, 400, exc.reason, exc.message)
    except ModelUnavailable as exc:
        retry = app[settings_key].retry_after_s
        return refuse(request, 503, "no_workers", exc.message, retry, {"model": exc.model})
    except (AuthError, ResumeRefused, Refused) as exc:
        return refuse(
            request,
            exc.status,
            exc.reason,
            exc.message,
            getattr(exc, "retry_after", None),
            getattr(exc, "detail", None),
        )
    record = opening.record
    ws = web.WebSocketResponse(
        max_msg_size=settings.max_frame_bytes, heartbeat=settings.heartbeat_s, autoping=True
    )
    session = Session(
        ws=ws,
        js=app[nats_key].jetstream(),
        nc=app[nats_key],
        store=app[store_key],
        settings=settings,
        params=params,
        record=record,
        metrics=app[metrics_key],
        start=opening.start,
        resume_token=mint_resume_token(
            app[secret_key],
            record.tenant,
            record.session_id,
            settings.max_session_s + settings.resume_window_s,
            jti=record.resume_id,  # single-use: the record names the one token that resumes it
        ),
        dialect=dialect,
    )
    await _serve(request, ws, session, opening)
    return ws


async def _open(
    app: web.Application, request: web.Request, tenant: str, params: StreamParams
) -> Opening:
    """A new session's record, or a resumed one's with what its device missed.

    A resume token comes in the `X-Escapement-Resume` header (preferred) or `?resume=`;
    it is checked (and must be the session's current one) before a live socket of the
    session is touched."""
    edge_id = app[edge_id_key]
    token = resume.token_of(request.headers, request.query)
    if not token:
        record = SessionRecord(
            session_id=secrets.token_urlsafe(12),
            tenant=tenant,
            edge_id=edge_id,
            sample_rate=params.sample_rate,
            language=params.language,
            framing=params.framing,
            resume_id=resume.new_token_id(),
        )
        return Opening(record, StreamStart(), [], resumed=False)
    settings = app[settings_key]

    async def retire(session_id: str) -> None:
        await _retire(app[router_key].sessions.get(session_id), settings)

    try:
        plan = await resume.take_over(
            app[nats_key].jetstream(),
            app[store_key],
            app[secret_key],
            token,
            tenant,
            request.query.get("last_segment", "-1"),
            settings.resume_window_s,
            edge_id,
            retire,
        )
    except ValueError:
        raise Refused(400, "bad_last_segment", "last_segment must be an integer") from None
    except (NatsError, TimeoutError):
        raise Refused(503, "nats_unavailable", "session store unreachable", 2) from None
    return Opening(plan.record, plan.start, plan.missed, resumed=True)


async def _serve(
    request: web.Request, ws: web.WebSocketResponse, session: Session, opening: Opening
) -> None:
    app = request.app
    stats, metrics, router, admission = (
        app[stats_key],
        app[metrics_key],
        app[router_key],
        app[admission_key],
    )
    tenant = {"tenant": session.tenant}
    lane = lane_of_model(session.params.model)
    admission.opened(session.tenant, lane)
    app[sessions_key].add(session)
    router.register(session)
    try:
        await ws.prepare(request)
        await app[store_key].put(opening.record)
        stats.admitted += 1
        stats.resumed += opening.resumed
        metrics.sessions_admitted.add(1, tenant)
        metrics.sessions_active.add(1, tenant)
        log.info(
            "session %s %s (tenant %s, %d Hz, %s, %s)",
            session.id,
            "resumed" if opening.resumed else "opened",
            session.tenant,
            session.params.sample_rate,
            session.params.language,
            session.params.framing,
        )
        await session.run(before_read=opening.missed)
    finally:
        router.unregister(session)
        app[sessions_key].discard(session)
        admission.closed(session.tenant, lane)
        code = session.close_code or ws.close_code or 1006
        stats.closed[code] += 1
        if ws.prepared:
            metrics.sessions_active.add(-1, tenant)
        stats.add(session.counters)
        log.info("session %s closed %s: %s", session.id, code, session.counters)


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


async def index(request: web.Request) -> web.StreamResponse:
    page = STATIC / "index.html"
    if not page.is_file():
        return web.Response(text="Escapement edge: connect a WebSocket to /v1/stream\n")
    return web.FileResponse(page)


def _nats_ctx(settings: EdgeSettings):  # type: ignore[no-untyped-def]
    try:
        tenant_quotas = parse_tenant_quotas(settings.tenant_quotas)
    except ValueError as exc:
        raise EdgeConfigError(f"ESCAPEMENT_TENANT_QUOTAS: {exc}") from None
    keys = load_api_keys(settings.api_keys_file or None, settings.api_keys or None)

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        def queued_audio() -> dict[str, float]:  # by tenant, for admission's quotas
            queued: Counter[str] = Counter()
            for session in app[sessions_key]:
                queued[session.tenant] += session.queued_audio_s
            return queued

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
        restarts = app[metrics_key].loop_restarts
        router = ResultRouter(conn, app[edge_id_key], settings.recheck_after_s, restarts)
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
                session_load=settings.session_load,
                decode_utilisation=settings.decode_utilisation,
                fallback_sessions_per_worker=settings.fallback_sessions_per_worker,
                max_connections=settings.max_connections,
                max_connections_per_tenant=settings.max_connections_per_tenant,
                tenant_share=settings.tenant_share,
                queued_audio_per_worker_s=settings.queued_audio_per_worker_s,
                tenant_active_s=settings.tenant_active_s,
                tenant_quotas=tenant_quotas,
                known_tenants=frozenset(keys.values()),
            ),
            queued_audio,
            restarts,
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


origins_key = web.AppKey("origins", OriginPolicy)


@web.middleware
async def origin_guard(request: web.Request, handler):  # type: ignore[no-untyped-def]
    """Browsers: a page of an Origin not allowed gets 403 before any upgrade or upload."""
    if request.path in GUARDED_PATHS and not request.app[origins_key].allows(
        request.headers.get("Origin"), request.host
    ):
        return refuse(
            request,
            403,
            "origin_not_allowed",
            f"origin {request.headers['Origin'][:100]!r} is not allowed here "
            "(ESCAPEMENT_ALLOWED_ORIGINS)",
        )
    return await handler(request)


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
    app[auth_key], app[secret_key] = _auth_setup(settings)
    try:
        app[origins_key] = OriginPolicy(settings.allowed_origins)
    except ValueError as exc:
        raise EdgeConfigError(f"ESCAPEMENT_ALLOWED_ORIGINS: {exc}") from None
    app.middlewares.append(origin_guard)
    app[transcriptions_key] = transcriptions.Transcriptions()
    app.cleanup_ctx.append(_nats_ctx(settings))
    app.cleanup_ctx.append(queue_view.context(nats_key, edge_id_key, admission_key))
    app.on_shutdown.append(_drain_sessions)
    app.router.add_get("/v1/stream", stream_handler)
    app.router.add_get("/v1/listen", listen_handler)
    app.router.add_get("/v1/stats", stats_handler)
    app.router.add_routes(health.routes(admission_key, edge_id_key))
    app.router.add_get("/", index)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_routes(dashboard.routes(stats_key, admission_key, metrics_key, edge_id_key))
    app.router.add_routes(probe.routes(auth_key, admission_key))
    uploads = transcriptions.Keys(
        settings_key,
        nats_key,
        router_key,
        edge_id_key,
        auth_key,
        admission_key,
        metrics_key,
        transcriptions_key,
    )
    app.router.add_routes(transcriptions.routes(uploads))  # POST /v1/audio/transcriptions
    app.router.add_static("/static", STATIC)
    return app
