"""The real-speech corpus (`loadtest.realspeech`) and the accuracy benchmark
(`python -m loadtest.accuracy --small`) against a real `escapement up`.

The gates below are what holds today on the small corpus; a gate that is None is
measured and reported but not asserted.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loadtest import accuracy
from loadtest import realspeech as rs
from loadtest.corpus import CorpusError, Item, default_cache_dir

# --- gates ----------------------------------------------------------------------
# The model decoding whole files offline, real sessions pooled: it hears the speech (its
# substitutions and deletions). Its insertions are left out: a whole-file decode now and
# then loops at its sampled temperature fallback (34 inserted words on ~90 once in CI),
# which is Whisper's, not the pipeline's, and only makes the streamed side look better.
OFFLINE_REAL_MISSED_MAX = 0.25
# The full benchmark holds streamed within 1 point of offline on `real`; the CI corpus is
# small (about 100 words), so one word is a point: these gates leave room for two.
STREAMED_REAL_WER_MAX: float | None = 0.10
STREAMED_MINUS_OFFLINE_WER_MAX: float | None = 0.03  # the streaming penalty, real sessions
# The same for the fluent session (sentences run together, cut at the maximum length):
# about 70 words, so two words are three points.
FLUENT_MINUS_OFFLINE_WER_MAX: float | None = 0.045
PROBE_WORDS_MAX: int | None = 0  # words streamed while nobody spoke (after normalising)
SNR_INSERTIONS_PER_100_MAX: float | None = 3.0  # streamed, at 10 dB (one word on the small mix)
SNR_TOLERANCE_DB = 1.0  # a mix's measured SNR against the one asked for
ROOM_NOISE_DBFS = (-55.0, -35.0)  # the gaps between prompts: room noise, not digital silence


@pytest.fixture(scope="module")
def cache() -> Path:
    """The user's speech cache: the sources are fetched once and built files keyed by hash."""
    return default_cache_dir()


@pytest.fixture(scope="module")
def entries(cache: Path) -> list[accuracy.Entry]:
    try:
        return accuracy.build_entries(list(accuracy.GROUPS), accuracy.SMALL, cache)
    except CorpusError as exc:
        pytest.fail(f"the real-speech corpus cannot be built ({exc}); see scripts/setup --test")


def test_score_counts_errors_apart_after_normalising() -> None:
    assert rs.score("Press 2 for sales.", "press two for sales") == rs.Counts(0, 0, 0, 4)
    assert rs.score("Press 2 for sales.", "Press 2 for sales. Thank you.") == rs.Counts(0, 0, 2, 4)
    assert rs.score("please hold the line", "please old line") == rs.Counts(1, 1, 0, 4)
    assert rs.score("", "thank you") == rs.Counts(ins=2)
    assert rs.score("hello there", "") == rs.Counts(dele=2, ref_words=2)
    pooled = rs.Counts(1, 0, 1, 10) + rs.Counts(0, 2, 0, 10)
    assert pooled == rs.Counts(1, 2, 1, 20) and pooled.wer == pytest.approx(0.2)


@pytest.mark.slow
def test_small_corpus_is_well_formed(entries: list[accuracy.Entry]) -> None:
    groups = {e.group for e in entries}
    assert groups == set(accuracy.GROUPS)
    for entry in entries:
        item = entry.item
        assert item.sample_rate == 16000 and len(item.pcm) % 2 == 0
        duration_ms = item.duration_s * 1000
        if entry.group == "probe":
            assert item.text == "" and not item.spans
            assert item.duration_s == pytest.approx(accuracy.SMALL.probe_s, abs=0.1)
            continue
        assert item.text.strip(), item.name
        assert item.spans, item.name
        previous_end = 0.0
        for start, end in item.spans:
            assert previous_end <= start < end <= duration_ms, (item.name, start, end)
            previous_end = end
    real = [e.item for e in entries if e.group == "real"]
    assert len(real) == accuracy.SMALL.sessions
    for item in real:
        assert len(item.spans or ()) >= 3  # a continuous session of several prompts
        x = rs.to_float(item.pcm)
        spans = item.spans or ()
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            gap = x[int(end * 16) : int(start * 16)]
            assert 0.7 * 16000 <= len(gap) <= 2.5 * 16000 + 1
            assert ROOM_NOISE_DBFS[0] < rs.dbfs(gap) < ROOM_NOISE_DBFS[1], item.name
            assert np.count_nonzero(gap) > 0.9 * len(gap)  # not digital silence
    by_name = {e.item.name: e.item for e in entries}
    for entry in entries:
        if entry.group == "snr":
            clean = by_name[entry.item.name.split("@")[0]]
            assert entry.item.text == clean.text and entry.item.spans == clean.spans
            measured = rs.measured_snr(clean, entry.item)
            assert abs(measured - (entry.snr_db or 0)) <= SNR_TOLERANCE_DB, measured


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_small_benchmark_against_a_real_pipeline(
    entries: list[accuracy.Entry], cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "accuracy.json"
    code = accuracy.main(
        ["--small", "--spawn-up", "--model", "tiny.en", "--cache-dir", str(cache),
         "--json", str(out), "--quiet"]
    )  # fmt: skip
    printed = capsys.readouterr().out
    report: dict[str, Any] = json.loads(out.read_text())
    assert code == 0, (report["incomplete"], report["no_finals"], printed)

    # every file streamed to the end; every file with speech got finals
    assert not report["incomplete"] and not report["no_finals"]
    names = [f["file"] for f in report["files"]]
    assert names == [e.item.name for e in entries]
    for row in report["files"]:
        assert row["outcome"] == "completed"
        if row["ref_words"]:
            assert row["finals"] > 0, row["file"]

    # the report has every column, in the JSON and in the printed table
    header = printed.splitlines()[2]
    for key, title, _, _ in accuracy.COLUMNS:
        assert all(key in row for row in report["files"]), key
        assert title in header, title
    for key in ("real", "jfk", "fluent", "espeak-noise", "snr-10dB", "all speech"):
        pooled = report["pooled"][key]
        for side in ("streamed", "offline"):
            assert set(pooled[side]) >= {"wer", "sub", "del", "ins", "ref_words", "ins_per_100"}
        assert "delta_wer" in pooled and "ghost_words" in pooled
    assert report["probe"] is not None and "streamed_words" in report["probe"]
    for part in ("final", "first_interim", "speech_started"):
        assert set(report["latency_ms"][part]) == {"count", "p50", "p95"}
    assert report["latency_ms"]["final"]["count"] > 0
    assert "interims_per_final" in report

    # the gates
    real = report["pooled"]["real"]
    heard = real["offline"]
    assert (heard["sub"] + heard["del"]) / heard["ref_words"] < OFFLINE_REAL_MISSED_MAX, real
    if STREAMED_REAL_WER_MAX is not None:
        assert real["streamed"]["wer"] < STREAMED_REAL_WER_MAX, real
    if STREAMED_MINUS_OFFLINE_WER_MAX is not None:
        assert real["delta_wer"] < STREAMED_MINUS_OFFLINE_WER_MAX, real
    if FLUENT_MINUS_OFFLINE_WER_MAX is not None:
        fluent = report["pooled"]["fluent"]
        assert fluent["delta_wer"] < FLUENT_MINUS_OFFLINE_WER_MAX, fluent
    if PROBE_WORDS_MAX is not None:
        assert report["probe"]["streamed_words"] <= PROBE_WORDS_MAX, report["probe"]
    if SNR_INSERTIONS_PER_100_MAX is not None:
        snr = report["pooled"]["snr-10dB"]["streamed"]
        assert snr["ins_per_100"] <= SNR_INSERTIONS_PER_100_MAX, snr


@pytest.mark.slow
async def test_the_same_audio_streamed_twice_gives_the_same_finals(
    entries: list[accuracy.Entry], nats_server, nc, engine, http
) -> None:  # type: ignore[no-untyped-def]
    """Two devices send the same real recording at once, beside a third talking over
    something else, so their segments meet a busy worker at different moments: their
    finals must still be identical, word for word."""
    from services.cli.client import stream_audio
    from tests.support import run_edge, run_worker

    real = [e.item for e in entries if e.group in ("real", "jfk")]
    item, other = real[0], real[-1]

    async def later(delay_s: float, audio: Item):  # type: ignore[no-untyped-def]
        await asyncio.sleep(delay_s)
        return await stream_audio(http, edge.url, audio.pcm, audio.sample_rate)

    async with run_worker(nats_server.url, engine), run_edge(nats_server.url) as edge:
        first, second, _ = await asyncio.gather(
            later(0.0, item), later(0.35, item), later(0.1, other)
        )
    texts = [
        [f.text for f in sorted(run.finals, key=lambda f: f.segment)] for run in (first, second)
    ]
    assert texts[0] and texts[0] == texts[1]
