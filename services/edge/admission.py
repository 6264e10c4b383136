"""Admission control: refuse NEW sessions up front when the pipeline cannot serve them.

A background task keeps a cached view of the work queue (pending + ack
pending on the workers' consumer, refreshed every `refresh_s`, never a
JetStream call per chunk or per connect) and of the live workers (NATS micro
discovery). `check()` answers from that view in microseconds. The backlog
limit has hysteresis: once over the high-water mark the edge refuses until the
backlog is back under the low-water mark. A cap on sessions per live worker
refuses before the backlog builds at all (a backlog only shows overload after
the fact; the cap keeps admitted sessions from waiting on it). Sessions
already admitted are never affected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from dataclasses import dataclass

from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError

from jetstream import subjects
from services.common.discovery import ping_services

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    reason: str  # queue_full | at_capacity | no_workers | draining | nats_unavailable
    message: str
    retry_after: float


@dataclass(frozen=True, slots=True)
class AdmissionConfig:
    refresh_s: float = 0.25
    workers_every_s: float = 1.0
    backlog_high_per_worker: int = 8  # segments waiting or in flight, per live worker
    backlog_low_per_worker: int = 4
    require_workers: bool = True
    retry_after_s: float = 5.0
    max_sessions_per_worker: float = (
        0.0  # 0: no cap; else sessions this edge admits per live worker
    )
    max_connections: int = 2000  # sessions on this edge
    max_connections_per_tenant: int = 500


class Admission:
    def __init__(self, nc: NATS, config: AdmissionConfig) -> None:
        self.nc = nc
        self.config = config
        self.tenants: Counter[str] = Counter()  # open sessions by tenant
        self.backlog = 0
        self.workers = 0
        self.full = False
        self.draining = False
        self.updated = 0.0
        self._task: asyncio.Task[None] | None = None
        self._workers_task: asyncio.Task[None] | None = None

    def active_sessions(self) -> int:
        return self.tenants.total()

    def opened(self, tenant: str) -> None:
        self.tenants[tenant] += 1

    def closed(self, tenant: str) -> None:
        self.tenants[tenant] -= 1
        if self.tenants[tenant] <= 0:
            del self.tenants[tenant]

    @property
    def high_water(self) -> int:
        return self.config.backlog_high_per_worker * max(1, self.workers)

    @property
    def low_water(self) -> int:
        return self.config.backlog_low_per_worker * max(1, self.workers)

    async def start(self) -> None:
        await self.refresh_workers()
        await self.refresh_backlog()
        self._task = asyncio.create_task(self._loop(self.config.refresh_s, self.refresh_backlog))
        self._workers_task = asyncio.create_task(
            self._loop(self.config.workers_every_s, self.refresh_workers)
        )

    async def stop(self) -> None:
        for task in (self._task, self._workers_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _loop(self, every: float, refresh) -> None:  # type: ignore[no-untyped-def]
        while True:
            await asyncio.sleep(every)
            if not self.nc.is_connected:
                continue
            try:
                await refresh()
            except (NatsError, TimeoutError) as exc:
                log.debug("admission refresh failed: %r", exc)

    async def refresh_backlog(self) -> None:
        info = await self.nc.jetstream().consumer_info(
            subjects.STREAM_SEGMENTS, subjects.CONSUMER_WORKERS, timeout=1.0
        )
        self.backlog = int(info.num_pending or 0) + int(info.num_ack_pending or 0)
        self.updated = time.monotonic()
        if not self.full and self.backlog >= self.high_water:
            self.full = True
            log.warning("backlog %d >= %d: refusing new sessions", self.backlog, self.high_water)
        elif self.full and self.backlog <= self.low_water:
            self.full = False
            log.info("backlog %d <= %d: admitting new sessions again", self.backlog, self.low_water)

    async def refresh_workers(self) -> None:
        self.workers = len(await ping_services(self.nc, subjects.WORKER_SERVICE, wait=0.2))

    def check(self, tenant: str = "default") -> Refusal | None:
        cfg = self.config
        if self.draining:
            return Refusal(503, "draining", "this edge is shutting down", cfg.retry_after_s)
        if self.active_sessions() >= cfg.max_connections:
            return Refusal(503, "too_many_connections", "this edge is at its connection limit", 1)
        if self.tenants[tenant] >= cfg.max_connections_per_tenant:
            return Refusal(429, "too_many_connections", "your tenant is at its connection limit", 1)
        if not self.nc.is_connected:
            return Refusal(503, "nats_unavailable", "the queue is unreachable", 2.0)
        if cfg.require_workers and self.workers == 0:
            return Refusal(
                503, "no_workers", "no transcription worker is running", cfg.retry_after_s
            )
        cap = cfg.max_sessions_per_worker * self.workers
        if cap > 0 and self.active_sessions() >= cap:
            return Refusal(
                503,
                "at_capacity",
                f"{self.active_sessions()} sessions already for {self.workers} worker(s)",
                cfg.retry_after_s,
            )
        if self.full:
            return Refusal(
                503,
                "queue_full",
                f"{self.backlog} segments are waiting for {max(1, self.workers)} worker(s)",
                cfg.retry_after_s,
            )
        return None
