"""/metrics for Prometheus, the dashboard's data, the admission probe, `escapement status`
and JSON logs: first on an edge in this process, then on `escapement up` as a user runs it."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadtest.speech import Speech
from observability.metrics import Recent
from observability.otel_env import prometheus_requested
from services.cli.client import Received, stream_audio
from services.runtime.procs import free_port
from tests.support import LIGHT_WORKER_ENV, run_edge, until
from tests.test_cli import ESCAPEMENT, Up, start_up

REPO = Path(__file__).resolve().parents[1]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Prometheus text exposition -> {(series, labels): value}; fails on anything malformed."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum over the series `name` whose labels include `labels` (0 if none)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


async def scrape(http: aiohttp.ClientSession, url: str) -> Samples:
    async with http.get(url) as r:
        assert r.status == 200, await r.text()
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return parse(await r.text())


# --- no model, no processes ----------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "on"),
    [
        ({}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, True),
        ({"OTEL_METRICS_EXPORTER": "prometheus"}, True),
        ({"OTEL_METRICS_EXPORTER": "otlp,prometheus"}, True),
        ({"OTEL_METRICS_EXPORTER": "otlp"}, False),
        ({"OTEL_METRICS_EXPORTER": "none"}, False),
        ({"OTEL_SDK_DISABLED": "true"}, False),
    ],
)
def test_prometheus_is_on_unless_the_environment_says_otherwise(env, on):
    assert prometheus_requested(env) is on


def test_recent_keeps_the_last_window_only():
    now = [0.0]
    recent = Recent(horizon_s=10, clock=lambda: now[0])
    for i in range(100):
        recent.add(i)
    assert recent.summary() == {"count": 100, "p50": 50, "p90": 90, "p99": 99}
    now[0] = 11
    recent.add(7)
    assert recent.summary() == {"count": 1, "p50": 7, "p90": 7, "p99": 7}
    now[0] = 30
    assert recent.summary() == {"count": 0, "p50": None, "p90": None, "p99": None}


def test_json_logs_from_the_environment_carry_trace_ids():
    code = """
        import logging
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        trace.set_tracer_provider(TracerProvider())
        from observability import telemetry
        with telemetry("escapement-test", "INFO"):
            with trace.get_tracer("t").start_as_current_span("s"):
                logging.getLogger("services.test").info("hello %s", "there", extra={"segment": 3})
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    child = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env={**env, "ESCAPEMENT_LOG_FORMAT": "json"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == 0, child.stderr
    lines = [json.loads(line) for line in io.StringIO(child.stderr) if line.strip()]
    (hello,) = [line for line in lines if line["logger"] == "services.test"]
    assert hello["msg"] == "hello there" and hello["segment"] == 3 and hello["level"] == "INFO"
    assert len(hello["trace_id"]) == 32 and len(hello["span_id"]) == 16


async def test_edge_pages_probe_and_metrics_without_workers(nc, nats_server, http):
    """With no worker, the probe says why a session would be refused, without counting it."""
    async with run_edge(nats_server.url) as edge:  # workers required (the default)
        async with http.get(f"{edge.url}/v1/admission") as r:
            assert r.status == 503 and r.headers["Retry-After"]
            body = await r.json()
        assert body["admitted"] is False and body["reason"] == "no_workers"
        assert body["message"]

        async with http.get(f"{edge.url}/v1/dashboard") as r:
            board = await r.json()
        assert board["admitting"] == {
            "ok": False,
            "reason": "no_workers",
            "message": "no transcription worker is running",
        }
        assert board["workers"] == {"alive": 0, "busy": 0}
        assert board["queue"]["pending"] == 0 and board["queue"]["dead_letters"] == 0
        assert board["sessions"]["active"] == 0
        assert board["refused"] == {}  # the probe is not a refusal
        assert board["latency_ms"]["count"] == 0

        for path, kind in [
            ("/", "text/html"),
            ("/dashboard", "text/html"),
            ("/static/talk.js", "javascript"),
            ("/static/pcm-worklet.js", "javascript"),
            ("/static/dashboard.js", "javascript"),
            ("/static/style.css", "text/css"),
        ]:
            async with http.get(f"{edge.url}{path}") as r:
                assert r.status == 200 and kind in r.headers["Content-Type"], path
        async with http.get(f"{edge.url}/static/") as r:
            assert r.status in (403, 404)  # no directory listing
        await scrape(http, f"{edge.url}/metrics")  # parses (this process exports no SDK metrics)


async def test_probe_admits_when_a_session_would_be(edge, http):
    async with http.get(f"{edge.url}/v1/admission") as r:
        assert r.status == 200 and await r.json() == {"admitted": True}


# --- escapement up -------------------------------------------------------------------


@pytest.fixture(scope="module")
def metrics_up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Up, str]]:
    """`escapement up` with one light worker serving /metrics on a port of its own."""
    port = free_port()
    env = {**LIGHT_WORKER_ENV, "ESCAPEMENT_METRICS_PORT": str(port)}
    running = start_up(tmp_path_factory.mktemp("metrics-up"), workers=1, env=env)
    try:
        yield running, f"http://127.0.0.1:{port}/metrics"
    finally:
        running.kill()


@pytest.fixture(scope="module")
def two_sentences(make_test_speech) -> Speech:  # type: ignore[no-untyped-def]
    return make_test_speech(["set a timer for ten minutes", "play some music by the beatles"])


@pytest.mark.slow
async def test_metrics_parse_and_move_as_a_session_runs(metrics_up, two_sentences, http):
    up, worker_metrics = metrics_up
    edge_metrics = f"{up.url}/metrics"
    await until(lambda: _reachable(http, worker_metrics), within=30, message="worker /metrics")
    edge0, worker0 = await scrape(http, edge_metrics), await scrape(http, worker_metrics)
    for name in (
        "escapement_jetstream_consumer_pending",
        "escapement_jetstream_stream_size_bytes",
        "escapement_workers_alive",
        "target_info",
        "process_cpu_seconds_total",
    ):
        assert any(n == name for n, _ in edge0), f"edge: no {name}"
    assert value(edge0, "escapement_workers_alive") == 1

    # Hold the worker once the session is admitted: its segments wait in the queue.
    (worker,) = up.workers()
    held = asyncio.Event()

    def on_event(received: Received) -> None:
        if type(received.event).__name__ == "SessionStarted":
            worker.suspend()
            held.set()

    pending = dict(consumer="workers", stream="ASR_SEGMENTS")
    session = asyncio.create_task(
        stream_audio(
            http, up.url, two_sentences.pcm, two_sentences.sample_rate, realtime=False,
            on_event=on_event,
        )
    )  # fmt: skip
    try:
        await asyncio.wait_for(held.wait(), timeout=30)

        async def queued() -> float:
            found = await scrape(http, edge_metrics)
            return value(found, "escapement_jetstream_consumer_pending", **pending)

        depth = await until(queued, within=15, message="a segment waiting in the queue")
        assert depth >= 1
        during = await scrape(http, edge_metrics)
        assert value(during, "escapement_sessions_active") == 1
    finally:
        worker.resume()
    run = await asyncio.wait_for(session, timeout=90)
    assert run.close_code == 1000 and len(run.finals) == 2, run.events

    async def drained() -> Samples | None:
        found = await scrape(http, edge_metrics)
        queue = value(found, "escapement_jetstream_consumer_pending", **pending) + value(
            found, "escapement_jetstream_consumer_ack_pending", **pending
        )
        return found if queue == 0 else None

    edge1 = await until(drained, within=15, message="the queue drained again")
    worker1 = await scrape(http, worker_metrics)

    def moved(before: Samples, after: Samples, name: str) -> float:
        return value(after, name) - value(before, name)

    assert moved(edge0, edge1, "escapement_sessions_admitted_total") == 1
    assert moved(edge0, edge1, "escapement_segments_published_total") >= 2
    assert moved(edge0, edge1, "escapement_results_delivered_total") == 2
    assert moved(edge0, edge1, "escapement_final_latency_milliseconds_count") == 2
    assert value(edge1, "escapement_sessions_active") == 0
    assert moved(worker0, worker1, "escapement_inference_duration_milliseconds_count") >= 2
    assert moved(worker0, worker1, "escapement_inference_rtf_count") >= 2
    assert moved(worker0, worker1, "process_cpu_seconds_total") > 0
    assert value(worker1, "target_info", service_name="escapement-worker") == 1

    # the dashboard's data agrees
    async with http.get(f"{up.url}/v1/dashboard") as r:
        board = await r.json()
    assert board["latency_ms"]["count"] >= 2 and board["latency_ms"]["p50"] > 0
    assert board["decoding"]["decoded"] >= 2 and board["decoding"]["rtf"]["p50"] > 0
    assert board["workers"]["alive"] == 1 and board["sessions"]["admitted"] >= 1


async def _reachable(http: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with http.get(url) as r:
            return r.status == 200
    except aiohttp.ClientError:
        return False


@pytest.mark.slow
def test_status_shows_queue_workers_throughput_and_latency(metrics_up):
    up, _ = metrics_up
    nats_url = (Path(up.child.log_path).parent / "data" / "nats.url").read_text()
    done = subprocess.run(
        [*ESCAPEMENT, "status", "--nats-url", nats_url, "--url", up.url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    screen = done.stdout
    assert len(screen.splitlines()) <= 40, "one terminal screen"
    for expected in (
        "ASR_SEGMENTS",
        "ASR_SEGMENTS/workers",
        "Workers: 1 alive (+ 1 for interim looks only)",
        "faster-whisper",
        "(looks)",
        "Edges: 1 alive",
        "latency, speech end -> Final",
        "admitting new sessions: yes",
    ):
        assert expected in screen, screen
    as_json = subprocess.run(
        [*ESCAPEMENT, "status", "--nats-url", nats_url, "--url", up.url, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    body = json.loads(as_json.stdout)
    assert body["consumers"]["ASR_SEGMENTS/workers"]["pending"] == 0
    assert [w["engine"] for w in body["workers"]] and body["edge"]["edge_id"]

    unreachable = subprocess.run(
        [*ESCAPEMENT, "status", "--nats-url", f"nats://127.0.0.1:{free_port()}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unreachable.returncode == 3 and "cannot reach NATS" in unreachable.stderr
