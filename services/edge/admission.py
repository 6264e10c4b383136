"""Admission control: refuse NEW sessions up front when the pipeline cannot serve them.

A background task keeps a cached view of the work queue (pending + ack
pending on the workers' consumer, refreshed every `refresh_s`, never a
JetStream call per chunk or per connect) and of the live workers (NATS micro
discovery). `check()` answers from that view in microseconds. The backlog
limit has hysteresis: once over the high-water mark the edge refuses until the
backlog is back under the low-water mark. A session cap refuses before the
backlog builds at all (a backlog only shows overload after the fact; the cap
keeps admitted sessions from waiting on it). The cap comes from what the workers
measure: each says in its discovery metadata how many audio seconds it decoded
per second of decoding over its recent finals (`decode_rate`), and the edge
admits sessions while their expected load (`session_load` audio seconds per
second each) fits `decode_utilisation` of the workers' summed rate. The headroom
is what keeps the latency: a queue served at full rate grows without bound.
Until a worker has a rate, `fallback_sessions_per_worker` stands in; a fixed
`max_sessions_per_worker` can cap it further. Sessions already admitted are
never affected.

Tenants share the edge fairly. While more than one tenant is known (named in
the API keys or in `tenant_quotas`, holding a session, or seen within
`tenant_active_s`), one tenant may hold at most `tenant_share` of the edge's
session capacity (the per-worker cap, else `max_connections`) and of its
queued-audio budget (`queued_audio_per_worker_s` per live worker: final
segments published and not yet answered). Over either it is refused with 429
`tenant_quota`, naming the quota, while others are admitted. A known tenant
counts before it arrives: a session holds its place for hours, so a tenant
that comes later must find room. When the queue is over its high-water mark,
a tenant with less than its share of this edge's queued audio is still
admitted: the backlog is another tenant's. `tenant_quotas` sets any of this
per tenant (`share`, `sessions`, `queued_s`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from opentelemetry.metrics import Counter as MetricCounter

from jetstream import subjects
from services.common.discovery import decode_rate, lane_of, ping_services, takes_finals
from services.common.supervise import start_supervised

log = logging.getLogger(__name__)


TENANT_QUOTA = "tenant_quota"


WORKER_GRACE_S = 3.0  # how long a drop in the worker count must last to count


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    # queue_full | at_capacity | no_workers | draining | nats_unavailable |
    # too_many_connections | tenant_quota
    reason: str
    message: str
    retry_after: float
    detail: Mapping[str, object] = field(default_factory=dict)  # more for the JSON body


@dataclass(frozen=True, slots=True)
class TenantQuota:
    """One tenant's own limits; None: the edge's defaults."""

    share: float | None = None  # of the session capacity and the queued-audio budget
    sessions: int | None = None  # open sessions on this edge (replaces the share's)
    queued_s: float | None = None  # queued audio on this edge (replaces the share's)


_QUOTA_KEYS = {"share": float, "sessions": int, "queued_s": float}


def parse_tenant_quotas(text: str) -> dict[str, TenantQuota]:
    """`acme:share=0.8,sessions=200;trial:sessions=2,queued_s=10` -> {tenant: TenantQuota}.

    Raises ValueError naming what is wrong."""
    quotas: dict[str, TenantQuota] = {}
    for entry in filter(None, (e.strip() for e in text.split(";"))):
        tenant, sep, rest = entry.partition(":")
        tenant = tenant.strip()
        if not sep or not tenant:
            raise ValueError(f"tenant quota {entry!r}: expected 'tenant:key=value,...'")
        values: dict[str, float | int] = {}
        for item in filter(None, (i.strip() for i in rest.split(","))):
            key, eq, raw = item.partition("=")
            kind = _QUOTA_KEYS.get(key.strip())
            if not eq or kind is None:
                raise ValueError(
                    f"tenant quota of {tenant!r}: {item!r} is not one of "
                    f"{', '.join(k + '=' for k in _QUOTA_KEYS)}"
                )
            try:
                value = kind(raw.strip())
            except ValueError:
                raise ValueError(f"tenant quota of {tenant!r}: {item!r} is not a number") from None
            if value < 0 or (key.strip() == "share" and value > 1):
                raise ValueError(f"tenant quota of {tenant!r}: {item!r} is out of range")
            values[key.strip()] = value
        quotas[tenant] = TenantQuota(**values)  # type: ignore[arg-type]
    return quotas


@dataclass(frozen=True, slots=True)
class AdmissionConfig:
    refresh_s: float = 0.25
    workers_every_s: float = 1.0
    backlog_high_per_worker: int = 8  # segments waiting or in flight, per live worker
    backlog_low_per_worker: int = 4
    require_workers: bool = True
    retry_after_s: float = 5.0
    max_sessions_per_worker: float = (
        0.0  # 0: no fixed cap; else at most this many sessions per live worker
    )
    # Measured admission: sessions whose expected load (audio seconds of segments per
    # second each) fits this share of the workers' summed decode rate. 0: off.
    session_load: float = 0.0
    decode_utilisation: float = 0.45
    fallback_sessions_per_worker: float = 4.0  # while no worker has a decode rate yet
    max_connections: int = 2000  # sessions on this edge
    max_connections_per_tenant: int = 500
    tenant_share: float = 0.5  # of capacity and queued audio, while another tenant is known
    queued_audio_per_worker_s: float = 30.0  # this edge's queued-audio budget per live worker
    tenant_active_s: float = 600.0  # a tenant seen this recently is known
    tenant_quotas: Mapping[str, TenantQuota] = field(default_factory=dict)
    known_tenants: frozenset[str] = frozenset()  # the API keys' tenants


QueuedAudio = Callable[[], Mapping[str, float]]  # queued audio seconds by tenant, this edge


class Admission:
    def __init__(
        self,
        nc: NATS,
        config: AdmissionConfig,
        queued_audio: QueuedAudio = dict,
        restarts: MetricCounter | None = None,
    ) -> None:
        self.nc = nc
        self.config = config
        self.queued_audio = queued_audio
        self.restarts = restarts  # escapement_loop_restarts_total
        self.tenants: Counter[str] = Counter()  # open sessions by tenant
        self.lane_sessions: Counter[str] = Counter()  # open sessions by model lane
        self._seen: dict[str, float] = {}  # tenant -> when it last asked (monotonic)
        self._queued: tuple[float, Mapping[str, float]] = (-math.inf, {})
        self.backlog = 0
        self.workers = 0
        # by model lane ("": the default model's): live finals workers and their rates
        self.lane_workers: dict[str, int] = {}
        self.lane_rates: dict[str, list[float | None]] = {}
        self._lane_seen_at: dict[str, float] = {}  # when a ping last found that many or more
        self.full = False
        self.draining = False
        self.updated = 0.0
        self._task: asyncio.Task[None] | None = None
        self._workers_task: asyncio.Task[None] | None = None

    @property
    def decode_rates(self) -> list[float | None]:
        """Per live finals worker (every lane), its decode rate; None: not measured yet."""
        return [rate for lane in self.lane_rates.values() for rate in lane]

    def active_sessions(self) -> int:
        return self.tenants.total()

    def opened(self, tenant: str, lane: str = "") -> None:
        self.tenants[tenant] += 1
        self.lane_sessions[lane] += 1

    def closed(self, tenant: str, lane: str = "") -> None:
        self.tenants[tenant] -= 1
        if self.tenants[tenant] <= 0:
            del self.tenants[tenant]
        self.lane_sessions[lane] -= 1
        if self.lane_sessions[lane] <= 0:
            del self.lane_sessions[lane]

    @property
    def high_water(self) -> int:
        return self.config.backlog_high_per_worker * max(1, self.workers)

    @property
    def low_water(self) -> int:
        return self.config.backlog_low_per_worker * max(1, self.workers)

    async def start(self) -> None:
        await self.refresh_workers()
        await self.refresh_backlog()
        self._task = start_supervised(
            "admission-backlog",
            lambda: self._loop(self.config.refresh_s, self.refresh_backlog),
            restarts=self.restarts,
        )
        self._workers_task = start_supervised(
            "admission-workers",
            lambda: self._loop(self.config.workers_every_s, self.refresh_workers),
            restarts=self.restarts,
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
        """Workers answering a ping that take finals (not the interim-look-only ones), by
        model lane. A worker busy decoding may miss one 0.2 s ping: a count that drops
        is believed only once it has stayed down WORKER_GRACE_S, so one slow answer
        does not refuse sessions as `no_workers`."""
        now = time.monotonic()
        replies = [
            r
            for r in await ping_services(self.nc, subjects.WORKER_SERVICE, wait=0.2)
            if takes_finals(r)
        ]
        rates: dict[str, list[float | None]] = {}
        for reply in replies:
            rates.setdefault(lane_of(reply), []).append(decode_rate(reply))
        self.lane_rates = rates
        for lane in {*rates, *self.lane_workers}:
            answered, had = len(rates.get(lane, ())), self.lane_workers.get(lane, 0)
            seen_at = self._lane_seen_at.get(lane, 0.0)
            count = answered if answered >= had or now - seen_at >= WORKER_GRACE_S else had
            if answered >= count:
                self._lane_seen_at[lane] = now
            if count:
                self.lane_workers[lane] = count
            else:
                self.lane_workers.pop(lane, None)
        self.workers = sum(self.lane_workers.values())

    # --- tenants ---------------------------------------------------------------

    def _shared(self, tenant: str, now: float) -> bool:
        """Whether a tenant other than `tenant` is known: then shares apply."""
        cfg = self.config
        for names in (self.tenants, cfg.known_tenants, cfg.tenant_quotas):
            if len(names) > 1 or (names and tenant not in names):
                return True
        horizon = now - cfg.tenant_active_s
        if len(self._seen) > 1000:  # forget the long gone
            self._seen = {t: at for t, at in self._seen.items() if at >= horizon}
        return any(t != tenant and at >= horizon for t, at in self._seen.items())

    def _queued_by_tenant(self, now: float) -> Mapping[str, float]:
        """This edge's queued audio by tenant, recomputed at most every `refresh_s`."""
        at, queued = self._queued
        if now - at >= self.config.refresh_s:
            queued = self.queued_audio()
            self._queued = (now, queued)
        return queued

    def session_cap(self, lane: str | None = None) -> tuple[int, str] | None:
        """The sessions this edge admits now, and what sets that; None: no cap. `lane`:
        the sessions of that model lane, from its workers alone (None: all of them)."""
        cfg = self.config
        caps: list[tuple[int, str]] = []
        if lane is None:
            workers, rates = self.workers, self.decode_rates
        else:
            workers, rates = self.lane_workers.get(lane, 0), self.lane_rates.get(lane, [])
        fixed = cfg.max_sessions_per_worker * workers
        if fixed > 0:
            caps.append((int(fixed), f"{cfg.max_sessions_per_worker:g} per worker"))
        if cfg.session_load > 0 and workers:
            known = [r for r in rates if r]
            if known:  # a worker without a rate yet counts as the others' mean
                total = sum(known) + (workers - len(known)) * sum(known) / len(known)
                fits = math.floor(cfg.decode_utilisation * total / cfg.session_load)
                caps.append((max(1, fits), f"the workers decode {total:.1f} audio s/s"))
            elif cfg.fallback_sessions_per_worker > 0:
                fallback = int(cfg.fallback_sessions_per_worker * workers)
                caps.append((max(1, fallback), "no decode rate measured yet"))
        return min(caps) if caps else None

    def lanes_named(self) -> bool:
        """Whether any worker or session is on a named model's lane: then each lane is
        admitted by its own workers (else, as always, every worker counts)."""
        return any(self.lane_workers) or any(self.lane_sessions)

    def _capacity(self) -> int:
        cap = self.session_cap()
        return cap[0] if cap is not None else self.config.max_connections

    def quotas(self, tenant: str, now: float | None = None) -> tuple[int, float | None, float]:
        """(sessions, queued audio seconds or None for no limit, share) for `tenant` now."""
        cfg = self.config
        now = time.monotonic() if now is None else now
        own = cfg.tenant_quotas.get(tenant, TenantQuota())
        share = cfg.tenant_share if own.share is None else own.share
        shared = self._shared(tenant, now)
        if own.sessions is not None:
            sessions = own.sessions
        elif shared:
            fair = max(1, math.floor(share * self._capacity()))
            sessions = min(cfg.max_connections_per_tenant, fair)
        else:
            sessions = cfg.max_connections_per_tenant
        queued: float | None = own.queued_s
        if queued is None and shared:
            queued = share * cfg.queued_audio_per_worker_s * max(1, self.workers)
        return sessions, queued, share

    def _tenant_refusal(self, tenant: str, now: float) -> Refusal | None:
        cfg = self.config
        sessions, queued_limit, _ = self.quotas(tenant, now)
        held = self.tenants[tenant]
        if held >= sessions:
            return Refusal(
                429,
                TENANT_QUOTA,
                f"tenant {tenant} holds {held} of its {sessions} sessions on this edge",
                cfg.retry_after_s,
                {"quota": "sessions", "limit": sessions, "used": held},
            )
        if queued_limit is not None:
            used = self._queued_by_tenant(now).get(tenant, 0.0)
            if used >= queued_limit:
                return Refusal(
                    429,
                    TENANT_QUOTA,
                    f"tenant {tenant} has {used:.1f} s of audio queued, "
                    f"its quota is {queued_limit:.1f} s",
                    cfg.retry_after_s,
                    {"quota": "queued_audio_s", "limit": round(queued_limit, 1),
                     "used": round(used, 1)},
                )  # fmt: skip
        return None

    def _backlog_is_others(self, tenant: str, now: float) -> bool:
        """Queue over high water: is it others' doing (this tenant under its share here)?"""
        if not self._shared(tenant, now):
            return False
        queued = self._queued_by_tenant(now)
        total = sum(queued.values())
        _, _, share = self.quotas(tenant, now)
        return total > 0 and queued.get(tenant, 0.0) < share * total

    # --- the decision ---------------------------------------------------------

    def check(self, tenant: str = "default", lane: str = "") -> Refusal | None:
        """Whether a new session of `tenant` on model lane `lane` is refused, and why."""
        cfg = self.config
        now = time.monotonic()
        self._seen[tenant] = now
        if self.draining:
            return Refusal(503, "draining", "this edge is shutting down", cfg.retry_after_s)
        if self.active_sessions() >= cfg.max_connections:
            return Refusal(503, "too_many_connections", "this edge is at its connection limit", 1)
        refusal = self._tenant_refusal(tenant, now)
        if refusal is not None:
            return refusal
        if not self.nc.is_connected:
            return Refusal(503, "nats_unavailable", "the queue is unreachable", 2.0)
        by_lane = bool(lane) or self.lanes_named()
        workers = self.lane_workers.get(lane, 0) if by_lane else self.workers
        if cfg.require_workers and workers == 0:
            what = f"for model lane {lane} " if lane else ""
            return Refusal(
                503, "no_workers", f"no transcription worker {what}is running", cfg.retry_after_s
            )
        cap = self.session_cap(lane if by_lane else None)
        held = self.lane_sessions[lane] if by_lane else self.active_sessions()
        if cap is not None and held >= cap[0]:
            return Refusal(
                503,
                "at_capacity",
                f"{held} sessions already for {workers} worker(s) (at most {cap[0]}: {cap[1]})",
                cfg.retry_after_s,
            )
        if self.full and not self._backlog_is_others(tenant, now):
            return Refusal(
                503,
                "queue_full",
                f"{self.backlog} segments are waiting for {max(1, self.workers)} worker(s)",
                cfg.retry_after_s,
            )
        return None
