"""A device client of `GET /v1/stream`: streams PCM, collects the server's events.

Used by `escapement transcribe`, the tests and the load generator, so they all
speak the protocol one way. Times are `time.monotonic()` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit, urlunsplit

import aiohttp

from schemas import device as ev


class Refused(Exception):
    """The edge refused the upgrade (HTTP status, reason, Retry-After)."""

    def __init__(self, status: int, reason: str, retry_after: float | None) -> None:
        super().__init__(f"refused with HTTP {status} ({reason})")
        self.status = status
        self.reason = reason
        self.retry_after = retry_after


@dataclass
class Received:
    t: float
    event: ev.ServerEvent


@dataclass
class StreamRun:
    connected_at: float = 0.0
    session_id: str = ""
    resume_token: str = ""
    events: list[Received] = field(default_factory=list)
    sent: list[tuple[int, float]] = field(default_factory=list)  # (audio ms sent so far, when)
    close_code: int | None = None
    close_reason: str = ""
    finished_at: float = 0.0

    def of_type(self, kind: type) -> list[Received]:
        return [r for r in self.events if isinstance(r.event, kind)]

    @property
    def finals(self) -> list[ev.Final]:
        return [r.event for r in self.events if isinstance(r.event, ev.Final)]  # type: ignore[misc]

    @property
    def text(self) -> str:
        return " ".join(f.text for f in sorted(self.finals, key=lambda f: f.segment) if f.text)

    def sent_time_of(self, audio_ms: float) -> float | None:
        """When the audio up to `audio_ms` had been sent."""
        for ms, t in self.sent:
            if ms >= audio_ms:
                return t
        return None


def stream_url(
    base: str,
    sample_rate: int,
    language: str = "",
    framing: str = "raw",
    token: str | None = None,
    fast: bool = False,
    interim_results: bool = True,
) -> str:
    """`http://host:port` or `ws://host:port[/v1/stream]` -> the full stream URL."""
    parts = urlsplit(base if "://" in base else f"http://{base}")
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = parts.path.rstrip("/")
    if not path.endswith("/v1/stream"):
        path += "/v1/stream"
    query = {"sample_rate": sample_rate, "encoding": "linear16"}
    if language:  # omitted: detected by a multilingual model, English otherwise
        query["language"] = language
    if framing != "raw":
        query["framing"] = framing
    if fast:
        query["pace"] = "fast"
    if not interim_results:
        query["interim_results"] = "false"
    if token:
        query["token"] = token
    return urlunsplit((scheme, parts.netloc, path, urlencode(query), ""))


async def open_stream(
    http: aiohttp.ClientSession,
    base_url: str,
    sample_rate: int = 16000,
    *,
    language: str = "",
    token: str | None = None,
    fast: bool = False,
    interim_results: bool = True,
) -> aiohttp.ClientWebSocketResponse:
    """Just the upgrade; raises `Refused` (status, reason, Retry-After) if the edge says no."""
    url = stream_url(base_url, sample_rate, language, fast=fast, interim_results=interim_results)
    headers = (
        {"Authorization": f"Bearer {token}"} if token else None
    )  # not in the URL: URLs get logged
    try:
        return await http.ws_connect(url, max_msg_size=0, autoping=True, headers=headers)
    except aiohttp.WSServerHandshakeError as exc:
        headers = exc.headers or {}
        retry = headers.get("Retry-After")
        raise Refused(
            exc.status, headers.get(ev.REASON_HEADER, exc.message), float(retry) if retry else None
        ) from None


async def stream_audio(
    http: aiohttp.ClientSession,
    base_url: str,
    pcm: bytes,
    sample_rate: int,
    *,
    language: str = "",
    realtime: bool = True,
    chunk_ms: int = 100,
    token: str | None = None,
    on_event: Callable[[Received], None] | None = None,
    close_timeout: float = 60.0,
    run: StreamRun | None = None,
    interim_results: bool = True,
) -> StreamRun:
    """Stream `pcm` (s16le mono) paced in real time (or as fast as possible), then CloseStream.

    Returns when the server has closed the socket. Raises `Refused` if the
    upgrade is refused. Pass `run` to have it filled in as the session goes,
    so what was sent and received survives a timeout or a dropped socket
    (`run.connected_at` stays 0 until the upgrade succeeded).
    """
    run = StreamRun() if run is None else run
    started = time.monotonic()
    ws = await open_stream(
        http,
        base_url,
        sample_rate,
        language=language,
        token=token,
        fast=not realtime,
        interim_results=interim_results,
    )
    run.connected_at = time.monotonic() - started
    first = asyncio.get_running_loop().create_future()

    async def reader() -> None:
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            received = Received(time.monotonic(), ev.decode_event(msg.data))
            run.events.append(received)
            if isinstance(received.event, ev.SessionStarted) and not first.done():
                run.session_id = received.event.session_id
                run.resume_token = received.event.resume_token
                first.set_result(None)
            if on_event is not None:
                on_event(received)

    reading = asyncio.create_task(reader())
    try:
        step = sample_rate * chunk_ms // 1000 * 2
        t0 = time.monotonic()
        for i, offset in enumerate(range(0, len(pcm), step)):
            if realtime:
                delay = t0 + i * chunk_ms / 1000 - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            if ws.closed:
                break
            await ws.send_bytes(pcm[offset : offset + step])
            run.sent.append((int((offset + step) / 2 / sample_rate * 1000), time.monotonic()))
        if not ws.closed:
            await ws.send_str(ev.encode_control(ev.CloseStream()))
        await asyncio.wait_for(reading, timeout=close_timeout)
    finally:
        if not reading.done():
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading
        await ws.close()
        run.close_code = ws.close_code
        run.close_reason = str(ws.extra) if getattr(ws, "extra", None) else ""
        run.finished_at = time.monotonic()
    return run
