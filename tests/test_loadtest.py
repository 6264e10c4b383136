"""The load generator against a real `escapement up`: every scenario at small scale,
its report checked against what the edge itself counted (`/v1/stats`)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loadtest import cli, latency
from loadtest import report as report_mod
from loadtest.chaos import pin_port
from loadtest.corpus import Item, word_errors
from loadtest.device import FinalTiming, SessionRecord, speech_end_ms
from loadtest.metrics import Histogram, Histograms, windows
from loadtest.target import SpawnedUp
from schemas import device as ev

UP_READY = 60.0


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SpawnedUp]:
    """`escapement up` with one worker, started the way the load generator's --spawn-up does.

    Admission by a fixed count, not by the measured decode rate: with one worker on short
    sentences that rate puts the cap at 2-4 sessions depending on how fast the host is
    that minute, and the scenarios here hold up to 4 open sockets (slowloris) beside the
    session they probe with."""
    running = SpawnedUp(
        workers=1,
        data_dir=tmp_path_factory.mktemp("up"),
        env={"ESCAPEMENT_SESSION_LOAD": "0", "ESCAPEMENT_MAX_SESSIONS_PER_WORKER": "8"},
    )
    running.start(timeout=UP_READY)
    try:
        yield running
    finally:
        assert running.stop() == 0, running.log_tail()


@pytest.fixture(scope="module")
def corpus_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("corpus"))


def edge_stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/v1/stats", timeout=5) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


def settled_stats(url: str) -> dict[str, Any]:
    """The edge counts a session's finals when it closes: wait until none is active."""
    deadline = time.monotonic() + 10
    stats = edge_stats(url)
    while stats["sessions"]["active"] and time.monotonic() < deadline:
        time.sleep(0.2)
        stats = edge_stats(url)
    return stats


def run_scenario(argv: list[str], out: Path, expect: int = 0) -> dict[str, Any]:
    code = cli.main([*argv, "--out", str(out), "-q"])
    report = json.loads(out.read_text())
    assert code == expect, report["warnings"]
    assert report["schema"] == report_mod.SCHEMA and report["schema_version"] == 1
    return report


def assert_agrees_with_edge(
    report: dict[str, Any], before: dict[str, Any], after: dict[str, Any], extra_admitted: int = 0
) -> None:
    s, f = report["sessions"], report["finals"]
    assert s["admitted"] == s["completed"] + s["failed"] + s["timed_out"]
    assert (
        after["sessions"]["admitted"] - before["sessions"]["admitted"]
        == s["admitted"] + extra_admitted
    )
    refused_before, refused_after = before["sessions"]["refused"], after["sessions"]["refused"]
    edge_refused = {
        k: v - refused_before.get(k, 0)
        for k, v in refused_after.items()
        if v - refused_before.get(k, 0)
    }
    assert edge_refused == s["refused_by_reason"]
    assert after["finals"] - before["finals"] == f["received"]
    assert f["lost"] == 0 and f["duplicates"] == 0


# --- against the module's `escapement up` ------------------------------------------


@pytest.mark.slow
def test_concurrency(up: SpawnedUp, corpus_cache: str, tmp_path: Path) -> None:
    before = settled_stats(up.url)
    report = run_scenario(
        [
            "concurrency",
            "--url",
            up.url,
            "--sessions",
            "2",
            "--procs",
            "2",
            "--ramp",
            "0.5",
            "--duration",
            "1",
        ]
        + [
            "--sentences",
            "2",
            "--corpus-cache",
            corpus_cache,
            "--up-pid",
            str(up.pid),
            "--nats-url",
            up.nats_url,
        ]
        + ["--plot", str(tmp_path / "report.png")],
        tmp_path / "report.json",
    )
    after = settled_stats(up.url)
    assert_agrees_with_edge(report, before, after)
    s, f, lat = report["sessions"], report["finals"], report["latency_ms"]
    assert s["attempted"] == s["admitted"] == s["completed"] == 2
    assert f["received"] == f["utterances"] == 4 and f["missing_utterances"] == 0
    final = lat["final"]
    assert final["count"] == 4 and final["p50"] <= final["p95"] <= final["p99"] <= final["max"]
    # the split accounts for speech end -> Final: endpoint wait + inference + overhead is
    # at least the whole (the early final decodes during the endpoint wait, so they overlap)
    parts = sum(lat[k]["mean"] for k in ("endpoint_wait", "inference", "overhead"))
    assert parts >= final["mean"] - 5, (parts, final)
    assert lat["endpoint_wait"]["mean"] <= final["mean"] + 5
    assert 300 < lat["endpoint_wait"]["p50"] < 2000  # the VAD waits for 500 ms of silence
    assert report["wer"]["sessions"] == 2 and report["wer"]["mean"] < 0.5
    assert report["throughput"]["audio_s_transcribed"] > 0 and report["throughput"]["rtf"] > 0
    assert {"edge", "workers", "nats"} <= set(report["server"])
    assert report["queue"]["samples"] > 0 and "max_messages" in report["queue"]
    assert report["generator"]["procs"] == 2 and report["generator"]["send_lag_ms"]["count"] > 0
    assert (tmp_path / "report.png").stat().st_size > 10_000


@pytest.mark.slow
def test_herd(up: SpawnedUp, tmp_path: Path) -> None:
    before = settled_stats(up.url)
    report = run_scenario(
        ["herd", "--url", up.url, "--connections", "10", "--within", "0.5"], tmp_path / "herd.json"
    )
    after = settled_stats(up.url)
    assert_agrees_with_edge(report, before, after)
    s = report["sessions"]
    assert s["attempted"] == 10 == s["admitted"] + s["refused"] + s["connect_errors"]
    assert report["latency_ms"]["session_started"]["count"] == s["completed"]
    assert report["herd"]["connections"] == 10


@pytest.mark.slow
def test_slowloris(up: SpawnedUp, corpus_cache: str, tmp_path: Path) -> None:
    before = settled_stats(up.url)
    report = run_scenario(
        ["slowloris", "--url", up.url, "--connections", "4", "--duration", "2", "--drip-every", "1"]
        + ["--settle", "0.5", "--sentences", "1", "--corpus-cache", corpus_cache],
        tmp_path / "slowloris.json",
    )
    after = settled_stats(up.url)
    attack = report["slowloris"]
    assert attack["idle"]["opened"] == 2 and attack["half_open"]["opened"] == 2
    assert_agrees_with_edge(report, before, after, extra_admitted=attack["idle"]["admitted"])
    assert report["sessions"]["completed"] >= 1 and report["checks"]["probe_completed"]["ok"]
    assert report["latency_ms"]["final"]["count"] >= 1


@pytest.mark.slow
def test_soak(up: SpawnedUp, corpus_cache: str, tmp_path: Path) -> None:
    before = settled_stats(up.url)
    report = run_scenario(
        [
            "soak",
            "--url",
            up.url,
            "--sessions",
            "2",
            "--ramp",
            "0.5",
            "--duration",
            "3s",
            "--sentences",
            "1",
        ]
        + [
            "--corpus-cache",
            corpus_cache,
            "--edge-pid",
            str(up.pid),
            "--sample-every",
            "0.5",
            "--window",
            "2",
        ],
        tmp_path / "soak.json",
    )
    after = settled_stats(up.url)
    assert_agrees_with_edge(report, before, after)
    assert report["sessions"]["completed"] == 2
    assert len(report["timeline"]["resources"]) >= 4
    assert report["server"]["edge"]["rss_mb_max"] > 0
    assert "rss_mb_per_hour" in report["soak"] and report["timeline"]["latency"]


@pytest.mark.slow
def test_latency_breakdown(
    up: SpawnedUp, corpus_cache: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "latency.json"
    argv = [
        "--url",
        up.url,
        "--sessions",
        "1",
        "--sentences",
        "1",
        "--corpus-cache",
        corpus_cache,
        "--out",
        str(out),
    ]
    assert latency.main(argv) == 0
    printed = capsys.readouterr().out
    assert "endpoint wait" in printed and "inference" in printed and "pipeline overhead" in printed
    result = json.loads(out.read_text())["results"][0]
    assert result["sessions"] == 1 and result["lost_finals"] == 0
    assert result["latency_ms"]["final"]["count"] == 1


# --- chaos: its own `escapement up`, with two workers -------------------------------


@pytest.mark.slow
def test_chaos_kill_a_worker_loses_no_final(corpus_cache: str, tmp_path: Path) -> None:
    report = run_scenario(
        [
            "chaos",
            "--spawn-up",
            "--up-workers",
            "2",
            "--sessions",
            "2",
            "--ramp",
            "0.5",
            "--duration",
            "1",
        ]
        + [
            "--sentences",
            "3",
            "--corpus-cache",
            corpus_cache,
            "--kill-workers-every",
            "3",
            "--max-kills",
            "1",
        ],
        tmp_path / "chaos.json",
    )
    chaos = report["chaos"]
    assert chaos["workers_killed"] == 1
    assert chaos["workers_replaced"] == 1, chaos["events"]  # the supervisor in `up` restarts it
    assert report["finals"]["lost"] == 0 and report["checks"]["no_lost_finals"]["ok"]
    assert report["sessions"]["completed"] == report["sessions"]["admitted"] == 2
    delta = report["server_stats"]["delta"]
    assert delta["finals"] == report["finals"]["received"] == 6


# --- no server needed ---------------------------------------------------------------


def test_histograms_merge_through_their_encoding() -> None:
    a, b = Histograms(), Histograms()
    a["final"].record_all([100, 200, 300])
    b["final"].record_all([400, 5000])
    merged = Histograms()
    merged.merge_encoded(a.encode())
    merged.merge_encoded(b.encode())
    s = merged["final"].summary()
    assert s["count"] == 5 and abs(s["max"] - 5000) < 5 and abs(s["p50"] - 300) < 1
    h = Histogram()
    h.record(-3)
    assert h.summary()["negative"] == 1
    rows = windows([(0.5, 10.0), (1.5, 20.0), (1.7, 30.0)], 1.0, 2.0)
    assert [r["count"] for r in rows] == [1, 2] and rows[1]["max"] == 30.0


def test_speech_end_from_spans_or_from_speech_ended() -> None:
    item = Item("x", b"", 16000, "a b", spans=((500.0, 2500.0), (3500.0, 5000.0)))
    final = ev.Final(segment=1, text="b", start_ms=3300, end_ms=5300)
    assert speech_end_ms(final, item, 5300, 300) == 5000.0
    cut = ev.Final(segment=0, text="a", start_ms=300, end_ms=1800)  # cut before the utterance ended
    assert speech_end_ms(cut, item, None, 300) is None
    no_spans = Item("y", b"", 16000, "a")
    assert speech_end_ms(final, no_spans, 5300, 300) == 5000
    assert speech_end_ms(final, no_spans, None, 300) is None


def test_word_errors_and_small_parsers() -> None:
    assert word_errors("Turn on the lights.", "turn on the light") == (1, 4)
    assert word_errors("turn on the lights", "") == (4, 4)
    assert (
        cli.duration("30m") == 1800 and cli.duration("1h30m") == 5400 and cli.duration("45") == 45
    )
    with pytest.raises(Exception, match="not a duration"):
        cli.duration("soon")
    assert pin_port(["nats-server", "-p", "-1", "-js"], 4222) == [
        "nats-server",
        "-p",
        "4222",
        "-js",
    ]


def test_compare_prints_deltas(tmp_path: Path) -> None:
    def report(latency: float, lost: int) -> dict[str, Any]:
        rec = SessionRecord(
            device=0, seq=0, item="x", outcome="completed", admitted=True, close_code=1000
        )
        rec.finals = [FinalTiming(0, 1.0, latency, 600.0, 400.0, latency - 1000.0, 2000)]
        rec.lost_segments = list(range(lost))
        hist = Histograms()
        hist["final"].record(latency)
        observed = report_mod.Observed("concurrency", "http://x", {}, "now", 10.0, [rec], hist)
        return report_mod.build(observed)

    a, b = report(1200.0, 0), report(1500.0, 1)
    assert a["ok"] and not b["ok"]
    report_mod.write(a, tmp_path / "a.json")
    report_mod.write(b, tmp_path / "b.json")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtest",
            "compare",
            str(tmp_path / "a.json"),
            str(tmp_path / "b.json"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    rows = {}
    for line in done.stdout.splitlines()[1:]:
        parts = line.split()
        rows[parts[1] if parts[0] in ("+", "-") else parts[0]] = line
    assert rows["latency_ms.final.p50"].startswith("-") and "+300" in rows["latency_ms.final.p50"]
    assert rows["finals.lost"].startswith("-")
