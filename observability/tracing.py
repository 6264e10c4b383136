"""Tracing: one trace per segment, carried across NATS in message headers.

`setup_tracing` is for `__main__`: it installs an SDK `TracerProvider` with an
OTLP/HTTP exporter only when the standard `OTEL_*` variables ask for export
(see `observability.otel_env`); otherwise the API's no-op provider stays and
spans cost next to nothing.

Across the queue, the publisher calls `inject_headers(headers)` inside its
span and publishes with those headers; the consumer calls
`extract_context(msg.headers)` and starts its span with `context=` that
result, so both sides land in one trace (W3C `traceparent`/`tracestate`, or
whatever `OTEL_PROPAGATORS` names).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.trace import TracerProvider

from observability.otel_env import export_requested, service_resource

log = logging.getLogger(__name__)

TRACER_NAME = "escapement"

_provider: TracerProvider | None = None


def setup_tracing(service_name: str) -> None:
    """Export spans over OTLP/HTTP if the environment asks for it; else do nothing.

    Endpoint, headers, timeout, compression, sampler and batch sizes all come
    from the standard `OTEL_*` variables, read by the SDK itself. Calling it
    again is a no-op.
    """
    global _provider
    if _provider is not None or not export_requested("traces"):
        return
    # Imported here: the exporter pulls in requests and protobuf, which a
    # process that exports nothing never needs.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=service_resource(service_name))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _provider = provider
    log.info("tracing: exporting spans of %s over OTLP/HTTP", service_name)


def shutdown_tracing() -> None:
    """Flush and stop the exporter `setup_tracing` started, if any."""
    global _provider
    provider, _provider = _provider, None
    if provider is not None:
        provider.shutdown()


def get_tracer(name: str = TRACER_NAME) -> trace.Tracer:
    """A tracer that follows the global provider, even one installed later."""
    return trace.get_tracer(name)


tracer = get_tracer()


class _HeaderGetter(Getter[Mapping[str, str]]):
    """Reads NATS headers, tolerating a hop that changed the header's case."""

    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        value = carrier.get(key)
        if value is None:
            lowered = key.lower()
            value = next((v for k, v in carrier.items() if k.lower() == lowered), None)
        return None if value is None else [value]

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return list(carrier)


_getter = _HeaderGetter()


def inject_headers(headers: dict[str, str], context: Context | None = None) -> dict[str, str]:
    """Add the trace context (of `context`, else the current one) to `headers`.

    Mutates and returns `headers`, so it reads well inline:
    `await js.publish(subject, payload, headers=inject_headers({...}))`.
    Adds nothing when there is no valid span context to continue (the no-op
    provider with no incoming trace).
    """
    propagate.inject(headers, context=context)
    return headers


def extract_context(headers: Mapping[str, str] | None) -> Context:
    """The trace context a message's headers carry; an empty context if none."""
    if not headers:
        return Context()
    return propagate.extract(headers, getter=_getter, context=Context())
