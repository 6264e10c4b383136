"""`--plot report.png`: latency, queue depth and server memory over the run (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_report(report: dict[str, Any], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timeline = report.get("timeline", {})
    fig, (ax_lat, ax_q, ax_mem) = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    fig.suptitle(f"Escapement load test: {report['scenario']} ({report['url']})")

    points = timeline.get("finals") or []
    if points:
        ax_lat.scatter(
            [p[0] for p in points],
            [p[1] for p in points],
            s=6,
            color="grey",
            alpha=0.5,
            label="finals",
        )
    rows = [r for r in timeline.get("latency", []) if r["count"]]
    width = timeline.get("window_s", 10)
    if rows:
        t = [r["t"] + width / 2 for r in rows]
        ax_lat.plot(t, [r["p50"] for r in rows], marker=".", label="p50")
        ax_lat.plot(t, [r["p95"] for r in rows], marker=".", label="p95")
        ax_lat.plot(t, [r["max"] for r in rows], linestyle=":", label="max")
    if points or rows:
        ax_lat.legend(loc="upper left")
    ax_lat.set_ylabel("speech end -> Final (ms)")
    ax_lat.grid(alpha=0.3)

    queue = [s for s in timeline.get("queue", []) if "messages" in s]
    if queue:
        t = [s["t"] for s in queue]
        ax_q.plot(t, [s["messages"] for s in queue], label="segments queued")
        ax_q.plot(t, [s["ack_pending"] for s in queue], label="in flight (ack pending)")
        ax_q.legend(loc="upper left")
    else:
        ax_q.text(
            0.5,
            0.5,
            "no queue samples (give --nats-url)",
            ha="center",
            va="center",
            transform=ax_q.transAxes,
        )
    ax_q.set_ylabel("ASR_SEGMENTS")
    ax_q.grid(alpha=0.3)

    resources = timeline.get("resources", [])
    for role in ("edge", "workers", "nats", "generator"):
        pts = [(s["t"], s[role]["rss_mb"]) for s in resources if role in s]
        if pts:
            ax_mem.plot([p[0] for p in pts], [p[1] for p in pts], label=role)
    if resources:
        ax_mem.legend(loc="upper left")
    ax_mem.set_ylabel("RSS (MB)")
    ax_mem.set_xlabel("seconds since start")
    ax_mem.grid(alpha=0.3)

    for event in (report.get("chaos") or {}).get("events", []):
        for ax in (ax_lat, ax_q, ax_mem):
            ax.axvline(event["t"], color="red", alpha=0.4, linestyle="--")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
