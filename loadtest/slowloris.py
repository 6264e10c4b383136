"""Slow-loris: sockets that hold the edge's resources without doing anything.

Two kinds of attacker, half each (`--idle-fraction`):
- idle: a WebSocket that completed its upgrade and then sends nothing, not
  even KeepAlive (the edge should close it after its idle timeout, 4008);
- half-open: raw TCP that sends the start of an HTTP upgrade request and then
  one more header line every few seconds, never finishing it (the edge should
  time the handshake out).
Meanwhile a probe device streams speech session after session, and its
latency shows whether the attack hurt service.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from loadtest.metrics import percentile
from services.cli.client import Refused, open_stream


@dataclass
class Attacker:
    kind: str  # "idle" or "half_open"
    opened_at: float | None = None
    admitted: bool = False
    refused: str = ""
    error: str = ""
    closed_by_server_after: float | None = None
    close_code: int | None = None
    response: str = ""  # half-open: the status line the server answered with, if any
    extra: dict[str, Any] = field(default_factory=dict)


async def idle_socket(
    http: aiohttp.ClientSession, url: str, token: str | None, a: Attacker
) -> None:
    try:
        ws = await open_stream(http, url, token=token)
    except Refused as exc:
        a.refused = exc.reason
        return
    except (aiohttp.ClientError, OSError) as exc:
        a.error = f"{type(exc).__name__}: {exc}"
        return
    a.opened_at, a.admitted = time.monotonic(), True
    try:
        async for _ in ws:  # SessionStarted, then nothing until the server gives up on us
            pass
        a.closed_by_server_after = time.monotonic() - a.opened_at
        a.close_code = ws.close_code
    finally:
        await ws.close()


def partial_request(host: str, port: int) -> bytes:
    return (
        f"GET /v1/stream?sample_rate=16000 HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
    ).encode()


async def half_open(host: str, port: int, drip_s: float, a: Attacker) -> None:
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as exc:
        a.error = f"{type(exc).__name__}: {exc}"
        return
    a.opened_at = time.monotonic()

    async def drip() -> None:
        n = 0
        with contextlib.suppress(OSError):
            writer.write(partial_request(host, port))
            await writer.drain()
            while True:
                await asyncio.sleep(drip_s)
                n += 1
                writer.write(f"X-Slow-{n}: {n}\r\n".encode())
                await writer.drain()

    dripping = asyncio.create_task(drip())
    try:
        with contextlib.suppress(OSError):
            first = await reader.readline()
            a.response = first.decode(errors="replace").strip()[:80]
            while await reader.read(4096):
                pass
        a.closed_by_server_after = time.monotonic() - a.opened_at
    finally:
        dripping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await dripping
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


class Attack:
    def __init__(
        self, url: str, token: str | None, connections: int, idle_fraction: float, drip_s: float
    ) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        self.url, self.token, self.drip_s = url, token, drip_s
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if parts.scheme in ("https", "wss") else 80)
        n_idle = round(connections * idle_fraction)
        self.attackers = [Attacker("idle") for _ in range(n_idle)]
        self.attackers += [Attacker("half_open") for _ in range(connections - n_idle)]
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, http: aiohttp.ClientSession) -> None:
        for a in self.attackers:
            if a.kind == "idle":
                coro = idle_socket(http, self.url, self.token, a)
            else:
                coro = half_open(self.host, self.port, self.drip_s, a)
            self._tasks.append(asyncio.create_task(coro))
            await asyncio.sleep(0)  # let each start before the next

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def summary(self, duration_s: float) -> dict[str, Any]:
        out: dict[str, Any] = {"connections": len(self.attackers), "duration_s": duration_s}
        for kind in ("idle", "half_open"):
            group = [a for a in self.attackers if a.kind == kind]
            closed = [
                a.closed_by_server_after for a in group if a.closed_by_server_after is not None
            ]
            p50 = percentile(closed, 50)
            out[kind] = {
                "opened": sum(1 for a in group if a.opened_at is not None),
                "admitted": sum(1 for a in group if a.admitted),
                "refused": dict(Counter(a.refused for a in group if a.refused)),
                "errors": dict(Counter(a.error[:80] for a in group if a.error)),
                "closed_by_server": len(closed),
                "closed_after_s_p50": None if p50 is None else round(p50, 2),
                "closed_after_s_max": round(max(closed), 2) if closed else None,
                "still_open": sum(
                    1 for a in group if a.opened_at is not None and a.closed_by_server_after is None
                ),
                "close_codes": {
                    str(k): v
                    for k, v in Counter(a.close_code for a in group if a.close_code).items()
                },
                "responses": dict(Counter(a.response for a in group if a.response)),
            }
        return out
