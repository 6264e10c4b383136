"""Failure injection: kill workers, restart nats-server, while devices keep talking.

Only processes this run was told about are touched: `--worker-pids` /
`--nats-pid`, or the children of the `escapement up` given by `--up-pid` or
started by `--spawn-up`. Nothing is looked up by name. A restarted
nats-server is started again from the command line and working directory of
the one that was killed (a random `-p -1` port is pinned to the port it had,
so clients find it again).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil

from loadtest.monitor import Targets, _alive
from services.runtime.procs import Child, spawn

BUSY_CPU = 20.0  # % of a core: a worker this busy is probably mid-job


@dataclass
class Chaos:
    targets: Targets
    clock0: float
    kill_every_s: float | None = None
    restart_nats_every_s: float | None = None
    max_kills: int | None = None
    max_nats_restarts: int | None = None
    sig: signal.Signals = signal.SIGKILL
    nats_down_s: float = 2.0
    nats_url: str = ""
    busy_wait_s: float = 5.0  # how long to wait for a busy worker to kill
    events: list[dict[str, Any]] = field(default_factory=list)
    started_nats: list[Child] = field(default_factory=list)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _log_dir: Path | None = None

    def _now(self) -> float:
        return round(time.monotonic() - self.clock0, 3)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def run(self) -> None:
        loops = []
        if self.kill_every_s:
            loops.append(self._kill_loop())
        if self.restart_nats_every_s:
            loops.append(self._nats_loop())
        try:
            await asyncio.gather(*loops)
            # the watchers of what was killed, each with its own time limit
            await asyncio.gather(*self._tasks)
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- workers ---------------------------------------------------------------

    async def _pick_worker(self) -> tuple[psutil.Process | None, float]:
        """The busiest known worker, waiting a little for one that is mid-job."""
        deadline = time.monotonic() + self.busy_wait_s
        while True:
            workers = self.targets.workers()
            if not workers:
                return None, 0.0
            for p in workers:
                with contextlib.suppress(psutil.Error):
                    p.cpu_percent(None)
            await asyncio.sleep(0.25)
            loads = []
            for p in workers:
                with contextlib.suppress(psutil.Error):
                    loads.append((p.cpu_percent(None), p))
            if loads:
                cpu, victim = max(loads, key=lambda x: x[0])
                if cpu >= BUSY_CPU or time.monotonic() >= deadline:
                    return victim, cpu

    async def _kill_loop(self) -> None:
        assert self.kill_every_s
        kills = 0
        while self.max_kills is None or kills < self.max_kills:
            await asyncio.sleep(self.kill_every_s)
            victim, cpu = await self._pick_worker()
            event: dict[str, Any] = {
                "t": self._now(),
                "action": "kill_worker",
                "signal": self.sig.name,
            }
            self.events.append(event)
            if victim is None:
                event["result"] = "no known worker alive"
                continue
            before = {p.pid for p in self.targets.workers()}
            try:
                victim.send_signal(self.sig)  # psutil refuses if the pid was reused
            except psutil.Error as exc:
                event.update(pid=victim.pid, result=f"not killed: {exc}")
                continue
            kills += 1
            event.update(
                pid=victim.pid, cpu_percent=round(cpu, 1), busy=cpu >= BUSY_CPU, result="killed"
            )
            workers = self.targets.given.get("workers", [])
            if victim in workers:
                workers.remove(victim)
            if self.targets.up is not None:
                self._spawn(self._watch_restart(before, event))

    async def _watch_restart(
        self, before: set[int], event: dict[str, Any], limit_s: float = 90.0
    ) -> None:
        """Time until the supervisor in `escapement up` has a new worker running."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < limit_s:
            await asyncio.sleep(0.25)
            new = {p.pid for p in self.targets.workers()} - before
            if new:
                event["replaced_by"] = sorted(new)
                event["replaced_after_s"] = round(time.monotonic() - t0, 2)
                return
        event["replaced_by"] = None

    # --- nats-server -----------------------------------------------------------

    async def _nats_loop(self) -> None:
        assert self.restart_nats_every_s
        restarts = 0
        while self.max_nats_restarts is None or restarts < self.max_nats_restarts:
            await asyncio.sleep(self.restart_nats_every_s)
            event: dict[str, Any] = {
                "t": self._now(),
                "action": "restart_nats",
                "signal": self.sig.name,
            }
            self.events.append(event)
            servers = self.targets.nats()
            if not servers:
                event["result"] = "no known nats-server alive"
                continue
            await self._restart(servers[0], event)
            restarts += 1

    async def _restart(self, proc: psutil.Process, event: dict[str, Any]) -> None:
        try:
            cmd, cwd = proc.cmdline(), proc.cwd()
        except psutil.Error as exc:
            event["result"] = f"cannot read its command line: {exc}"
            return
        port = self._port(proc)
        cmd = pin_port(cmd, port)
        event.update(pid=proc.pid, port=port)
        try:
            proc.send_signal(self.sig)
        except psutil.Error as exc:
            event["result"] = f"not killed: {exc}"
            return
        await _wait_gone(proc, 10.0, self.sig)
        for group in (self.targets.extra_nats, self.targets.given.get("nats", [])):
            if proc in group:
                group.remove(proc)
        await asyncio.sleep(self.nats_down_s)
        new, log_path = self._start_nats(cmd, cwd)
        self.started_nats.append(new)
        self.targets.extra_nats.append(psutil.Process(new.pid))
        t0 = time.monotonic()
        up = port is not None and await _wait_port(
            "127.0.0.1" if not self.nats_url else _host(self.nats_url), port, 15.0
        )
        event.update(
            new_pid=new.pid, log=str(log_path), result="restarted" if up else "restarted, port not answering",
            listening_after_s=round(time.monotonic() - t0, 2) if up else None,
        )  # fmt: skip

    def _start_nats(self, cmd: list[str], cwd: str) -> tuple[Child, Path]:
        if self._log_dir is None:
            self._log_dir = Path(tempfile.mkdtemp(prefix="escapement-chaos-"))
        log_path = self._log_dir / f"nats-server-{len(self.started_nats)}.log"
        # its own session: it outlives this run when the `escapement up` is not ours
        child = spawn(cmd, log_path, cwd=cwd, new_session=True, name="nats-server")
        return child, log_path

    def _port(self, proc: psutil.Process) -> int | None:
        if self.nats_url:
            with contextlib.suppress(ValueError):
                port = urlsplit(self.nats_url.split(",")[0]).port
                if port:
                    return port
        with contextlib.suppress(psutil.Error):
            listening = sorted(
                c.laddr.port for c in proc.net_connections("inet") if c.status == psutil.CONN_LISTEN
            )
            if listening:
                return listening[0]
        return None

    def stop_started_nats(self) -> None:
        """Stop the nats-servers this run started (when it also owns the `escapement up`)."""
        for child in self.started_nats:
            child.stop(grace=10)

    def summary(self) -> dict[str, Any]:
        kills = [
            e for e in self.events if e["action"] == "kill_worker" and e.get("result") == "killed"
        ]
        restarts = [
            e
            for e in self.events
            if e["action"] == "restart_nats" and str(e.get("result", "")).startswith("restarted")
        ]
        replaced = [e["replaced_after_s"] for e in kills if e.get("replaced_after_s") is not None]
        return {
            "workers_killed": len(kills),
            "workers_killed_busy": sum(1 for e in kills if e.get("busy")),
            "workers_replaced": len(replaced),
            "worker_replaced_after_s_max": max(replaced) if replaced else None,
            "nats_restarts": len(restarts),
            "nats_started": [p.pid for p in self.started_nats],
            "events": self.events,
        }


def pin_port(cmd: list[str], port: int | None) -> list[str]:
    """Replace a `-p`/`--port` value (e.g. -1, random) with the port the server had."""
    if port is None:
        return list(cmd)
    out = list(cmd)
    for i, arg in enumerate(out[:-1]):
        if arg in ("-p", "--port", "-port"):
            out[i + 1] = str(port)
            return out
    return [*out, "-p", str(port)]


def _host(url: str) -> str:
    return urlsplit(url.split(",")[0]).hostname or "127.0.0.1"


async def _poll_gone(proc: psutil.Process, limit_s: float) -> bool:
    """Polls: the process may not be our child (a zombie until its parent reaps it)."""
    for _ in range(int(limit_s / 0.05) + 1):
        if not _alive(proc):
            return True
        await asyncio.sleep(0.05)
    return not _alive(proc)


async def _wait_gone(proc: psutil.Process, limit_s: float, sig: signal.Signals) -> None:
    if not await _poll_gone(proc, limit_s) and sig != signal.SIGKILL:
        with contextlib.suppress(psutil.Error):
            proc.kill()
        await _poll_gone(proc, 5.0)


async def _wait_port(host: str, port: int, limit_s: float) -> bool:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout=0.5)
        except (OSError, TimeoutError):
            await asyncio.sleep(0.1)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True
    return False
