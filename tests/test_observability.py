"""observability/: trace context across NATS headers, opt-in export, instruments.

No mocks: spans go to the SDK's in-memory exporter, headers cross a real
nats-server, and OTLP export is checked against a real HTTP receiver in a
child process (so the process-wide providers of this test run stay untouched).
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nats
import pytest
from opentelemetry import trace
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

import observability.logging
from observability import Metrics, extract_context, inject_headers, setup_logging
from observability.metrics import ATTR_KIND, ATTR_REASON, RTF_BUCKETS
from observability.otel_env import export_requested
from services.runtime.natsserver import NatsServer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def spans() -> Iterator[tuple[trace.Tracer, InMemorySpanExporter]]:
    """A tracer on a private SDK provider that keeps finished spans in memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider.get_tracer("test"), exporter
    provider.shutdown()


def _by_name(finished: tuple[ReadableSpan, ...]) -> dict[str, ReadableSpan]:
    return {span.name: span for span in finished}


def _assert_child_of(child: ReadableSpan, parent: ReadableSpan) -> None:
    assert child.context is not None and parent.context is not None
    assert child.context.trace_id == parent.context.trace_id
    assert child.parent is not None
    assert child.parent.span_id == parent.context.span_id
    assert child.parent.is_remote


# --- trace context in headers -------------------------------------------------


def test_context_crosses_headers(spans):
    tracer, exporter = spans
    with tracer.start_as_current_span("publish", kind=SpanKind.PRODUCER):
        headers = inject_headers({"Nats-Msg-Id": "s1:0"})
    assert headers["Nats-Msg-Id"] == "s1:0"
    assert headers["traceparent"].startswith("00-")

    # The other side: no current span, only the headers.
    assert not trace.get_current_span().get_span_context().is_valid
    ctx = extract_context(headers)
    with tracer.start_as_current_span("transcribe", context=ctx, kind=SpanKind.CONSUMER):
        pass

    finished = _by_name(exporter.get_finished_spans())
    _assert_child_of(finished["transcribe"], finished["publish"])


def test_inject_returns_the_same_dict_and_honours_explicit_context(spans):
    tracer, _ = spans
    with tracer.start_as_current_span("edge.receive") as span:
        ctx = trace.set_span_in_context(span)
    headers: dict[str, str] = {}
    assert inject_headers(headers, ctx) is headers
    trace_id = format(span.get_span_context().trace_id, "032x")
    assert headers["traceparent"].split("-")[1] == trace_id


def test_inject_outside_any_span_adds_nothing():
    assert inject_headers({"Nats-Msg-Id": "s1:0"}) == {"Nats-Msg-Id": "s1:0"}


@pytest.mark.parametrize("headers", [None, {}, {"Nats-Msg-Id": "s1:0"}])
def test_extract_without_trace_context_starts_a_new_trace(spans, headers):
    tracer, exporter = spans
    with tracer.start_as_current_span("transcribe", context=extract_context(headers)):
        pass
    (span,) = exporter.get_finished_spans()
    assert span.parent is None


def test_extract_tolerates_header_case(spans):
    tracer, exporter = spans
    with tracer.start_as_current_span("publish"):
        headers = inject_headers({})
    shouted = {key.title(): value for key, value in headers.items()}
    assert "traceparent" not in shouted
    with tracer.start_as_current_span("transcribe", context=extract_context(shouted)):
        pass
    finished = _by_name(exporter.get_finished_spans())
    _assert_child_of(finished["transcribe"], finished["publish"])


async def test_context_crosses_a_real_jetstream_queue(spans, tmp_path):
    tracer, exporter = spans
    with NatsServer(tmp_path) as server:
        nc = await nats.connect(server.url)
        try:
            js = nc.jetstream()
            await js.add_stream(name="OBS_TEST", subjects=["obs.test"])
            with tracer.start_as_current_span("edge.publish", kind=SpanKind.PRODUCER):
                await js.publish("obs.test", b"pcm", headers=inject_headers({"Nats-Msg-Id": "a"}))
            sub = await js.pull_subscribe("obs.test", durable="obs")
            (msg,) = await sub.fetch(1, timeout=5)
            ctx = extract_context(msg.headers)
            with tracer.start_as_current_span("worker.transcribe", context=ctx):
                await msg.ack()
        finally:
            await nc.close()
    finished = _by_name(exporter.get_finished_spans())
    _assert_child_of(finished["worker.transcribe"], finished["edge.publish"])


# --- export is opt-in -----------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "traces", "metrics"),
    [
        ({}, False, False),
        ({"OTEL_SERVICE_NAME": "edge"}, False, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, True, False),
        ({"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://c:4318/v1/metrics"}, False, True),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"},
            False,
            False,
        ),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "false"},
            True,
            True,
        ),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"},
            False,
            True,
        ),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_METRICS_EXPORTER": "none"},
            True,
            False,
        ),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, False, False),
    ],
)
def test_export_requested_follows_the_standard_variables(env, traces, metrics):
    assert export_requested("traces", env) is traces
    assert export_requested("metrics", env) is metrics


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return {**env, **extra}


def _run_child(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", textwrap.dedent(code)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_setup_without_env_installs_nothing():
    child = _run_child(
        """
        import sys, threading
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.trace import TracerProvider
        import observability as obs

        obs.setup_tracing("edge")
        obs.setup_metrics("edge")
        m = obs.Metrics()
        with obs.tracer.start_as_current_span("segment") as span:
            m.segments_published.add(1)
            m.final_latency_ms.record(123.0)
            assert obs.inject_headers({}) == {}
        assert not span.is_recording()
        assert not isinstance(trace.get_tracer_provider(), TracerProvider)
        assert not isinstance(metrics.get_meter_provider(), MeterProvider)
        # No exporter was even imported, so nothing could open a socket.
        assert "opentelemetry.exporter.otlp.proto.http" not in sys.modules
        assert "requests" not in sys.modules
        assert threading.active_count() == 1, threading.enumerate()
        obs.shutdown_tracing()
        obs.shutdown_metrics()
        print("ok")
        """,
        _clean_env(),
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout == "ok\n"
    assert child.stderr == ""


class _Collector(BaseHTTPRequestHandler):
    """Stands in for the OTel collector's OTLP/HTTP receiver."""

    received: list[tuple[str, bytes]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.received.append((self.path, body))  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    server.received = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def test_setup_with_endpoint_exports_spans_and_metrics(collector):
    host, port = collector.server_address[:2]
    child = _run_child(
        """
        import observability as obs

        obs.setup_tracing("worker")
        obs.setup_metrics("worker")
        m = obs.Metrics()
        with obs.tracer.start_as_current_span("worker.transcribe"):
            m.inference_ms.record(42.0)
            m.sessions_refused.add(1, {"reason": "overloaded"})
        obs.shutdown_tracing()
        obs.shutdown_metrics()
        """,
        _clean_env(OTEL_EXPORTER_OTLP_ENDPOINT=f"http://{host}:{port}"),
    )
    assert child.returncode == 0, child.stderr

    bodies: dict[str, list[bytes]] = {}
    for path, body in collector.received:
        bodies.setdefault(path, []).append(body)
    assert set(bodies) == {"/v1/traces", "/v1/metrics"}

    traces = ExportTraceServiceRequest.FromString(b"".join(bodies["/v1/traces"]))
    (resource_spans,) = traces.resource_spans
    resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert resource["service.name"] == "worker"
    assert resource["service.namespace"] == "escapement"
    assert resource["service.instance.id"]
    names = [s.name for ss in resource_spans.scope_spans for s in ss.spans]
    assert names == ["worker.transcribe"]

    exported = ExportMetricsServiceRequest.FromString(bodies["/v1/metrics"][-1])
    metric_names = {
        metric.name
        for rm in exported.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
    }
    assert {"escapement.inference.duration", "escapement.sessions.refused"} <= metric_names


def test_otel_service_name_overrides_the_code(collector):
    host, port = collector.server_address[:2]
    child = _run_child(
        """
        import observability as obs

        obs.setup_tracing("worker")
        with obs.tracer.start_as_current_span("x"):
            pass
        obs.shutdown_tracing()
        """,
        _clean_env(
            OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=f"http://{host}:{port}/v1/traces",
            OTEL_SERVICE_NAME="worker-gpu",
        ),
    )
    assert child.returncode == 0, child.stderr
    [(path, body)] = collector.received
    assert path == "/v1/traces"
    (resource_spans,) = ExportTraceServiceRequest.FromString(body).resource_spans
    resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert resource["service.name"] == "worker-gpu"


# --- metrics instruments ---------------------------------------------------------


def _record_everything(m: Metrics) -> None:
    m.sessions_admitted.add(1)
    m.sessions_refused.add(1, {ATTR_REASON: "overloaded"})
    m.sessions_active.add(1)
    m.sessions_active.add(-1)
    m.segments_published.add(2)
    m.segments_failed.add(1)
    m.results_delivered.add(2)
    m.bad_input.add(1, {ATTR_KIND: "msgpack"})
    m.final_latency_ms.record(180.0)
    m.inference_ms.record(95.5)
    m.rtf.record(0.12)


def test_instruments_record_nothing_until_export_is_set_up_then_everything():
    """`Metrics()` built before `setup_metrics` (or with no export asked for) records
    into nothing; the same instruments count once a provider is installed, so a
    service never loses metrics to the order it built things in."""
    _record_everything(Metrics(NoOpMeterProvider().get_meter("escapement")))  # harmless
    child = _run_child(
        """
        from opentelemetry import metrics
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        import observability as obs

        m = obs.Metrics()  # no provider yet: the API's no-op
        m.sessions_admitted.add(5)
        reader = InMemoryMetricReader()
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
        m.sessions_admitted.add(1)
        data = reader.get_metrics_data()
        print([
            (metric.name, point.value)
            for rm in data.resource_metrics
            for sm in rm.scope_metrics
            for metric in sm.metrics
            for point in metric.data.data_points
        ])
        """,
        _clean_env(),
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout == "[('escapement.sessions.admitted', 1)]\n"


def test_instruments_record_on_an_sdk_provider():
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    try:
        _record_everything(Metrics(provider.get_meter("escapement")))
        data = reader.get_metrics_data()
    finally:
        provider.shutdown()
    assert data is not None
    points = {
        metric.name: (metric, list(metric.data.data_points))
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
    }
    assert set(points) == {
        "escapement.sessions.admitted",
        "escapement.sessions.refused",
        "escapement.sessions.active",
        "escapement.segments.published",
        "escapement.segments.failed",
        "escapement.results.delivered",
        "escapement.bad_input",
        "escapement.final.latency",
        "escapement.inference.duration",
        "escapement.inference.rtf",
    }
    (refused,) = points["escapement.sessions.refused"][1]
    assert refused.value == 1 and dict(refused.attributes) == {ATTR_REASON: "overloaded"}
    (active,) = points["escapement.sessions.active"][1]
    assert active.value == 0
    (bad,) = points["escapement.bad_input"][1]
    assert dict(bad.attributes) == {ATTR_KIND: "msgpack"}
    latency_metric, (latency,) = points["escapement.final.latency"]
    assert latency_metric.unit == "ms" and latency.sum == 180.0
    (rtf,) = points["escapement.inference.rtf"][1]
    assert tuple(rtf.explicit_bounds) == RTF_BUCKETS


# --- logging -----------------------------------------------------------------------


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    yield
    for handler in list(root.handlers):
        if isinstance(handler, observability.logging._EscapementHandler):
            root.removeHandler(handler)
    root.setLevel(level)


def test_json_logs_carry_the_trace_id(spans, restore_root_logger):
    tracer, _ = spans
    out = io.StringIO()
    setup_logging("debug", json=True, stream=out)
    setup_logging("debug", json=True, stream=out)  # a second call replaces, not adds
    log = logging.getLogger("escapement.test")
    with tracer.start_as_current_span("segment") as span:
        log.info("published %s", "s1:0", extra={"session_id": "s1"})
    log.debug("outside")

    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["msg"] == "published s1:0"
    assert first["level"] == "INFO" and first["logger"] == "escapement.test"
    assert first["session_id"] == "s1"
    assert first["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert first["span_id"] == format(span.get_span_context().span_id, "016x")
    assert second["msg"] == "outside" and "trace_id" not in second


def test_text_logs(restore_root_logger):
    out = io.StringIO()
    setup_logging("warning", stream=out)
    logging.getLogger("escapement.test").info("hidden")
    logging.getLogger("escapement.test").warning("shown")
    (line,) = out.getvalue().splitlines()
    assert line.endswith("WARNING escapement.test: shown")


@pytest.mark.slow
def test_one_trace_from_socket_to_model_and_back(collector, tmp_path, make_test_speech):
    """`escapement up` exporting to a collector: the edge's publish span and the worker's
    transcribe span of each segment share one trace, the worker's a child of the edge's."""
    import asyncio

    import aiohttp

    from loadtest.target import SpawnedUp
    from services.cli.client import stream_audio

    host, port = collector.server_address[:2]
    up = SpawnedUp(
        workers=1,
        data_dir=tmp_path / "up",
        env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{host}:{port}",
            "OTEL_BSP_SCHEDULE_DELAY": "200",
            "OTEL_METRIC_EXPORT_INTERVAL": "1000",
        },
    )
    up.start(timeout=60)
    try:
        speech = make_test_speech(["please turn on the lights in the kitchen"])

        async def talk() -> None:
            async with aiohttp.ClientSession() as http:
                run = await stream_audio(http, up.url, speech.pcm, 16000, realtime=False)
            assert run.close_code == 1000 and run.finals

        asyncio.run(talk())
    finally:
        assert up.stop() == 0, up.log_tail()

    spans = {}
    for path, body in collector.received:
        if path != "/v1/traces":
            continue
        for rs in ExportTraceServiceRequest.FromString(body).resource_spans:
            service = {a.key: a.value.string_value for a in rs.resource.attributes}["service.name"]
            for ss in rs.scope_spans:
                for span in ss.spans:
                    spans.setdefault(span.name, []).append((service, span))
    (edge_service, publish), *_ = spans["segment.publish"]
    (worker_service, transcribe), *_ = spans["segment.transcribe"]
    assert (edge_service, worker_service) == ("escapement-edge", "escapement-worker")
    assert transcribe.trace_id == publish.trace_id
    assert transcribe.parent_span_id == publish.span_id
