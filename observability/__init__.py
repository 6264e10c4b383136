"""Logging, tracing and metrics shared by the services.

Nothing is configured at import. A service's `__main__` runs inside
`with telemetry(service_name, log_level):`, which sets up logging, tracing and
metrics and shuts the exporters down on the way out. Export happens only when
the standard `OTEL_*` variables name an OTLP endpoint; metrics are also ready
for Prometheus to pull from `/metrics` (`prometheus_exposition`).
"""

from observability.logging import setup_logging
from observability.metrics import (
    Metrics,
    get_meter,
    prometheus_exposition,
    setup_metrics,
    shutdown_metrics,
)
from observability.telemetry import telemetry
from observability.tracing import (
    extract_context,
    get_tracer,
    inject_headers,
    setup_tracing,
    shutdown_tracing,
    tracer,
)

__all__ = [
    "Metrics",
    "extract_context",
    "get_meter",
    "get_tracer",
    "inject_headers",
    "prometheus_exposition",
    "setup_logging",
    "setup_metrics",
    "setup_tracing",
    "shutdown_metrics",
    "shutdown_tracing",
    "telemetry",
    "tracer",
]
