"""A process's observability for as long as it runs: `with telemetry(name, level):`.

What each service's `__main__` (and `escapement up`) does once: logging, plus
trace and metric export when the standard `OTEL_*` variables ask for it;
on the way out the exporters send what they hold and stop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from observability.logging import setup_logging
from observability.metrics import setup_metrics, shutdown_metrics
from observability.tracing import setup_tracing, shutdown_tracing


@contextlib.contextmanager
def telemetry(
    service_name: str, log_level: str | int = "INFO", json: bool = False
) -> Iterator[None]:
    setup_logging(log_level, json=json)
    setup_tracing(service_name)
    setup_metrics(service_name)
    try:
        yield
    finally:
        shutdown_metrics()
        shutdown_tracing()
