"""The load test report: a schema-versioned JSON document, its summary table, and `compare`.

Top-level keys (schema_version 1):

- `sessions`: attempted, admitted, completed, failed, timed_out, refused
  (+ `refused_by_reason`), connect_errors; admitted = completed + failed + timed_out.
- `latency_ms`: final (speech end -> Final), endpoint_wait, inference, overhead,
  speech_started (onset -> SpeechStarted), session_started (connect ->
  SessionStarted); each count, p50, p90, p95, p99, max, min, mean.
- `finals`: received, errors, overloaded, lost, duplicates, missing utterances.
- `throughput`, `wer`, `server` (CPU/RSS per role), `queue` (JetStream depth),
  `generator` (its own CPU, event-loop lag, send lag), `server_stats` (the
  edge's `/v1/stats` before, after and the difference), `checks`, `warnings`,
  `timeline` (per-window latency, resource and queue samples), `histograms`
  (HDR, base64, mergeable), `session_log`, and a section named after the
  scenario where it has more to say (herd, slowloris, chaos, soak).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from loadtest.device import COMPLETED, CONNECT_ERROR, FAILED, REFUSED, TIMED_OUT, SessionRecord
from loadtest.metrics import GENERATOR, LATENCIES, Histograms, percentile, windows
from loadtest.monitor import QueueSampler, ResourceSampler, stats_delta

SCHEMA = "escapement.loadtest.report"
SCHEMA_VERSION = 1
SESSION_LOG_MAX = 5000
FINAL_POINTS_MAX = 20000
SATURATED_CPU = 85.0  # % of one core: a generator process this busy measures itself


@dataclass
class Observed:
    """What one scenario run produced, before it is turned into a report."""

    scenario: str
    url: str
    params: dict[str, Any]
    started_at: str
    wall_s: float
    records: list[SessionRecord]
    histograms: Histograms
    final_points: list[tuple[float, float]] = field(default_factory=list)
    resources: ResourceSampler | None = None
    queue: QueueSampler | None = None
    stats_before: dict[str, Any] | None = None
    stats_after: dict[str, Any] | None = None
    sections: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    window_s: float = 10.0
    procs: int = 1
    corpus: str = ""
    # sessions the edge admitted that are not in `records` (slowloris' idle sockets)
    extra_admitted: int = 0
    # abandoned finals fail the run (chaos: every segment must come back in time)
    strict: bool = False
    # checks only this scenario knows (name -> (ok, value, required))
    extra_checks: dict[str, tuple[bool, Any, bool]] = field(default_factory=dict)


def _reasons(records: Iterable[SessionRecord]) -> dict[str, int]:
    return dict(Counter((r.reason or "unknown")[:100] for r in records).most_common(20))


def sessions_section(records: list[SessionRecord]) -> dict[str, Any]:
    by = Counter(r.outcome for r in records)
    refused = [r for r in records if r.outcome == REFUSED]
    return {
        "attempted": len(records),
        "admitted": sum(1 for r in records if r.admitted),
        "completed": by[COMPLETED],
        "failed": by[FAILED],
        "timed_out": by[TIMED_OUT],
        "refused": len(refused),
        "refused_by_reason": dict(Counter(r.reason for r in refused)),
        "refused_by_status": {
            str(k): v for k, v in Counter(r.http_status for r in refused).items()
        },
        "connect_errors": by[CONNECT_ERROR],
        "connect_errors_by_reason": _reasons(r for r in records if r.outcome == CONNECT_ERROR),
        "failed_by_reason": _reasons(r for r in records if r.outcome == FAILED),
        "timed_out_by_reason": _reasons(r for r in records if r.outcome == TIMED_OUT),
        "close_codes": {
            str(k): v for k, v in Counter(r.close_code for r in records if r.admitted).items()
        },
    }


def finals_section(records: list[SessionRecord]) -> dict[str, Any]:
    errors: Counter[str] = Counter()
    for r in records:
        errors.update(r.errors)
    known = [r for r in records if r.utterances is not None and r.outcome == COMPLETED]
    return {
        "received": sum(len(r.finals) for r in records),
        "timed": sum(1 for r in records for f in r.finals if f.latency_ms is not None),
        "errors": sum(errors.values()),
        "errors_by_code": dict(errors),
        "overloaded": sum(r.overloaded for r in records),
        "lost": sum(len(r.lost_segments) for r in records),
        "lost_in_sessions": [
            r.session_id or f"device {r.device}/{r.seq}" for r in records if r.lost_segments
        ][:50],
        # the edge stopped waiting for these and said so (Error finals_timeout)
        "abandoned": sum(len(r.abandoned_segments) for r in records),
        "duplicates": sum(r.duplicate_finals for r in records),
        "utterances": sum(r.utterances or 0 for r in known),
        "missing_utterances": sum(r.missing_utterances or 0 for r in known),
    }


def throughput_section(records: list[SessionRecord], wall_s: float) -> dict[str, Any]:
    sent = sum(r.audio_ms_sent for r in records) / 1000
    transcribed = sum(f.audio_ms for r in records for f in r.finals) / 1000
    inference = sum(f.inference_ms for r in records for f in r.finals) / 1000
    return {
        "wall_s": round(wall_s, 2),
        "audio_s_sent": round(sent, 2),
        "audio_s_transcribed": round(transcribed, 2),
        "audio_s_per_wall_s": round(transcribed / wall_s, 3) if wall_s > 0 else None,
        "inference_s": round(inference, 2),
        "rtf": round(inference / transcribed, 4) if transcribed > 0 else None,
        "sessions_per_min": round(
            sum(1 for r in records if r.outcome == COMPLETED) / wall_s * 60, 2
        )
        if wall_s
        else None,
    }


def wer_section(records: list[SessionRecord]) -> dict[str, Any]:
    scored = [r for r in records if r.ref_words]
    if not scored:
        return {"sessions": 0, "mean": None, "p50": None, "max": None, "corpus": None}
    wers = [r.word_errors / r.ref_words for r in scored]
    return {
        "sessions": len(scored),
        "mean": round(sum(wers) / len(wers), 4),
        "p50": round(percentile(wers, 50) or 0.0, 4),
        "max": round(max(wers), 4),
        "corpus": round(sum(r.word_errors for r in scored) / sum(r.ref_words for r in scored), 4),
    }


def _check(ok: bool, value: Any, required: bool = True) -> dict[str, Any]:
    return {"ok": bool(ok), "value": value, "required": required}


def build(o: Observed) -> dict[str, Any]:
    sessions = sessions_section(o.records)
    finals = finals_section(o.records)
    hist = o.histograms
    resources = o.resources.summary(warmup_s=min(60.0, o.wall_s * 0.1)) if o.resources else {}
    generator_res = resources.pop("generator", None)
    delta = stats_delta(o.stats_before, o.stats_after)
    warnings = list(o.warnings)

    generator: dict[str, Any] = {
        "procs": o.procs,
        **{f"{k}_ms": hist[k].summary() for k in GENERATOR},
    }
    if generator_res:
        per_proc = _generator_cpu_per_process(o.resources)
        generator.update(
            cpu_percent_mean=generator_res["cpu_percent_mean"],
            cpu_percent_max=generator_res["cpu_percent_max"],
            busiest_process_cpu_percent_p90=per_proc,
            rss_mb_max=generator_res["rss_mb_max"],
        )
        generator["saturated"] = per_proc is not None and per_proc >= SATURATED_CPU
        if generator["saturated"]:
            warnings.append(
                f"the load generator is saturated (a process at {per_proc:.0f}% of a core): latencies include "
                "the client's own delays; use --procs or fewer sessions"
            )
    loop_p99 = hist["loop_lag"].summary()["p99"]
    if loop_p99 is not None and loop_p99 > 50:
        warnings.append(
            f"the generator's event loop ran {loop_p99:.0f} ms late (p99): it is too busy to pace audio"
        )
    send_p99 = hist["send_lag"].summary()["p99"]
    if send_p99 is not None and send_p99 > 100:
        warnings.append(
            f"audio was sent {send_p99:.0f} ms behind real time (p99): the client fell behind"
        )

    admitted = sessions["admitted"]
    checks = {
        "admitted_accounted": _check(
            admitted == sessions["completed"] + sessions["failed"] + sessions["timed_out"], admitted
        ),
        "no_lost_finals": _check(finals["lost"] == 0, finals["lost"]),
        "no_duplicate_finals": _check(finals["duplicates"] == 0, finals["duplicates"]),
        "no_abandoned_finals": _check(finals["abandoned"] == 0, finals["abandoned"], o.strict),
    }
    if delta is not None:
        edge_sessions = delta.get("sessions", {})
        edge_refused = sum(edge_sessions.get("refused", {}).values())
        # informational: other clients of the same edge would make these differ
        checks["edge_admitted_agrees"] = _check(
            edge_sessions.get("admitted") == admitted + o.extra_admitted,
            edge_sessions.get("admitted"),
            False,
        )
        checks["edge_refused_agrees"] = _check(
            edge_refused == sessions["refused"], edge_refused, False
        )
        checks["edge_finals_agree"] = _check(
            delta.get("finals") == finals["received"], delta.get("finals"), False
        )
    for name, (ok, value, required) in o.extra_checks.items():
        checks[name] = _check(ok, value, required)
    for name, c in checks.items():
        if not c["ok"]:
            warnings.append(f"check {name} failed (value {c['value']})")

    report: dict[str, Any] = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "scenario": o.scenario,
        "url": o.url,
        "started_at": o.started_at,
        "wall_s": round(o.wall_s, 2),
        "params": o.params,
        "corpus": o.corpus,
        "sessions": sessions,
        "latency_ms": hist.summaries(LATENCIES),
        "finals": finals,
        "throughput": throughput_section(o.records, o.wall_s),
        "wer": wer_section(o.records),
        "server": resources,
        "queue": o.queue.summary() if o.queue else None,
        "generator": generator,
        "server_stats": {"before": o.stats_before, "after": o.stats_after, "delta": delta},
        "checks": checks,
        "ok": all(c["ok"] for c in checks.values() if c["required"]),
        "warnings": warnings,
        **o.sections,
        "timeline": {
            "window_s": o.window_s,
            "latency": windows(o.final_points, o.window_s, o.wall_s),
            # every timed final as [t, ms], for plots (left out of very long runs)
            "finals": [[round(t, 3), round(v, 1)] for t, v in o.final_points]
            if len(o.final_points) <= FINAL_POINTS_MAX
            else [],
            "resources": o.resources.samples if o.resources else [],
            "queue": o.queue.samples if o.queue else [],
        },
        "histograms": hist.encode(),
        "session_log": [r.summary() for r in o.records[:SESSION_LOG_MAX]],
        "session_log_truncated": max(0, len(o.records) - SESSION_LOG_MAX),
    }
    return report


def _generator_cpu_per_process(resources: ResourceSampler | None) -> float | None:
    """90th percentile over samples of the busiest generator process (a process uses one core)."""
    if resources is None:
        return None
    busiest = [
        max(s["generator"]["cpu_by_pid"].values(), default=0.0)
        for s in resources.samples
        if "generator" in s
    ]
    if not busiest:
        return None
    return round(percentile(busiest, 90) or 0.0, 1)


def write(report: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(report, indent=1, default=str) + "\n")


def load(path: str | Path) -> dict[str, Any]:
    data = json.loads(Path(path).read_text())
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not an Escapement load test report")
    if data.get("schema_version", 0) > SCHEMA_VERSION:
        raise ValueError(
            f"{path}: report schema {data['schema_version']} is newer than this tool ({SCHEMA_VERSION})"
        )
    return data  # type: ignore[no-any-return]


# --- the summary table -----------------------------------------------------------


def _ms(v: Any) -> str:
    return "-" if v is None else f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def summary_lines(r: dict[str, Any]) -> list[str]:
    s, f, t, w, g = r["sessions"], r["finals"], r["throughput"], r["wer"], r["generator"]
    lines = [
        f"Escapement load test: {r['scenario']}  {r['url']}  {r['wall_s']:.1f} s, {g['procs']} generator process(es)"
    ]
    refused = ", ".join(f"{k} {v}" for k, v in s["refused_by_reason"].items())
    lines.append(
        f"sessions   attempted {s['attempted']}  admitted {s['admitted']}  completed {s['completed']}  "
        f"failed {s['failed']}  timed_out {s['timed_out']}  refused {s['refused']}"
        + (f" ({refused})" if refused else "")
        + (f"  connect errors {s['connect_errors']}" if s["connect_errors"] else "")
    )
    lines.append(f"{'latency ms':<28}{'n':>7}{'p50':>9}{'p95':>9}{'p99':>9}{'max':>9}")
    for key, label in LATENCIES.items():
        h = r["latency_ms"].get(key) or {}
        if not h.get("count"):
            continue
        lines.append(
            f"  {label:<26}{h['count']:>7}{_ms(h['p50']):>9}{_ms(h['p95']):>9}{_ms(h['p99']):>9}{_ms(h['max']):>9}"
        )
    lines.append(
        f"finals     received {f['received']}  errors {f['errors']}  overloaded {f['overloaded']}  "
        f"lost {f['lost']}  abandoned {f['abandoned']}  duplicates {f['duplicates']}"
        + (
            f"  missing {f['missing_utterances']}/{f['utterances']} utterances"
            if f["utterances"]
            else ""
        )
    )
    rate = t["audio_s_per_wall_s"]
    if t["audio_s_sent"]:
        lines.append(
            f"throughput {t['audio_s_transcribed']:.1f} s of audio transcribed"
            + (f", {rate:.2f} audio s / wall s" if rate is not None else "")
            + (f"  RTF {t['rtf']:.3f}" if t["rtf"] is not None else "")
            + (
                f"  WER mean {w['mean']:.3f} (corpus {w['corpus']:.3f}, {w['sessions']} sessions)"
                if w["sessions"]
                else ""
            )
        )
    for role, res in (r.get("server") or {}).items():
        lines.append(
            f"{role:<10} cpu {res['cpu_percent_mean']:.0f}% mean, {res['cpu_percent_max']:.0f}% max  "
            f"rss {res['rss_mb_start']:.0f} -> {res['rss_mb_end']:.0f} MB (max {res['rss_mb_max']:.0f})"
            + (
                f"  pids {','.join(map(str, res['pids']))}"
                if len(res["pids"]) <= 6
                else f"  {len(res['pids'])} pids"
            )
        )
    q = r.get("queue")
    if q and "max_messages" in q:
        lines.append(
            f"queue      max {q['max_messages']} segments queued, max {q['max_ack_pending']} in flight, "
            f"{q['redelivered']} redelivered"
            + (
                f", {q['unavailable_samples']} samples unavailable"
                if q["unavailable_samples"]
                else ""
            )
        )
    elif q and q.get("error"):
        lines.append(f"queue      {q['error']}")
    lag, loop = g["send_lag_ms"], g["loop_lag_ms"]
    gen = "generator  " + (f"send lag p99 {_ms(lag['p99'])} ms, " if lag["count"] else "")
    gen += f"loop lag p99 {_ms(loop['p99'])} ms"
    if "cpu_percent_mean" in g:
        gen += f", cpu {g['cpu_percent_mean']:.0f}% mean ({g['cpu_percent_max']:.0f}% max)"
    lines.append(gen)
    for name in ("herd", "slowloris", "chaos", "soak"):
        if name in r:
            lines.extend(_section_lines(name, r[name]))
    failed = [k for k, c in r["checks"].items() if not c["ok"]]
    lines.append("checks     " + ("all passed" if not failed else "FAILED: " + ", ".join(failed)))
    lines.extend(f"warning: {w}" for w in r["warnings"])
    return lines


def _section_lines(name: str, sec: dict[str, Any]) -> list[str]:
    if name == "herd":
        return [
            f"herd       {sec['connections']} connections in {sec['within_s']:g} s: {sec['achieved_per_s']:.0f}/s offered"
        ]
    if name == "slowloris":
        out = []
        for kind in ("idle", "half_open"):
            k = sec[kind]
            out.append(
                f"{kind:<10} {k['opened']} opened, {k['closed_by_server']} closed by the server"
                + (
                    f" (after {_ms(k['closed_after_s_p50'])} s p50)"
                    if k["closed_by_server"]
                    else ""
                )
                + f", {k['still_open']} still open at the end"
            )
        return out
    if name == "chaos":
        return [
            f"chaos      {sec['workers_killed']} worker(s) killed ({sec['workers_killed_busy']} mid-job), "
            f"{sec['workers_replaced']} replaced; {sec['nats_restarts']} nats-server restart(s)"
        ]
    if name == "soak":
        drift = sec.get("latency_p95_drift_ms")
        rss = ", ".join(
            f"{k} {v:+.0f} MB/h" for k, v in sec.get("rss_mb_per_hour", {}).items() if v is not None
        )
        return [f"soak       p95 drift {_ms(drift)} ms (first vs last third); rss {rss or '-'}"]
    return []


def print_summary(report: dict[str, Any], out: IO[str]) -> None:
    print("\n".join(summary_lines(report)), file=out)


# --- compare ---------------------------------------------------------------------

COMPARED = ("sessions", "latency_ms", "finals", "throughput", "wer", "server", "queue", "generator")
HIGHER_BETTER = {"completed", "admitted", "audio_s_per_wall_s", "audio_s_transcribed", "received"}
HIGHER_BETTER |= {"sessions_per_min"}
LOWER_BETTER = {"failed", "timed_out", "refused", "connect_errors", "errors", "overloaded", "lost"}
LOWER_BETTER |= {"abandoned"}
LOWER_BETTER |= {"duplicates", "missing_utterances", "rtf", "mean", "corpus", "p50", "p95", "p99"}
LOWER_BETTER |= {"max", "cpu_percent_mean", "cpu_percent_max", "rss_mb_end", "rss_mb_max"}
LOWER_BETTER |= {"rss_mb_per_hour", "max_messages", "max_ack_pending", "redelivered"}


def _leaves(prefix: str, value: Any) -> Iterable[tuple[str, float]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(f"{prefix}.{k}" if prefix else str(k), v)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield prefix, float(value)


def _shown(key: str) -> bool:
    if key.endswith((".min", ".mean", ".p90")) and key.startswith(("latency_ms.", "generator.")):
        return False
    return not (
        key.startswith("latency_ms.") and key.endswith(".count") and key != "latency_ms.final.count"
    )


def compare_rows(
    a: dict[str, Any], b: dict[str, Any]
) -> list[tuple[str, float | None, float | None]]:
    la = {k: v for key in COMPARED for k, v in _leaves(key, a.get(key))}
    lb = {k: v for key in COMPARED for k, v in _leaves(key, b.get(key))}
    return [(k, la.get(k), lb.get(k)) for k in dict.fromkeys([*la, *lb]) if _shown(k)]


def print_compare(
    a: dict[str, Any], b: dict[str, Any], out: IO[str], name_a: str = "a", name_b: str = "b"
) -> None:
    """One row per number that differs; `+` better in b, `-` worse, blank when neither."""
    name_a, name_b = Path(name_a).name[-14:], Path(name_b).name[-14:]
    print(f"  {'':<42}{name_a:>14}{name_b:>14}{'delta':>12}{'%':>8}", file=out)
    if a.get("scenario") != b.get("scenario"):
        print(f"  (different scenarios: {a.get('scenario')} vs {b.get('scenario')})", file=out)
    for key, va, vb in compare_rows(a, b):
        if va == vb:
            continue
        delta = pct = ""
        mark = " "
        if va is not None and vb is not None:
            d = vb - va
            delta = f"{d:+.4g}"
            if va:
                pct = f"{d / abs(va) * 100:+.0f}%"
            leaf = key.rsplit(".", 1)[-1]
            if leaf in HIGHER_BETTER:
                mark = "+" if d > 0 else "-"
            elif leaf in LOWER_BETTER and not key.startswith("sessions.close_codes"):
                mark = "+" if d < 0 else "-"
        print(f"{mark} {key:<42}{_num(va):>14}{_num(vb):>14}{delta:>12}{pct:>8}", file=out)


def _num(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}" if v == int(v) else f"{v:.4g}"
