"""Latency histograms (HDR) and time series, mergeable across generator processes."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from hdrh.histogram import HdrHistogram

# Microsecond resolution, up to an hour, three significant digits.
_LOWEST_US = 1
_HIGHEST_US = 3_600_000_000
_DIGITS = 3

# The latencies every scenario reports, in the order the summary shows them.
LATENCIES = {
    "final": "speech end -> Final",
    "endpoint_wait": "  endpoint wait",
    "inference": "  inference",
    "overhead": "  pipeline overhead",
    "speech_started": "onset -> SpeechStarted",
    "session_started": "connect -> SessionStarted",
}
# What the generator itself measures about its own health.
GENERATOR = ("send_lag", "loop_lag")


class Histogram:
    """Milliseconds in, milliseconds out; negative values are recorded as 0 and counted."""

    def __init__(self, hdr: HdrHistogram | None = None) -> None:
        self.hdr = hdr or HdrHistogram(_LOWEST_US, _HIGHEST_US, _DIGITS)
        self.negative = 0

    def record(self, ms: float) -> None:
        if ms < 0:
            self.negative += 1
        us = min(max(int(round(ms * 1000)), _LOWEST_US), _HIGHEST_US)
        self.hdr.record_value(us)

    def record_all(self, values: Iterable[float]) -> None:
        for v in values:
            self.record(v)

    @property
    def count(self) -> int:
        return int(self.hdr.get_total_count())

    def percentile(self, p: float) -> float:
        return self.hdr.get_value_at_percentile(p) / 1000

    def summary(self) -> dict[str, float | int | None]:
        n = self.count
        if n == 0:
            return {
                "count": 0,
                "p50": None,
                "p90": None,
                "p95": None,
                "p99": None,
                "max": None,
                "mean": None,
            }
        out: dict[str, float | int | None] = {"count": n}
        for p in (50, 90, 95, 99):
            out[f"p{p}"] = round(self.percentile(p), 1)
        out["max"] = round(self.hdr.get_max_value() / 1000, 1)
        out["min"] = round(self.hdr.get_min_value() / 1000, 1)
        out["mean"] = round(self.hdr.get_mean_value() / 1000, 1)
        if self.negative:
            out["negative"] = self.negative
        return out

    def encode(self) -> str:
        return self.hdr.encode().decode("ascii")

    @classmethod
    def decode(cls, encoded: str) -> Histogram:
        return cls(HdrHistogram.decode(encoded.encode("ascii")))

    def merge(self, other: Histogram) -> None:
        if other.count:
            self.hdr.add(other.hdr)
        self.negative += other.negative


class Histograms(dict[str, Histogram]):
    """Named histograms; `encode()` / `merge_encoded()` carry them between processes."""

    def __missing__(self, key: str) -> Histogram:
        h = self[key] = Histogram()
        return h

    def encode(self) -> dict[str, dict[str, object]]:
        return {k: {"hdr": h.encode(), "negative": h.negative} for k, h in self.items() if h.count}

    def merge_encoded(self, encoded: dict[str, dict[str, object]]) -> None:
        for name, blob in encoded.items():
            h = Histogram.decode(str(blob["hdr"]))
            h.negative = int(blob.get("negative", 0))  # type: ignore[call-overload]
            self[name].merge(h)

    def summaries(self, names: Iterable[str]) -> dict[str, dict[str, float | int | None]]:
        return {n: self[n].summary() for n in names}


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile of a small list (for per-window series)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def windows(
    points: Sequence[tuple[float, float]], width_s: float, end_s: float
) -> list[dict[str, float | int | None]]:
    """(t, value) points -> one row per `width_s` window: count, p50, p95, max."""
    if width_s <= 0:
        return []
    n = max(1, math.ceil(end_s / width_s))
    buckets: list[list[float]] = [[] for _ in range(n)]
    for t, v in points:
        i = min(max(int(t // width_s), 0), n - 1)
        buckets[i].append(v)
    rows: list[dict[str, float | int | None]] = []
    for i, vals in enumerate(buckets):
        p50, p95 = percentile(vals, 50), percentile(vals, 95)
        rows.append(
            {
                "t": round(i * width_s, 3),
                "count": len(vals),
                "p50": None if p50 is None else round(p50, 1),
                "p95": None if p95 is None else round(p95, 1),
                "max": round(max(vals), 1) if vals else None,
            }
        )
    return rows


def slope_per_hour(samples: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of (t seconds, value) in value per hour; None below 3 points."""
    if len(samples) < 3:
        return None
    n = len(samples)
    mt = sum(t for t, _ in samples) / n
    mv = sum(v for _, v in samples) / n
    var = sum((t - mt) ** 2 for t, _ in samples)
    if var == 0:
        return None
    cov = sum((t - mt) * (v - mv) for t, v in samples)
    return cov / var * 3600
