"""Metrics: the instruments the services record, and their export.

`setup_metrics` is for `__main__`: it installs an SDK `MeterProvider` with a
periodic OTLP/HTTP exporter only when the standard `OTEL_*` variables ask for
export (see `observability.otel_env`); the interval is
`OTEL_METRIC_EXPORT_INTERVAL` (ms, default 60000). Otherwise the API's no-op
provider stays, and recording on its instruments does nothing.

`Metrics()` may be built before or after `setup_metrics`: instruments from the
global meter follow whichever provider is installed. Build one per process in
`__main__` and pass it down.
"""

from __future__ import annotations

import logging

from opentelemetry import metrics
from opentelemetry.metrics import Meter
from opentelemetry.sdk.metrics import MeterProvider

from observability.otel_env import export_requested, service_resource

log = logging.getLogger(__name__)

METER_NAME = "escapement"

# Attribute keys, named once.
ATTR_REASON = "reason"  # sessions_refused: why (e.g. "overloaded", "unauthorized")
ATTR_KIND = "kind"  # bad_input: what was wrong (e.g. "encoding", "oversized", "msgpack")

LATENCY_BUCKETS_MS = (
    5, 10, 25, 50, 75, 100, 150, 200, 300, 500, 750,
    1000, 1500, 2000, 3000, 5000, 10000, 30000,
)  # fmt: skip
RTF_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0)

_provider: MeterProvider | None = None


def setup_metrics(service_name: str) -> None:
    """Export metrics over OTLP/HTTP if the environment asks for it; else do nothing.

    Calling it again is a no-op.
    """
    global _provider
    if _provider is not None or not export_requested("metrics"):
        return
    # Imported here: the exporter pulls in requests and protobuf.
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    reader = PeriodicExportingMetricReader(OTLPMetricExporter())
    provider = MeterProvider(resource=service_resource(service_name), metric_readers=[reader])
    metrics.set_meter_provider(provider)
    _provider = provider
    log.info("metrics: exporting metrics of %s over OTLP/HTTP", service_name)


def shutdown_metrics() -> None:
    """Export a last time and stop the reader `setup_metrics` started, if any."""
    global _provider
    provider, _provider = _provider, None
    if provider is not None:
        provider.shutdown()


def get_meter(name: str = METER_NAME) -> Meter:
    """A meter that follows the global provider, even one installed later."""
    return metrics.get_meter(name)


class Metrics:
    """Escapement's instruments, created once.

    Counters take `add(1, attributes)`, histograms `record(value, attributes)`:

    - `sessions_admitted`, `sessions_refused` (`{ATTR_REASON: ...}`),
      `sessions_active` (up-down: +1 on admit, -1 on close) -- edge;
    - `segments_published`, `segments_failed` -- edge, per segment (and its
      JetStream ack or refusal);
    - `results_delivered` -- edge, per result sent to a device;
    - `bad_input` (`{ATTR_KIND: ...}`) -- edge, per refused frame or message;
    - `final_latency_ms` -- end of speech to the final reaching the socket;
    - `inference_ms`, `rtf` (inference time / audio duration) -- worker.
    """

    def __init__(self, meter: Meter | None = None) -> None:
        m = meter if meter is not None else get_meter()
        self.sessions_admitted = m.create_counter(
            "escapement.sessions.admitted", unit="{session}", description="Sessions admitted"
        )
        self.sessions_refused = m.create_counter(
            "escapement.sessions.refused",
            unit="{session}",
            description="Sessions refused, by reason",
        )
        self.sessions_active = m.create_up_down_counter(
            "escapement.sessions.active", unit="{session}", description="Sessions open now"
        )
        self.segments_published = m.create_counter(
            "escapement.segments.published",
            unit="{segment}",
            description="Segments acknowledged by JetStream",
        )
        self.segments_failed = m.create_counter(
            "escapement.segments.failed",
            unit="{segment}",
            description="Segments that could not be queued or transcribed",
        )
        self.results_delivered = m.create_counter(
            "escapement.results.delivered",
            unit="{result}",
            description="Results sent to devices",
        )
        self.bad_input = m.create_counter(
            "escapement.bad_input",
            unit="{event}",
            description="Malformed or refused client input, by kind",
        )
        self.final_latency_ms = m.create_histogram(
            "escapement.final.latency",
            unit="ms",
            description="End of speech to the final result sent to the device",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_MS,
        )
        self.inference_ms = m.create_histogram(
            "escapement.inference.duration",
            unit="ms",
            description="Time the engine took for one segment",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_MS,
        )
        self.rtf = m.create_histogram(
            "escapement.inference.rtf",
            unit="1",
            description="Real-time factor: inference time over audio duration",
            explicit_bucket_boundaries_advisory=RTF_BUCKETS,
        )
