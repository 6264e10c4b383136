"""What this host can say about its CPUs."""

from __future__ import annotations

import os
import time
from collections import deque


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, else the machine's)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def others_running() -> int | None:
    """Tasks running or runnable on this host now besides the one asking (Linux's
    /proc/stat `procs_running`); None where the OS does not say."""
    try:
        with open("/proc/stat", "rb") as stat:
            for line in stat:
                if line.startswith(b"procs_running"):
                    return max(0, int(line.split()[1]) - 1)
    except (OSError, ValueError, IndexError):
        return None
    return None


class HostLoad:
    """How busy this host's CPUs were with other processes' work over the last
    `window_s`: the share of all cores' time (0-1) that /proc/stat counts busy,
    less this process's own CPU time. None where the OS does not say."""

    def __init__(self, window_s: float = 3.0, cores: int | None = None) -> None:
        self.window_s = window_s
        self.cores = cores or usable_cores()
        self._samples: deque[tuple[float, float, float]] = deque()  # (t, host busy s, own s)

    def others_share(self) -> float | None:
        now = time.monotonic()
        busy = _host_busy_s()
        if busy is None:
            return None
        own = sum(os.times()[:2])
        samples = self._samples
        if not samples or now - samples[-1][0] >= 0.25:
            samples.append((now, busy, own))
        while len(samples) > 2 and now - samples[1][0] >= self.window_s:
            samples.popleft()
        t0, busy0, own0 = samples[0]
        if now - t0 < 0.5:
            return None  # too short a look to tell
        others = (busy - busy0) - (own - own0)
        return max(0.0, min(1.0, others / (self.cores * (now - t0))))


def _host_busy_s() -> float | None:
    """CPU seconds all cores have spent busy since boot (/proc/stat's `cpu` line)."""
    try:
        with open("/proc/stat", "rb") as stat:
            fields = stat.readline().split()
        ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    if len(ticks) < 8 or fields[0] != b"cpu":
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
