"""The live progress line on stderr: elapsed, sessions, finals, p95 so far, generator CPU."""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from typing import IO

import psutil

from loadtest.metrics import Histogram


class Live:
    """Counts progress messages (`loadtest.workload.Sink`) and prints a line now and then."""

    def __init__(self, enabled: bool, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self.in_flight = 0
        self.admitted = 0
        self.outcomes: Counter[str] = Counter()
        self.finals = 0
        self.latency = Histogram()
        self.clock0 = time.monotonic()
        self.generator: list[psutil.Process] = [psutil.Process()]
        self._width = 0

    def __call__(self, kind: str, *payload: object) -> None:
        if kind == "begin":
            self.in_flight += 1
        elif kind == "admitted":
            self.admitted += 1
        elif kind == "final":
            self.finals += 1
            self.latency.record(float(payload[1]))  # type: ignore[arg-type]
        elif kind == "end":
            self.in_flight -= 1
            self.outcomes[str(payload[0])] += 1

    def line(self) -> str:
        o = self.outcomes
        cpu = 0.0
        for p in self.generator:
            try:
                cpu = max(cpu, p.cpu_percent(None))
            except psutil.Error:
                continue
        p95 = self.latency.percentile(95) if self.latency.count else None
        parts = [
            f"sessions {self.in_flight} active, {o['completed']} done, {o['refused']} refused, "
            f"{o['failed'] + o['connect_error']} failed, {o['timed_out']} timed out",
            f"finals {self.finals}",
            f"p95 {p95:,.0f} ms" if p95 is not None else "p95 -",
            f"gen cpu {cpu:.0f}%",
        ]
        return f"[{time.monotonic() - self.clock0:7.1f}s] " + " | ".join(parts)

    def show(self) -> None:
        text = self.line()
        if self.tty:
            pad = max(0, self._width - len(text))
            self.stream.write("\r" + text + " " * pad)
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    async def run(self, clock0: float, generator_pids: list[int]) -> None:
        self.clock0 = clock0
        for pid in generator_pids:
            try:
                self.generator.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                continue
        for p in self.generator:
            try:
                p.cpu_percent(None)
            except psutil.Error:
                continue
        if not self.enabled:
            return
        every = 1.0 if self.tty else 5.0
        try:
            while True:
                await asyncio.sleep(every)
                self.show()
        finally:
            if self.tty and self._width:
                self.stream.write("\r" + " " * self._width + "\r")
                self.stream.flush()
