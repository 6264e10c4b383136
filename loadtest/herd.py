"""The reconnect storm: N devices connect within a few seconds, wait for SessionStarted
(or a refusal), and hang up, as after an edge restart or a network blip."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import msgspec

from loadtest.device import (
    COMPLETED,
    CONNECT_ERROR,
    FAILED,
    TIMED_OUT,
    SessionRecord,
)
from loadtest.metrics import Histograms
from loadtest.workload import Sink, http_session, record_histograms, watch_loop_lag
from schemas import device as ev
from services.cli.client import Refused, open_stream


async def connect_once(
    http: aiohttp.ClientSession,
    url: str,
    token: str | None,
    rec: SessionRecord,
    clock0: float,
    limit_s: float,
    sink: Sink,
) -> None:
    begun = time.monotonic()
    rec.start = begun - clock0
    sink("begin")
    ws = None
    try:
        async with asyncio.timeout(limit_s):
            ws = await open_stream(http, url, token=token)
            rec.admitted = True
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                event = ev.decode_event(msg.data)
                if isinstance(event, ev.SessionStarted):
                    rec.session_id = event.session_id
                    rec.session_started_ms = (time.monotonic() - begun) * 1000
                    sink("admitted")
                    break
            await ws.close()
        rec.close_code = ws.close_code
        if rec.session_id:
            rec.outcome = COMPLETED
        else:
            rec.outcome, rec.reason = FAILED, f"closed with {ws.close_code} before SessionStarted"
    except Refused as exc:
        rec.refused(exc)
    except TimeoutError:
        rec.outcome = TIMED_OUT if rec.admitted else CONNECT_ERROR
        rec.reason = (
            f"no SessionStarted within {limit_s:g} s"
            if rec.admitted
            else f"no upgrade within {limit_s:g} s"
        )
    except (aiohttp.ClientError, OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        rec.outcome = FAILED if rec.admitted else CONNECT_ERROR
        rec.reason = f"{type(exc).__name__}: {exc}"
    finally:
        if ws is not None and not ws.closed:
            await ws.close()
        rec.end = time.monotonic() - clock0
        sink("end", rec.outcome, rec.reason)


async def run_herd(
    url: str,
    token: str | None,
    connections: int,
    within_s: float,
    limit_s: float,
    clock0: float,
    sink: Sink,
) -> tuple[list[SessionRecord], Histograms, dict[str, Any]]:
    records = [SessionRecord(device=i, seq=0, item="") for i in range(connections)]
    hist = Histograms()

    async def one(i: int, http: aiohttp.ClientSession) -> None:
        delay = clock0 + (i * within_s / connections if connections else 0) - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await connect_once(http, url, token, records[i], clock0, limit_s, sink)
        record_histograms(hist, records[i])

    lag = asyncio.create_task(watch_loop_lag(hist))
    try:
        async with http_session() as http:
            await asyncio.gather(*(one(i, http) for i in range(connections)))
    finally:
        lag.cancel()
        await asyncio.gather(lag, return_exceptions=True)
    starts = [r.start for r in records]
    span = max(starts) - min(starts) if starts else 0.0
    section = {
        "connections": connections,
        "within_s": within_s,
        "offered_over_s": round(span, 3),
        "achieved_per_s": round(connections / span, 1) if span > 0 else float(connections),
    }
    return records, hist, section
