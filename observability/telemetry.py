"""A process's observability for as long as it runs: `with telemetry(name, level):`.

What each service's `__main__` (and `escapement up`) does once: logging (JSON
lines when `ESCAPEMENT_LOG_FORMAT=json`), trace and metric export when the
standard `OTEL_*` variables ask for it, and metrics ready for Prometheus to
scrape unless they say otherwise (`otel_env.prometheus_requested`); on the
way out the exporters send what they hold and stop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from observability.logging import log_format_json, setup_logging
from observability.metrics import setup_metrics, shutdown_metrics
from observability.otel_env import prometheus_requested
from observability.tracing import setup_tracing, shutdown_tracing


@contextlib.contextmanager
def telemetry(
    service_name: str,
    log_level: str | int = "INFO",
    json: bool | None = None,
    prometheus: bool | None = None,
) -> Iterator[None]:
    """`json` / `prometheus` None: as the environment says."""
    setup_logging(log_level, json=log_format_json() if json is None else json)
    setup_tracing(service_name)
    setup_metrics(
        service_name, prometheus=prometheus_requested() if prometheus is None else prometheus
    )
    try:
        yield
    finally:
        shutdown_metrics()
        shutdown_tracing()
