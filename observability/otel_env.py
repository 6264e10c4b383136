"""What the standard `OTEL_*` variables ask for, and the resource we report as.

Export is opt-in: a signal is exported only when an OTLP endpoint is named
(`OTEL_EXPORTER_OTLP_ENDPOINT` or the signal's own `..._TRACES_ENDPOINT` /
`..._METRICS_ENDPOINT`), `OTEL_SDK_DISABLED` is not `true`, and the signal's
`OTEL_<SIGNAL>_EXPORTER` (default `otlp`) includes `otlp`. Without that the
API's no-op providers stay in place: no threads, no sockets, no warnings.

Prometheus (`/metrics`, pulled, so nothing leaves unasked) is the one
exception: a service's `telemetry()` serves it unless `OTEL_SDK_DISABLED=true`
or `OTEL_METRICS_EXPORTER` is set and does not name `prometheus` (e.g. `none`,
or `otlp` alone).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from importlib import metadata
from typing import Literal

from opentelemetry.sdk.resources import OTELResourceDetector, Resource

log = logging.getLogger(__name__)

Signal = Literal["traces", "metrics"]

SERVICE_NAMESPACE = "escapement"
SUPPORTED_PROTOCOL = "http/protobuf"
KNOWN_EXPORTERS = {"traces": {"otlp", "none"}, "metrics": {"otlp", "prometheus", "none"}}


def _env(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def sdk_disabled(environ: Mapping[str, str] | None = None) -> bool:
    return _env(environ).get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def _exporters(signal: Signal, env: Mapping[str, str], default: str) -> set[str]:
    return {
        name.strip().lower()
        for name in env.get(f"OTEL_{signal.upper()}_EXPORTER", default).split(",")
        if name.strip()
    }


def export_requested(signal: Signal, environ: Mapping[str, str] | None = None) -> bool:
    """Whether the environment asks for OTLP export of `signal`."""
    env = _env(environ)
    if sdk_disabled(env):
        return False
    wanted = _exporters(signal, env, "otlp")
    unsupported = wanted - KNOWN_EXPORTERS[signal]
    if unsupported:
        log.warning(
            "OTEL_%s_EXPORTER names %s; available: %s",
            signal.upper(),
            ", ".join(sorted(unsupported)),
            ", ".join(sorted(KNOWN_EXPORTERS[signal] - {"none"})),
        )
    if "otlp" not in wanted:
        return False
    endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    signal_endpoint = env.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT", "").strip()
    if not (endpoint or signal_endpoint):
        return False
    protocol = (
        env.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL", "").strip()
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "").strip()
        or SUPPORTED_PROTOCOL
    )
    if protocol != SUPPORTED_PROTOCOL:
        log.warning(
            "OTLP protocol %r requested for %s; exporting with %s (use the collector's port 4318)",
            protocol,
            signal,
            SUPPORTED_PROTOCOL,
        )
    return True


def prometheus_requested(environ: Mapping[str, str] | None = None) -> bool:
    """Whether a service should serve its metrics for Prometheus to scrape (`/metrics`).

    Yes unless the SDK is disabled or `OTEL_METRICS_EXPORTER` is set without
    `prometheus` in it: unset, it means `otlp,prometheus` here.
    """
    env = _env(environ)
    if sdk_disabled(env):
        return False
    if not env.get("OTEL_METRICS_EXPORTER", "").strip():
        return True
    return "prometheus" in _exporters("metrics", env, "")


def _version() -> str:
    try:
        return metadata.version("escapement")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def service_resource(service_name: str) -> Resource:
    """`service.*` attributes for this process; `OTEL_SERVICE_NAME` and
    `OTEL_RESOURCE_ATTRIBUTES` override what the code says.

    `service.instance.id` tells replicas apart (two workers must not add to
    the same cumulative series).
    """
    ours = {
        "service.name": service_name,
        "service.namespace": SERVICE_NAMESPACE,
        "service.version": _version(),
        "service.instance.id": f"{socket.gethostname()}-{os.getpid()}",
    }
    from_env = dict(OTELResourceDetector().detect().attributes)
    return Resource.create({**ours, **from_env})
