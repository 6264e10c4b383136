"""`GET /metrics` for Prometheus, on the edge's own port and on a worker's small server.

The edge adds `metrics_handler` to its routes. A worker is a NATS process
with no HTTP of its own, so `serve_metrics` gives it one listening on
`ESCAPEMENT_METRICS_HOST:ESCAPEMENT_METRICS_PORT` (`MetricsEndpoint`).
What is served is this process's registry: the OpenTelemetry instruments
(once `telemetry()` installed the Prometheus reader) and the Python
process collectors (CPU, memory, file descriptors).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import msgspec
from aiohttp import web

from observability import prometheus_exposition

log = logging.getLogger(__name__)


class MetricsEndpoint(msgspec.Struct, frozen=True, kw_only=True):
    """Where a worker serves `/metrics`: `ESCAPEMENT_METRICS_HOST` / `_PORT`."""

    metrics_host: str = "127.0.0.1"  # 0.0.0.0 in a container, for Prometheus to reach
    metrics_port: int = -1  # -1: no server; 0: any free port (logged)


async def metrics_handler(request: web.Request) -> web.Response:
    body, content_type = prometheus_exposition(request.headers.get("Accept", ""))
    # the whole type, with the version Prometheus negotiates on (text 0.0.4, OpenMetrics 1.0.0)
    return web.Response(body=body, headers={"Content-Type": content_type})


def metrics_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/metrics", metrics_handler)
    return app


@contextlib.asynccontextmanager
async def serve_metrics(endpoint: MetricsEndpoint) -> AsyncIterator[int | None]:
    """Serve `/metrics` while inside; yields the port, or None when there is no server
    (switched off, or the address is taken: the process goes on without it)."""
    if endpoint.metrics_port < 0:
        yield None
        return
    runner = web.AppRunner(metrics_app(), handle_signals=False, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, endpoint.metrics_host, endpoint.metrics_port)
        try:
            await site.start()
        except OSError as exc:
            log.warning(
                "metrics: cannot listen on %s:%d (%s); no /metrics from this process",
                endpoint.metrics_host,
                endpoint.metrics_port,
                exc,
            )
            yield None
            return
        port = int(runner.addresses[0][1])
        log.info("metrics on http://%s:%d/metrics", endpoint.metrics_host, port)
        yield port
    finally:
        await runner.cleanup()
