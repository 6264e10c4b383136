"""Metrics: the instruments the services record, and their export.

`setup_metrics` is for `__main__`: it installs an SDK `MeterProvider` with a
periodic OTLP/HTTP exporter when the standard `OTEL_*` variables ask for
export (see `observability.otel_env`; the interval is
`OTEL_METRIC_EXPORT_INTERVAL`, ms, default 60000), and with a Prometheus
reader when asked to (`prometheus=True`: `telemetry()` asks unless the
environment says otherwise); the reader is collected on each scrape of
`/metrics` (`prometheus_exposition`). With neither, the API's no-op provider
stays, and recording on its instruments does nothing.

Prometheus names follow the OpenTelemetry exporter's rules: dots become
underscores, the unit is appended, counters end in `_total`
(`escapement.sessions.refused` -> `escapement_sessions_refused_total`,
`escapement.final.latency` in ms -> `escapement_final_latency_milliseconds_*`).

`Metrics()` may be built before or after `setup_metrics`: instruments from the
global meter follow whichever provider is installed. Build one per process in
`__main__` and pass it down.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from opentelemetry import metrics
from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, Histogram, Meter, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.util.types import Attributes

from observability.otel_env import export_requested, service_resource

if TYPE_CHECKING:
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import CollectorRegistry

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
_prometheus = False


def setup_metrics(service_name: str, prometheus: bool = False) -> None:
    """Export metrics over OTLP/HTTP if the environment asks for it, and serve them
    to Prometheus if `prometheus`; with neither, do nothing.

    Calling it again is a no-op.
    """
    global _provider, _prometheus
    if _provider is not None:
        return
    readers = []
    if prometheus:
        readers.append(prometheus_reader())
    if export_requested("metrics"):
        # Imported here: the exporter pulls in requests and protobuf.
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    if not readers:
        return
    provider = MeterProvider(resource=service_resource(service_name), metric_readers=readers)
    metrics.set_meter_provider(provider)
    _provider, _prometheus = provider, prometheus
    log.info(
        "metrics of %s: %s",
        service_name,
        " and ".join(
            (["served on /metrics"] if prometheus else [])
            + (["exported over OTLP/HTTP"] if len(readers) > prometheus else [])
        ),
    )


def prometheus_reader(registry: CollectorRegistry | None = None) -> PrometheusMetricReader:
    """The reader `setup_metrics` installs: it adds our instruments to `registry`
    (prometheus_client's default one, which `/metrics` serves)."""
    # Imported here: only a process that serves /metrics needs it.
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import REGISTRY

    # No otel_scope_* labels on every series: all of ours come from one meter.
    return PrometheusMetricReader(
        scope_info_enabled=False, registry=registry if registry is not None else REGISTRY
    )


def prometheus_enabled() -> bool:
    """Whether `setup_metrics` installed the Prometheus reader in this process."""
    return _prometheus


def prometheus_exposition(accept: str = "") -> tuple[bytes, str]:
    """This process's metrics in the Prometheus text format (or OpenMetrics, if
    `accept` asks for it): the body and its content type, for `GET /metrics`."""
    from prometheus_client import REGISTRY
    from prometheus_client.exposition import choose_encoder

    encoder, content_type = choose_encoder(accept)
    return encoder(REGISTRY), content_type


def shutdown_metrics() -> None:
    """Export a last time and stop the reader `setup_metrics` started, if any."""
    global _provider, _prometheus
    provider, _provider, _prometheus = _provider, None, False
    if provider is not None:
        provider.shutdown()


def get_meter(name: str = METER_NAME) -> Meter:
    """A meter that follows the global provider, even one installed later."""
    return metrics.get_meter(name)


class Recent:
    """The values recorded in the last `horizon_s` seconds (at most `size` of them),
    for live views (`/dashboard`, `escapement status`) that want exact recent
    percentiles rather than a histogram's cumulative buckets."""

    def __init__(
        self,
        horizon_s: float = 60.0,
        size: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.horizon_s = horizon_s
        self._clock = clock
        self._items: deque[tuple[float, float]] = deque(maxlen=size)

    def add(self, value: float) -> None:
        self._items.append((self._clock(), float(value)))

    def values(self) -> list[float]:
        cutoff = self._clock() - self.horizon_s
        while self._items and self._items[0][0] < cutoff:
            self._items.popleft()
        return [v for _, v in self._items]

    def summary(self, quantiles: Sequence[float] = (0.5, 0.9, 0.99)) -> dict[str, float | None]:
        """`{"count": n, "p50": ..., "p90": ..., "p99": ...}` over the window (None: no data)."""
        values = sorted(self.values())
        out: dict[str, float | None] = {"count": len(values)}
        for q in quantiles:
            key = f"p{q * 100:g}"
            out[key] = values[min(len(values) - 1, int(q * len(values)))] if values else None
        return out


class RecordingHistogram:
    """An OpenTelemetry histogram that also keeps its recent values in a `Recent`."""

    def __init__(self, histogram: Histogram, recent: Recent) -> None:
        self._histogram = histogram
        self.recent = recent

    def record(
        self, amount: float, attributes: Attributes = None, context: Context | None = None
    ) -> None:
        self._histogram.record(amount, attributes, context)
        self.recent.add(amount)


class Metrics:
    """Escapement's instruments, created once.

    Counters take `add(1, attributes)`, histograms `record(value, attributes)`:

    - `sessions_admitted`, `sessions_refused` (`{ATTR_REASON: ...}`),
      `sessions_active` (up-down: +1 on admit, -1 on close) -- edge;
    - `segments_published`, `segments_failed` -- edge, per segment (and its
      JetStream ack or refusal);
    - `results_delivered` -- edge, per result sent to a device;
    - `bad_input` (`{ATTR_KIND: ...}`) -- edge, per refused frame or message;
    - `final_latency_ms` -- end of speech to the final reaching the socket (its
      last minute also kept in `final_latency_ms.recent`, for live views);
    - `inference_ms`, `rtf` (inference time / audio duration) -- worker;
    - `engine_breaker_opens` (`{engine, reason: error|deadline}`),
      `engine_breaker_open` (up-down: 1 while an engine's breaker is open),
      `engine_fallbacks` (`{engine}`: segments that engine failed, passed on),
      `engine_stuck` (up-down: calls abandoned at their deadline, still running) -- worker;
    - `loop_restarts` (`{loop}`) -- background loops restarted (services/common/supervise.py);
    - `slow_readers` -- sockets closed 4009 for not reading; `finalize_limited` --
      `Finalize` messages ignored by the rate limit -- edge.
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
        self.final_latency_ms = RecordingHistogram(
            m.create_histogram(
                "escapement.final.latency",
                unit="ms",
                description="End of speech to the final result sent to the device",
                explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_MS,
            ),
            Recent(),
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
        self.engine_breaker_opens = m.create_counter(
            "escapement.engine.breaker.opens",
            unit="{open}",
            description="Times an engine's circuit breaker opened, by engine and reason",
        )
        self.engine_breaker_open = m.create_up_down_counter(
            "escapement.engine.breaker.open",
            unit="{engine}",
            description="Engines whose circuit breaker is open now (1 per open engine)",
        )
        self.engine_fallbacks = m.create_counter(
            "escapement.engine.fallbacks",
            unit="{segment}",
            description="Segments an engine failed and passed to the next in its chain",
        )
        self.engine_stuck = m.create_up_down_counter(
            "escapement.engine.stuck",
            unit="{call}",
            description="Engine calls abandoned at their deadline that still hold a thread",
        )
        self.loop_restarts = m.create_counter(
            "escapement.loop.restarts",
            unit="{restart}",
            description="Background loops restarted after an unexpected exception, by loop",
        )
        self.slow_readers = m.create_counter(
            "escapement.sessions.slow_reader",
            unit="{session}",
            description="Sockets closed (4009) because their client did not read its events",
        )
        self.finalize_limited = m.create_counter(
            "escapement.finalize.limited",
            unit="{message}",
            description="Finalize messages ignored by the per-session rate limit",
        )


# --- the JetStream queue, as an edge sees it -----------------------------------------

# key -> (instrument name, unit, description); attributes: ATTR_STREAM, ATTR_CONSUMER
ATTR_STREAM = "stream"
ATTR_CONSUMER = "consumer"
QUEUE_GAUGES: dict[str, tuple[str, str, str]] = {
    "consumer.pending": (
        "escapement.jetstream.consumer.pending",
        "{message}",
        "Messages not yet delivered to a worker",
    ),
    "consumer.ack_pending": (
        "escapement.jetstream.consumer.ack_pending",
        "{message}",
        "Messages delivered to a worker and not yet acknowledged (in flight)",
    ),
    "consumer.redelivered": (
        "escapement.jetstream.consumer.redelivered",
        "{message}",
        "Messages delivered more than once and not yet acknowledged",
    ),
    "consumer.waiting": (
        "escapement.jetstream.consumer.waiting",
        "{request}",
        "Pull requests waiting for messages (idle workers)",
    ),
    "stream.messages": (
        "escapement.jetstream.stream.messages",
        "{message}",
        "Messages stored on the stream",
    ),
    "stream.bytes": ("escapement.jetstream.stream.size", "By", "Bytes stored on the stream"),
    "dead_letters": (
        "escapement.jetstream.dead_letters",
        "{message}",
        "Segments kept on the dead-letter stream ASR_DEAD",
    ),
    "workers.alive": (
        "escapement.workers.alive",
        "{worker}",
        "Workers answering NATS micro discovery",
    ),
}

Readings = Mapping[str, Iterable[tuple[float, Mapping[str, str]]]]


def observe_queue(read: Callable[[], Readings], meter: Meter | None = None) -> None:
    """Observable gauges for `QUEUE_GAUGES`, read at each collection from `read()`:
    `{key: [(value, attributes), ...]}`; a key it leaves out reports nothing."""
    m = meter if meter is not None else get_meter()

    def callback(key: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(value, dict(attrs)) for value, attrs in read().get(key, ())]

        return observe

    for key, (name, unit, description) in QUEUE_GAUGES.items():
        m.create_observable_gauge(name, [callback(key)], unit=unit, description=description)
