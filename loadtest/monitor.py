"""What the generator watches while it runs: server processes, the queue, itself.

Only processes it was told about are looked at: PIDs given on the command
line, or the children of an `escapement up` it was pointed at (`--up-pid`) or
started itself (`--spawn-up`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import psutil

from jetstream import subjects
from loadtest.metrics import slope_per_hour

log = logging.getLogger(__name__)

ROLES = ("edge", "workers", "nats", "generator")


def _is_worker(proc: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return "services.worker" in proc.cmdline()
    return False


def _is_nats(proc: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return proc.name().startswith("nats-server")
    return False


@dataclass
class Targets:
    """The server processes this run knows, by role."""

    up: psutil.Process | None = (
        None  # an `escapement up`: it is the edge; its children are the rest
    )
    given: dict[str, list[psutil.Process]] = field(default_factory=dict)  # from --edge-pid etc.
    extra_nats: list[psutil.Process] = field(
        default_factory=list
    )  # nats-servers this run restarted
    generator: list[psutil.Process] = field(default_factory=list)
    _cache: dict[str, list[psutil.Process]] = field(default_factory=dict)

    @classmethod
    def from_pids(
        cls,
        up_pid: int | None = None,
        edge_pids: list[int] | None = None,
        worker_pids: list[int] | None = None,
        nats_pids: list[int] | None = None,
    ) -> Targets:
        def procs(pids: list[int] | None) -> list[psutil.Process]:
            out = []
            for pid in pids or []:
                try:
                    out.append(psutil.Process(pid))
                except psutil.NoSuchProcess:
                    log.warning("pid %d does not exist; ignored", pid)
            return out

        up = procs([up_pid])[0] if up_pid else None
        return cls(
            up=up,
            given={
                "edge": procs(edge_pids),
                "workers": procs(worker_pids),
                "nats": procs(nats_pids),
            },
        )

    @property
    def known(self) -> bool:
        return self.up is not None or any(self.given.values())

    def by_role(self) -> dict[str, list[psutil.Process]]:
        """Live processes per role (children of `up` looked up again: workers get restarted)."""
        roles: dict[str, list[psutil.Process]] = {
            r: list(self.given.get(r, [])) for r in ("edge", "workers", "nats")
        }
        if self.up is not None and self.up.is_running():
            roles["edge"].insert(0, self.up)
            with contextlib.suppress(psutil.Error):
                for child in self.up.children():
                    if _is_worker(child):
                        roles["workers"].append(child)
                    elif _is_nats(child):
                        roles["nats"].append(child)
        roles["nats"].extend(self.extra_nats)
        roles["generator"] = [psutil.Process(), *self.generator]
        # keep one Process object per pid, so cpu_percent() measures since the last sample
        for role, procs in roles.items():
            cached = {p.pid: p for p in self._cache.get(role, [])}
            roles[role] = [cached.get(p.pid, p) for p in procs if _alive(p)]
        self._cache = roles
        return roles

    def workers(self) -> list[psutil.Process]:
        return self.by_role()["workers"]

    def nats(self) -> list[psutil.Process]:
        return self.by_role()["nats"]


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@dataclass
class ResourceSampler:
    """CPU % (of one core) and RSS per role, every `every` seconds."""

    targets: Targets
    clock0: float
    every: float = 1.0
    samples: list[dict[str, Any]] = field(default_factory=list)
    _primed: set[int] = field(default_factory=set)

    def sample(self) -> dict[str, Any]:
        row: dict[str, Any] = {"t": round(time.monotonic() - self.clock0, 3)}
        for role, procs in self.targets.by_role().items():
            cpu = rss = 0.0
            pids = []
            by_pid: dict[str, float] = {}
            for p in procs:
                try:
                    with p.oneshot():
                        c = p.cpu_percent(None)
                        m = p.memory_info().rss
                except psutil.Error:
                    continue
                if p.pid in self._primed:
                    cpu += c
                    by_pid[str(p.pid)] = round(c, 1)
                self._primed.add(p.pid)
                rss += m
                pids.append(p.pid)
            if role == "generator" or pids:
                row[role] = {"cpu": round(cpu, 1), "rss_mb": round(rss / 2**20, 1), "pids": pids}
                if role == "generator":
                    row[role]["cpu_by_pid"] = by_pid  # a process uses one core at most: saturation
        return row

    async def run(self) -> None:
        self.sample()  # primes cpu_percent
        while True:
            await asyncio.sleep(self.every)
            self.samples.append(await asyncio.to_thread(self.sample))

    def summary(self, warmup_s: float = 0.0) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for role in ROLES:
            rows = [(s["t"], s[role]) for s in self.samples if role in s]
            if not rows:
                continue
            cpus = [r["cpu"] for _, r in rows]
            rss = [r["rss_mb"] for _, r in rows]
            late = [(t, r["rss_mb"]) for t, r in rows if t >= warmup_s]
            slope = slope_per_hour(late)
            out[role] = {
                "cpu_percent_mean": round(sum(cpus) / len(cpus), 1),
                "cpu_percent_max": round(max(cpus), 1),
                "rss_mb_start": rss[0],
                "rss_mb_end": rss[-1],
                "rss_mb_max": max(rss),
                "rss_mb_per_hour": None if slope is None else round(slope, 1),
                "pids": sorted({pid for _, r in rows for pid in r["pids"]}),
            }
        return out


@dataclass
class QueueSampler:
    """ASR_SEGMENTS depth and the workers consumer's ack pending, from JetStream."""

    nats_url: str
    clock0: float
    every: float = 1.0
    samples: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""

    async def run(self) -> None:
        import nats

        async def quiet(*_: object) -> None:
            return None

        try:
            nc = await nats.connect(
                self.nats_url, name="escapement-loadtest", max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                connect_timeout=3, allow_reconnect=True, error_cb=quiet, disconnected_cb=quiet,
                reconnected_cb=quiet, closed_cb=quiet,
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - no queue metrics, the run goes on
            self.error = f"cannot connect to {self.nats_url}: {exc!r}"
            return
        js = nc.jetstream(timeout=1.0)
        try:
            while True:
                t = round(time.monotonic() - self.clock0, 3)
                try:
                    stream = await js.stream_info(subjects.STREAM_SEGMENTS)
                    consumer = await js.consumer_info(
                        subjects.STREAM_SEGMENTS, subjects.CONSUMER_WORKERS
                    )
                    self.samples.append(
                        {
                            "t": t,
                            "messages": stream.state.messages,
                            "bytes": stream.state.bytes,
                            "ack_pending": consumer.num_ack_pending,
                            "pending": consumer.num_pending,
                            "redelivered": consumer.num_redelivered,
                            "waiting": consumer.num_waiting,
                        }
                    )
                except Exception as exc:  # noqa: BLE001 - NATS may be down on purpose (chaos)
                    self.samples.append({"t": t, "unavailable": type(exc).__name__})
                await asyncio.sleep(self.every)
        finally:
            with contextlib.suppress(Exception):
                await nc.close()

    def summary(self) -> dict[str, Any]:
        good = [s for s in self.samples if "messages" in s]
        out: dict[str, Any] = {
            "samples": len(self.samples),
            "unavailable_samples": len(self.samples) - len(good),
        }
        if self.error:
            out["error"] = self.error
        if good:
            out["max_messages"] = max(s["messages"] for s in good)
            out["max_ack_pending"] = max(s["ack_pending"] for s in good)
            out["mean_messages"] = round(sum(s["messages"] for s in good) / len(good), 2)
            out["end_messages"] = good[-1]["messages"]
            out["redelivered"] = max(s["redelivered"] for s in good)
        return out


async def fetch_stats(
    http: aiohttp.ClientSession, url: str, token: str | None = None
) -> dict[str, Any] | None:
    """The edge's `/v1/stats`, or None when it cannot be had."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        async with http.get(
            f"{url.rstrip('/')}/v1/stats", headers=headers, timeout=aiohttp.ClientTimeout(total=3)
        ) as r:
            if r.status != 200:
                return None
            return await r.json()  # type: ignore[no-any-return]
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None


async def settled_stats(
    http: aiohttp.ClientSession, url: str, token: str | None = None, wait_s: float = 5.0
) -> dict[str, Any] | None:
    """`/v1/stats` once no session is active any more (the edge counts a session when it has closed)."""
    deadline = time.monotonic() + wait_s
    stats = await fetch_stats(http, url, token)
    while (
        stats is not None
        and stats.get("sessions", {}).get("active", 0) > 0
        and time.monotonic() < deadline
    ):
        await asyncio.sleep(0.2)
        stats = await fetch_stats(http, url, token)
    return stats


def stats_delta(
    before: dict[str, Any] | None, after: dict[str, Any] | None
) -> dict[str, Any] | None:
    """What the edge saw during the run: counters after minus before."""
    if before is None or after is None:
        return None

    def diff(a: Any, b: Any) -> Any:
        if isinstance(b, dict):
            a = a if isinstance(a, dict) else {}
            keys = set(a) | set(b)
            return {k: diff(a.get(k, 0), b.get(k, 0)) for k in sorted(keys)}
        if isinstance(b, int | float) and not isinstance(b, bool) and isinstance(a, int | float):
            return b - a
        return b

    delta = diff(before, after)
    if isinstance(delta.get("sessions"), dict):
        delta["sessions"]["active"] = after.get("sessions", {}).get("active")
    return delta  # type: ignore[no-any-return]


def cpu_count() -> int:
    return os.cpu_count() or 1
