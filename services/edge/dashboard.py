"""`/dashboard`: the pipeline at a glance for an operator, and `/v1/dashboard`, its data.

The page (static/dashboard.html, no external assets) polls `/v1/dashboard`
once a second and draws small SVG charts of the last minutes. The JSON is
what this edge knows now, answered from memory (no NATS call per request):

- `sessions`: open now, admitted, resumed, closed by code (since start);
- `refused`: refusals by reason since start, and `admitting`: whether a new
  session would be admitted now, and if not why;
- `workers`: alive (NATS micro discovery) and busy (segments in flight on
  them, from the consumers' ack-pending);
- `queue`: the JetStream queue (`queue_view`): pending, in flight,
  redelivered, interim looks waiting, dead letters, stored bytes, and
  admission's backlog against its high-water mark;
- `latency_ms`: end of speech to Final over the last minute (p50/p90/p99);
- `decoding`: this edge's results over the last minute: RTF, inference
  time, audio decoded per second, engines.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from jetstream import subjects
from observability.metrics import Metrics
from services.edge.admission import Admission
from services.edge.queue_view import QueueState, queue_view_key

if TYPE_CHECKING:
    from services.edge.app import EdgeStats

STATIC = Path(__file__).parent / "static"


def _queue(state: QueueState, admission: Admission) -> dict[str, object]:
    finals = state.consumer(subjects.CONSUMER_WORKERS)
    looks = state.consumer(subjects.CONSUMER_INTERIMS)
    segments = state.streams.get(subjects.STREAM_SEGMENTS)
    return {
        "pending": finals.pending if finals else 0,
        "in_flight": finals.ack_pending if finals else 0,
        "redelivered": finals.redelivered if finals else 0,
        "interims_waiting": looks.pending if looks else 0,
        "dead_letters": state.dead_letters,
        "bytes": segments.bytes if segments else 0,
        "backlog": admission.backlog,
        "high_water": admission.high_water,
        "full": admission.full,
        "age_s": round(time.time() - state.at, 1) if state.at else None,
    }


def routes(
    stats_key: web.AppKey[EdgeStats],
    admission_key: web.AppKey[Admission],
    metrics_key: web.AppKey[Metrics],
    edge_id_key: web.AppKey[str],
) -> list[web.RouteDef]:
    """`/dashboard` and `/v1/dashboard` for an app keeping these under these keys
    (and its `QueueView` under `queue_view_key`)."""

    async def page(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "dashboard.html")

    async def data(request: web.Request) -> web.Response:
        app = request.app
        stats, metrics = app[stats_key], app[metrics_key]
        body: dict[str, object] = {
            "edge_id": app[edge_id_key],
            "time": time.time(),
            "refused": dict(stats.refused),
            "latency_ms": metrics.final_latency_ms.recent.summary(),
        }
        admission = app.get(admission_key)
        view = app.get(queue_view_key)
        if admission is None or view is None:  # not connected to NATS yet
            body["sessions"] = {"active": 0, "admitted": stats.admitted}
            return web.json_response(body)
        refusal = admission.check()
        in_flight = sum(c.ack_pending for c in view.state.consumers.values())
        body |= {
            "sessions": {
                "active": admission.active_sessions(),
                "admitted": stats.admitted,
                "resumed": stats.resumed,
                "closed": {str(code): n for code, n in stats.closed.items()},
            },
            "admitting": {
                "ok": refusal is None,
                "reason": refusal.reason if refusal else None,
                "message": refusal.message if refusal else "new sessions are admitted",
            },
            "workers": {"alive": admission.workers, "busy": min(admission.workers, in_flight)},
            "queue": _queue(view.state, admission),
            "decoding": view.decoding.summary(),
        }
        return web.json_response(body)

    return [web.get("/dashboard", page), web.get("/v1/dashboard", data)]
