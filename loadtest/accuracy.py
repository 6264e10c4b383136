"""Accuracy of the live pipeline on real speech, against the same model decoding offline.

    python -m loadtest.accuracy [--model tiny.en|base] [--spawn-up | --url URL] [--small]
        [--corpus real,jfk,espeak-noise,probe,snr] [--concurrency N] [--repeat N] [--json OUT]

Every file of the corpus (see `loadtest.realspeech`) is streamed through the live
pipeline in real time, 100 ms frames, a few files at a time, and the same file is
decoded whole and offline by faster-whisper with the same model (`language="en"`,
`beam_size=5`, otherwise its defaults). Both transcripts are scored against the
reference after Whisper's English normaliser; the report shows, per file and pooled:

- WER with substitutions, deletions and insertions apart (insertions are
  hallucinations), streamed and offline, and the streamed-minus-offline WER delta;
- ghost words: words of finals that overlap no reference span (said where nobody
  spoke); on the noise probe every word is one;
- for the SNR mixes, inserted words per 100 reference words;
- latency: Final arrival minus the moment the end of the last reference span it
  covers had been sent; first Interim after the true onset of each utterance (when
  the server sends Interims); SpeechStarted minus the true onset; Interims per Final;
- with `--repeat N`, every file is streamed N times and the report says whether the
  finals' texts were the same each time.

Without `--url` it starts `escapement up` (one worker, the chosen model) on a free
port with a temporary data dir, and stops it at the end. Exit status: 0 when every
stream completed and every file with speech got finals, 1 otherwise, 2 for a corpus
that cannot be built, 3 when the pipeline is not reachable.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import psutil

from loadtest import realspeech as rs
from loadtest.corpus import CorpusError, Item
from loadtest.device import (
    COMPLETED,
    FAILED,
    REFUSED,
    TIMED_OUT,
    SessionOptions,
    onset_ms,
    retry_delay_s,
    session_limit_s,
)
from loadtest.metrics import percentile
from loadtest.progress import Live
from loadtest.runner import run_command, wait_ready
from loadtest.target import SpawnedUp, SpawnError
from loadtest.workload import http_session
from schemas import device as ev
from services.cli import workers_option
from services.cli.client import Received, Refused, StreamRun, stream_audio

GROUPS = ("real", "jfk", "fluent", "espeak-noise", "probe", "snr")
SPEECH_GROUPS = ("real", "jfk", "fluent", "espeak-noise")  # pooled as "all speech"
# A Final ending this close before its last span's end still closes that utterance (the
# VAD may take a faint tail for silence); one ending earlier is a piece of longer speech.
END_TOLERANCE_MS = 300

# The per-file table, in order: (key in the file's row, header, width, format).
COLUMNS = (
    ("file", "file", 20, "s"),
    ("duration_s", "dur s", 6, ".0f"),
    ("ref_words", "words", 6, "d"),
    ("streamed_wer", "WER", 7, ".3f"),
    ("streamed_sub", "S", 4, "d"),
    ("streamed_del", "D", 4, "d"),
    ("streamed_ins", "I", 4, "d"),
    ("offline_wer", "offWER", 7, ".3f"),
    ("offline_sub", "S", 4, "d"),
    ("offline_del", "D", 4, "d"),
    ("offline_ins", "I", 4, "d"),
    ("delta_wer", "delta", 7, "+.3f"),
    ("ghost_words", "ghost", 6, "d"),
    ("finals", "finals", 7, "d"),
    ("interims", "interims", 9, "d"),
    ("final_p50_ms", "final p50", 10, ",.0f"),
    ("same_on_repeat", "repeat", 7, "s"),
)


@dataclass(frozen=True)
class Entry:
    """One file of the benchmark."""

    item: Item
    group: str
    snr_db: float | None = None


@dataclass(frozen=True)
class Sizes:
    sessions: int
    session_s: float
    espeak_items: int
    probe_s: float
    snr_db: tuple[float, ...]
    snr_items: int
    fluent: int


FULL = Sizes(
    sessions=6, session_s=60, espeak_items=4, probe_s=120, snr_db=(20, 10, 5), snr_items=2, fluent=3
)
SMALL = Sizes(
    sessions=2, session_s=30, espeak_items=1, probe_s=20, snr_db=(10,), snr_items=1, fluent=1
)


def build_entries(
    groups: list[str], sizes: Sizes, cache_dir: Path | None, sample_rate: int = 16000
) -> list[Entry]:
    """The corpus for these groups (blocking; cached on disk after the first time)."""
    entries: list[Entry] = []
    real: list[Item] = []
    if "real" in groups or "jfk" in groups or "snr" in groups:
        corpus = rs.real_corpus(
            cache_dir, sample_rate, sessions=sizes.sessions, session_s=sizes.session_s
        )
        real = [i for i in corpus.items if i.name != "jfk"]
        if "real" in groups:
            entries += [Entry(i, "real") for i in real]
        if "jfk" in groups:
            entries += [Entry(i, "jfk") for i in corpus.items if i.name == "jfk"]
    if "fluent" in groups and sizes.fluent > 0:
        fluent = rs.fluent_corpus(
            cache_dir, sample_rate, sessions=sizes.fluent, session_s=sizes.session_s
        )
        entries += [Entry(i, "fluent") for i in fluent.items]
    if "espeak-noise" in groups:
        noisy = rs.espeak_in_noise(cache_dir, sample_rate, items=sizes.espeak_items)
        entries += [Entry(i, "espeak-noise") for i in noisy.items]
    if "probe" in groups:
        entries.append(Entry(rs.noise_probe(cache_dir, sample_rate, sizes.probe_s), "probe"))
    if "snr" in groups:
        for snr in sizes.snr_db:
            for item in real[: sizes.snr_items]:
                entries.append(Entry(rs.mix_snr(item, snr), "snr", snr))
    return entries


# --- streaming ----------------------------------------------------------------------


@dataclass
class Streamed:
    """One file streamed once, and what came back."""

    outcome: str = "pending"
    reason: str = ""
    retry_after_s: float | None = None  # a refusal's Retry-After
    refusals: int = 0  # times the edge refused it before it was admitted (or given up)
    finals: list[tuple[float, ev.Final]] = field(default_factory=list)  # (received, event)
    interims: list[tuple[float, ev.Interim]] = field(default_factory=list)
    started: list[tuple[float, ev.SpeechStarted]] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    run: StreamRun = field(default_factory=StreamRun)

    @property
    def texts(self) -> list[str]:
        return [f.text.strip() for _, f in sorted(self.finals, key=lambda p: p[1].segment)]

    @property
    def text(self) -> str:
        return " ".join(t for t in self.texts if t)


async def stream_item(
    http: aiohttp.ClientSession, item: Item, opts: SessionOptions, live: Live | None = None
) -> Streamed:
    """Stream `item` in real time as one device session (`services.cli.client.stream_audio`)."""
    out = Streamed()
    seen: set[int] = set()

    def on_event(received: Received) -> None:
        event = received.event
        if isinstance(event, ev.Final):
            if event.segment not in seen:
                seen.add(event.segment)
                out.finals.append((received.t, event))
                if live is not None:
                    live.finals += 1
        elif isinstance(event, ev.Interim):
            out.interims.append((received.t, event))
        elif isinstance(event, ev.SpeechStarted):
            out.started.append((received.t, event))
        elif isinstance(event, ev.Error):
            out.errors[event.code] += 1
        elif isinstance(event, ev.SessionStarted) and live is not None:
            live("admitted")

    if live is not None:
        live("begin")
    try:
        async with asyncio.timeout(session_limit_s(item, opts)):
            await stream_audio(
                http, opts.url, item.pcm, item.sample_rate, language=opts.language,
                realtime=True, chunk_ms=opts.chunk_ms, token=opts.token, on_event=on_event,
                close_timeout=opts.session_timeout_s, run=out.run,
                interim_results=opts.interim_results,
            )  # fmt: skip
        out.outcome = COMPLETED if out.run.close_code == 1000 else FAILED
        if out.outcome == FAILED:
            out.reason = f"closed with {out.run.close_code} {out.run.close_reason}".strip()
    except Refused as exc:
        out.outcome, out.reason, out.retry_after_s = REFUSED, exc.reason, exc.retry_after
    except TimeoutError:
        out.outcome, out.reason = TIMED_OUT, "over the session's time limit"
    except (aiohttp.ClientError, OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        out.outcome, out.reason = FAILED, f"{type(exc).__name__}: {exc}"
    if live is not None:
        live("end", out.outcome)
    return out


def _overlaps(a: tuple[float, float], start_ms: float, end_ms: float) -> bool:
    return min(a[1], end_ms) - max(a[0], start_ms) > 0


@dataclass
class Timings:
    final_ms: list[float] = field(default_factory=list)
    first_interim_ms: list[float] = field(default_factory=list)
    speech_started_ms: list[float] = field(default_factory=list)


def timings(item: Item, streamed: Streamed) -> Timings:
    """Latencies against the reference spans (nothing for audio without spans)."""
    out = Timings()
    spans = item.spans or ()
    if not spans:
        return out
    sent_time_of = streamed.run.sent_time_of
    for t, final in streamed.finals:
        covered = [s for s in spans if _overlaps(s, final.start_ms, final.end_ms)]
        # a piece cut from longer speech ends before its utterance did: no end to time from
        if covered and final.end_ms >= covered[-1][1] - END_TOLERANCE_MS:
            sent = sent_time_of(covered[-1][1])
            if sent is not None:
                out.final_ms.append((t - sent) * 1000)
    for span in spans:
        first = next(
            (t for t, i in streamed.interims if _overlaps(span, i.start_ms, i.end_ms)), None
        )
        sent = sent_time_of(span[0])
        if first is not None and sent is not None:
            out.first_interim_ms.append((first - sent) * 1000)
    starts = {s[0] for s in spans}
    for t, started in streamed.started:
        onset = onset_ms(started, item)
        sent = sent_time_of(onset)
        if onset in starts and sent is not None:
            out.speech_started_ms.append((t - sent) * 1000)
    return out


def ghost_words(item: Item, streamed: Streamed) -> int:
    """Words of finals that overlap no reference span: said where nobody spoke."""
    spans = item.spans or ()
    words = 0
    for _, final in streamed.finals:
        if not any(_overlaps(s, final.start_ms, final.end_ms) for s in spans):
            words += len(rs.normalise(final.text).split())
    return words


async def stream_all(
    http: aiohttp.ClientSession,
    entries: list[Entry],
    opts: SessionOptions,
    concurrency: int,
    live: Live | None,
    stagger_s: float = 0.7,
    admission_wait_s: float = 0.0,
) -> list[Streamed]:
    """Every entry once, at most `concurrency` at a time; the first ones started a little
    apart so that their speech ends do not all coincide. A file the edge refuses (its
    admission may allow fewer sessions than `concurrency`: the base model on a slow host)
    is tried again after the refusal's Retry-After, as a device would, for up to
    `admission_wait_s` (0: not at all); then, or when the refusal named no Retry-After
    (a bad token, say), it counts as refused."""
    gate = asyncio.Semaphore(max(1, concurrency))

    async def one(i: int, entry: Entry) -> Streamed:
        if i < concurrency:
            await asyncio.sleep(i * stagger_s)
        give_up = time.monotonic() + admission_wait_s
        refusals = 0
        while True:
            async with gate:
                out = await stream_item(http, entry.item, opts, live)
            again = out.outcome == REFUSED and out.retry_after_s is not None
            if not again or time.monotonic() >= give_up:
                out.refusals = refusals + (out.outcome == REFUSED)
                return out
            refusals += 1
            await asyncio.sleep(retry_delay_s(out.retry_after_s))

    return list(await asyncio.gather(*(one(i, e) for i, e in enumerate(entries))))


# --- offline ----------------------------------------------------------------------


def load_model(model: str, compute_type: str = "default") -> Any:
    """faster-whisper's defaults; "default" keeps the type the model was saved in (float16
    models run as float32 on a CPU)."""
    from faster_whisper import WhisperModel

    from services.worker.models import resolve_model

    return WhisperModel(str(resolve_model(model)), compute_type=compute_type)


def decode_offline(model: Any, item: Item) -> str:
    """The whole file in one call, as a batch job would decode it."""
    from services.worker.engines import pcm_to_float

    segments, _ = model.transcribe(
        pcm_to_float(item.pcm, item.sample_rate), language="en", beam_size=5
    )
    return " ".join(s.text.strip() for s in segments if s.text.strip())


# --- the report ----------------------------------------------------------------------


def raw_words(text: str) -> int:
    return len(re.findall(r"[\w']+", text))


def _counts_dict(c: rs.Counts) -> dict[str, Any]:
    return {
        "wer": None if c.wer is None else round(c.wer, 4),
        "sub": c.sub,
        "del": c.dele,
        "ins": c.ins,
        "ref_words": c.ref_words,
        "ins_per_100": None if c.ins_per_100 is None else round(c.ins_per_100, 2),
    }


def _pct(values: list[float]) -> dict[str, Any]:
    def r(v: float | None) -> float | None:
        return None if v is None else round(v, 1)

    return {
        "count": len(values),
        "p50": r(percentile(values, 50)),
        "p95": r(percentile(values, 95)),
    }


def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 4)


def group_key(entry: Entry) -> str:
    return f"snr-{entry.snr_db:g}dB" if entry.group == "snr" else entry.group


def build_report(
    entries: list[Entry],
    runs: list[list[Streamed]],  # runs[r][i]: pass r of entry i
    offline: list[str],
    meta: dict[str, Any],
) -> dict[str, Any]:
    first = runs[0]
    files = []
    pooled_s: dict[str, rs.Counts] = {}
    pooled_o: dict[str, rs.Counts] = {}
    ghosts: Counter[str] = Counter()
    all_t = Timings()
    n_finals = n_interims = 0
    same = 0
    for i, entry in enumerate(entries):
        item, streamed = entry.item, first[i]
        s, o = rs.score(item.text, streamed.text), rs.score(item.text, offline[i])
        key = group_key(entry)
        pooled_s[key] = pooled_s.get(key, rs.Counts()) + s
        pooled_o[key] = pooled_o.get(key, rs.Counts()) + o
        t = timings(item, streamed)
        all_t.final_ms += t.final_ms
        all_t.first_interim_ms += t.first_interim_ms
        all_t.speech_started_ms += t.speech_started_ms
        ghost = ghost_words(item, streamed)
        ghosts[key] += ghost
        n_finals += len(streamed.finals)
        n_interims += len(streamed.interims)
        repeat, passes = "", None
        if len(runs) > 1:
            identical = all(run[i].texts == streamed.texts for run in runs[1:])
            same += identical
            repeat = "same" if identical else "DIFF"
            passes = None if identical else [run[i].texts for run in runs]
        files.append(
            {
                "file": item.name,
                "group": key,
                "duration_s": round(item.duration_s, 2),
                "ref_words": s.ref_words,
                "outcome": streamed.outcome,
                "reason": streamed.reason,
                "refusals": streamed.refusals,
                "errors": dict(streamed.errors),
                "streamed_wer": s.wer,
                "streamed_sub": s.sub,
                "streamed_del": s.dele,
                "streamed_ins": s.ins,
                "offline_wer": o.wer,
                "offline_sub": o.sub,
                "offline_del": o.dele,
                "offline_ins": o.ins,
                "delta_wer": _delta(s.wer, o.wer),
                "ghost_words": ghost,
                "offline_words": len(rs.normalise(offline[i]).split()),
                "finals": len(streamed.finals),
                "interims": len(streamed.interims),
                "final_p50_ms": percentile(t.final_ms, 50),
                "same_on_repeat": repeat,
                "latency_ms": {
                    "final": _pct(t.final_ms),
                    "first_interim": _pct(t.first_interim_ms),
                    "speech_started": _pct(t.speech_started_ms),
                },
                "reference": item.text,
                "streamed_text": streamed.text,
                "offline_text": offline[i],
                "streamed_finals": streamed.texts,
                "finals_by_pass": passes,  # with --repeat, when the passes differ
            }
        )
    pooled = {}
    speech = rs.Counts(), rs.Counts()
    for key in pooled_s:
        s, o = pooled_s[key], pooled_o[key]
        if key in SPEECH_GROUPS:
            speech = speech[0] + s, speech[1] + o
        pooled[key] = {
            "files": sum(1 for f in files if f["group"] == key),
            "streamed": _counts_dict(s),
            "offline": _counts_dict(o),
            "delta_wer": _delta(s.wer, o.wer),
            "ghost_words": ghosts[key],
        }
    if speech[0].ref_words:
        pooled["all speech"] = {
            "files": sum(1 for f in files if f["group"] in SPEECH_GROUPS),
            "streamed": _counts_dict(speech[0]),
            "offline": _counts_dict(speech[1]),
            "delta_wer": _delta(speech[0].wer, speech[1].wer),
            "ghost_words": sum(ghosts[k] for k in SPEECH_GROUPS),
        }
    probe = [f for f in files if f["group"] == "probe"]
    return {
        **meta,
        "files": files,
        "pooled": pooled,
        "probe": {
            "seconds": round(sum(f["duration_s"] for f in probe), 1),
            "streamed_words": sum(f["streamed_ins"] for f in probe),
            "offline_words": sum(f["offline_ins"] for f in probe),
            # before normalising: the normaliser drops fillers ("Mmm.", "Uh.") Whisper also invents
            "streamed_raw_words": sum(raw_words(f["streamed_text"]) for f in probe),
            "offline_raw_words": sum(raw_words(f["offline_text"]) for f in probe),
            "streamed_text": " | ".join(f["streamed_text"] for f in probe),
            "offline_text": " | ".join(f["offline_text"] for f in probe),
        }
        if probe
        else None,
        "latency_ms": {
            "final": _pct(all_t.final_ms),
            "first_interim": _pct(all_t.first_interim_ms),
            "speech_started": _pct(all_t.speech_started_ms),
        },
        "interims": n_interims,
        "finals": n_finals,
        "interims_per_final": round(n_interims / n_finals, 2) if n_finals else None,
        "determinism": {
            "repeats": len(runs),
            "files": len(entries),
            "identical": same,
            "differing": [f["file"] for f in files if f["same_on_repeat"] == "DIFF"],
        }
        if len(runs) > 1
        else None,
        "incomplete": [
            f"{f['file']}: {f['outcome']} {f['reason']}".strip()
            for f in files
            if f["outcome"] != COMPLETED
        ],
        "no_finals": [
            f["file"]
            for f in files
            if f["ref_words"] and f["finals"] == 0 and f["outcome"] == COMPLETED
        ],
    }


def _cell(value: Any, width: int, fmt: str) -> str:
    if value is None or value == "":
        text = "-"
    elif fmt == "s":
        text = str(value)[:width]
    else:
        text = format(value, fmt)
    return f"{text:<{width}}" if fmt == "s" else f"{text:>{width}}"


def format_report(report: dict[str, Any]) -> str:
    lines = [report["header"], ""]
    lines.append(
        " ".join(_cell(h, w, "s" if i == 0 else "") for i, (_, h, w, _) in enumerate(COLUMNS))
    )
    for f in report["files"]:
        lines.append(" ".join(_cell(f[k], w, fmt) for k, _, w, fmt in COLUMNS))
    lines += ["", "Pooled (streamed | offline):"]
    lines.append(
        f"{'group':<14}{'files':>6}{'words':>7}  {'WER':>7}{'S':>5}{'D':>5}{'I':>5}{'I/100':>7}  |"
        f"{'WER':>7}{'S':>5}{'D':>5}{'I':>5}{'I/100':>7}  {'delta':>7}{'ghost':>7}"
    )
    for key, p in report["pooled"].items():
        if key == "probe":
            continue
        s, o = p["streamed"], p["offline"]
        lines.append(
            f"{key:<14}{p['files']:>6}{s['ref_words']:>7}  {_cell(s['wer'], 7, '.3f')}{s['sub']:>5}"
            f"{s['del']:>5}{s['ins']:>5}{_cell(s['ins_per_100'], 7, '.1f')}  |"
            f"{_cell(o['wer'], 7, '.3f')}{o['sub']:>5}{o['del']:>5}{o['ins']:>5}"
            f"{_cell(o['ins_per_100'], 7, '.1f')}  {_cell(p['delta_wer'], 7, '+.3f')}"
            f"{p['ghost_words']:>7}"
        )
    if report["probe"]:
        pr = report["probe"]
        lines += [
            "",
            f"Noise probe ({pr['seconds']:g} s, nobody speaking): {pr['streamed_words']} word(s) "
            f"streamed, {pr['offline_words']} offline (before normalising: "
            f"{pr['streamed_raw_words']} and {pr['offline_raw_words']})",
        ]
        if pr["streamed_text"].strip(" |"):
            lines.append(f"  streamed: {pr['streamed_text'][:300]}")
        if pr["offline_text"].strip(" |"):
            lines.append(f"  offline:  {pr['offline_text'][:300]}")
    lat = report["latency_ms"]

    def row(label: str, h: dict[str, Any], note: str = "") -> str:
        if not h["count"]:
            return f"  {label:<44} - {note}".rstrip()
        return f"  {label:<44}{h['p50']:>8,.0f}{h['p95']:>8,.0f}{h['count']:>7}"

    lines += ["", f"  {'latency, ms':<44}{'p50':>8}{'p95':>8}{'n':>7}"]
    lines.append(row("speech end -> Final", lat["final"]))
    lines.append(
        row("speech onset -> first Interim", lat["first_interim"], "(the server sent no Interim)")
    )
    lines.append(row("speech onset -> SpeechStarted", lat["speech_started"]))
    ipf = report["interims_per_final"]
    lines.append(
        f"  Interims per Final: {'-' if ipf is None else ipf} "
        f"({report['interims']} interims, {report['finals']} finals)"
    )
    if report.get("cpu_per_audio_s") is not None:
        lines.append(
            f"  Pipeline CPU: {report['pipeline_cpu_s']:.0f} s, "
            f"{report['cpu_per_audio_s']:.3f} CPU-s per audio-s "
            f"(interims {'on' if report['interim_results'] else 'off'})"
        )
    if report["determinism"]:
        d = report["determinism"]
        verdict = (
            "identical"
            if d["identical"] == d["files"]
            else f"DIFFERENT: {', '.join(d['differing'])}"
        )
        lines.append(
            f"  Streamed {d['repeats']} times: finals {verdict} ({d['identical']}/{d['files']} files)"
        )
    waited = [f for f in report["files"] if f.get("refusals") and f["outcome"] == COMPLETED]
    if waited:
        lines.append(
            f"  Admitted after waiting: {len(waited)} file(s), "
            f"{sum(f['refusals'] for f in waited)} refusal(s) before that (the edge's "
            "admission allowed fewer sessions at once than --concurrency)"
        )
    for what in report["incomplete"]:
        lines.append(f"  NOT COMPLETED: {what}")
    for name in report["no_finals"]:
        lines.append(f"  NO FINALS: {name}")
    return "\n".join(lines)


# --- the command -------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.accuracy", description=__doc__.split("\n")[0]
    )
    p.add_argument("--model", default="tiny.en", help="tiny.en (default), base, or a model folder")
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--spawn-up",
        action="store_true",
        help="start escapement up with --model for the run (the default without --url)",
    )
    where.add_argument("--url", help="a running edge (its model should be --model)")
    p.add_argument("--token", help="API key or token (env ESCAPEMENT_TOKEN)")
    p.add_argument(
        "--workers",
        type=workers_option,
        default="auto",
        help="workers of the spawned pipeline (default auto: one per core)",
    )
    p.add_argument("--small", action="store_true", help="a CI-sized corpus (a couple of minutes)")
    p.add_argument(
        "--corpus",
        default=",".join(GROUPS),
        help=f"comma-separated parts to run (default {','.join(GROUPS)})",
    )
    p.add_argument(
        "--concurrency", type=int, default=4, help="files streamed at the same time (default 4)"
    )
    p.add_argument(
        "--repeat", type=int, default=1, help="stream everything N times; report if finals differ"
    )
    p.add_argument(
        "--offline-compute-type",
        default="default",
        help="compute type of the offline decode (default: faster-whisper's; the workers run int8)",
    )
    p.add_argument(
        "--sample-rate", type=int, default=16000, choices=(8000, 16000),
        help="build and stream the corpus at this rate (default 16000; 8000 as a phone line)",
    )  # fmt: skip
    p.add_argument("--cache-dir", help="where sources and built files are kept")
    p.add_argument("--sessions", type=int, help="real-speech sessions to build (default 6)")
    p.add_argument("--no-interims", action="store_true", help="stream with interim_results=false")
    p.add_argument(
        "--chunk-ms",
        type=int,
        default=100,
        help="audio per frame the devices send (default 100; 20 is a VoIP frame)",
    )
    p.add_argument(
        "--no-offline", action="store_true", help="skip the offline decode (latency runs)"
    )
    p.add_argument(
        "--admission-wait-s", type=float, default=600.0,
        help="a refused file is tried again after Retry-After for this long (default 600; 0: "
        "counted as refused at once)",
    )  # fmt: skip
    p.add_argument("--json", dest="json_out", help="also write the report as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = p.parse_args(argv)
    args.groups = [g.strip() for g in args.corpus.split(",") if g.strip()]
    unknown = sorted(set(args.groups) - set(GROUPS))
    if unknown:
        p.error(f"unknown corpus part(s) {', '.join(unknown)}; choose from {', '.join(GROUPS)}")
    if args.repeat < 1 or args.concurrency < 1:
        p.error("--repeat and --concurrency must be at least 1")
    return args


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text, file=sys.stderr, flush=True)


async def run(args: argparse.Namespace) -> int:
    sizes = SMALL if args.small else FULL
    if args.sessions:
        sizes = dataclasses.replace(sizes, sessions=args.sessions)
    cache = Path(args.cache_dir) if args.cache_dir else None
    try:
        _say(args, "building the corpus ...")
        entries = await asyncio.to_thread(
            build_entries, args.groups, sizes, cache, args.sample_rate
        )
    except CorpusError as exc:
        print(f"loadtest.accuracy: {exc}", file=sys.stderr)
        return 2
    audio_s = sum(e.item.duration_s for e in entries)
    _say(args, f"{len(entries)} files, {audio_s:.0f} s of audio")

    offline: list[str] = []
    try:
        model = (
            None
            if args.no_offline
            else await asyncio.to_thread(load_model, args.model, args.offline_compute_type)
        )
    except Exception as exc:  # ModelNotFound, or ctranslate2 refusing the compute type
        print(f"loadtest.accuracy: cannot load model {args.model}: {exc}", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    for i, entry in enumerate(entries):
        if args.no_offline:
            offline.append("")
            continue
        _say(args, f"offline decode {i + 1}/{len(entries)}: {entry.item.name}")
        offline.append(await asyncio.to_thread(decode_offline, model, entry.item))
    offline_s = time.monotonic() - t0
    del model

    token = args.token or os.environ.get("ESCAPEMENT_TOKEN") or None
    spawned = None if args.url else SpawnedUp(workers=args.workers, model=args.model)
    url = args.url or ""
    runs: list[list[Streamed]] = []
    live = Live(enabled=not args.quiet)
    try:
        if spawned is not None:
            _say(args, f"starting escapement up (model {args.model}, workers {args.workers}) ...")
            await asyncio.to_thread(spawned.start)
            url = spawned.url
        async with http_session() as http:
            why = await wait_ready(http, url, 30.0)
            if why is not None:
                print(f"loadtest.accuracy: {url} is not ready: {why}", file=sys.stderr)
                return 3
            opts = SessionOptions(
                url=url,
                token=token,
                interim_results=not args.no_interims,
                chunk_ms=args.chunk_ms,
            )
            cpu0 = pipeline_cpu_s(spawned)
            clock0 = time.monotonic()
            ticker = asyncio.create_task(live.run(clock0, []))
            try:
                for r in range(args.repeat):
                    _say(
                        args, f"streaming pass {r + 1}/{args.repeat} ({args.concurrency} at a time)"
                    )
                    runs.append(
                        await stream_all(
                            http,
                            entries,
                            opts,
                            args.concurrency,
                            live,
                            admission_wait_s=args.admission_wait_s,
                        )
                    )
            finally:
                ticker.cancel()
                await asyncio.gather(ticker, return_exceptions=True)
            stream_s = time.monotonic() - clock0
            cpu_s = pipeline_cpu_s(spawned) - cpu0
    except SpawnError as exc:
        print(f"loadtest.accuracy: {exc}", file=sys.stderr)
        return 3
    finally:
        up_log = spawned.log_tail(6000) if spawned is not None else ""
        if spawned is not None:
            await asyncio.to_thread(spawned.stop)

    where = spawned.layout if spawned else url
    header = (
        f"Accuracy: model {args.model}; streamed through {where} in real time, {args.chunk_ms} ms frames, "
        f"{args.concurrency} at a time; offline: faster-whisper, whole file, beam 5, "
        f"compute type {args.offline_compute_type}; "
        f"{len(entries)} files, {audio_s:.0f} s of audio at {args.sample_rate} Hz; "
        f"{os.cpu_count()} cores"
    )
    meta = {
        "header": header,
        "model": args.model,
        "target": where,
        "cores": os.cpu_count(),
        "concurrency": args.concurrency,
        "offline_compute_type": args.offline_compute_type,
        "sample_rate": args.sample_rate,
        "corpus": args.groups,
        "small": args.small,
        "audio_s": round(audio_s, 1),
        "offline_decode_s": round(offline_s, 1),
        "streaming_s": round(stream_s, 1),
        "interim_results": not args.no_interims,
        # the whole pipeline's CPU (edge, workers, nats-server) per second of audio streamed
        "pipeline_cpu_s": round(cpu_s, 1) if spawned else None,
        "cpu_per_audio_s": round(cpu_s / (audio_s * args.repeat), 3) if spawned else None,
    }
    report = build_report(entries, runs, offline, meta)
    print(format_report(report))
    if (report["incomplete"] or report["no_finals"]) and up_log:
        print(f"\nthe end of escapement up's log:\n{up_log}", file=sys.stderr)
    if args.json_out:
        text = json.dumps(report, indent=1) + "\n"
        await asyncio.to_thread(Path(args.json_out).write_text, text)
    return 1 if report["incomplete"] or report["no_finals"] else 0


def pipeline_cpu_s(spawned: SpawnedUp | None) -> float:
    """CPU seconds used so far by a spawned `escapement up` and all its children."""
    if spawned is None:
        return 0.0
    try:
        root = psutil.Process(spawned.pid)
        total = 0.0
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                times = proc.cpu_times()
                total += times.user + times.system
        return total
    except psutil.NoSuchProcess:
        return 0.0


def main(argv: list[str] | None = None) -> int:
    return run_command(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
