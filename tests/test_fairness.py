"""Fairness between tenants and limits per session: Finalize rate limit, tenant quotas,
a bounded outbox, supervised background loops."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import msgspec
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from jetstream import subjects
from observability.metrics import Metrics
from schemas import device as ev
from schemas.pipeline import Result, Segment, Word, decode_segment, encode_result, encode_segment
from services.cli.client import StreamRun, stream_audio
from services.edge.admission import (
    Admission,
    AdmissionConfig,
    TenantQuota,
    parse_tenant_quotas,
)
from services.edge.app import EdgeConfigError, admission_key, create_app, metrics_key, router_key
from services.edge.app import sessions_key as edge_sessions
from services.edge.auth import hash_key
from services.edge.params import StreamParams
from services.edge.server import serve
from services.edge.settings import EdgeSettings
from services.edge.stream import FINALIZE_LIMITED, Output, StreamConfig, StreamCore
from services.edge.vad import VadConfig
from tests.support import NO_SESSION_CAP, RunningEdge, run_worker, until, wer

RATE = 16000
SECRET = "test-secret-0123456789abcdef"
KEY_A = "acme-device-key-0123456789abcdef"
KEY_B = "globex-device-key-0123456789abcd"
LONG = (
    "the committee will meet again on thursday afternoon to discuss the budget "
    "for the new library and the repairs to the old town hall"
)


# --- helpers ------------------------------------------------------------------


class Meter:
    """An in-memory metric reader: what the edge counted, by instrument and attributes."""

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader])
        self.metrics = Metrics(self.provider.get_meter("escapement"))

    def value(self, name: str, **attrs: str) -> float:
        data = self.reader.get_metrics_data()
        total = 0.0
        for rm in data.resource_metrics if data else ():
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name != name:
                        continue
                    for point in metric.data.data_points:
                        if all(point.attributes.get(k) == v for k, v in attrs.items()):
                            total += point.value
        return total


@pytest.fixture
def meter() -> Iterator[Meter]:
    m = Meter()
    try:
        yield m
    finally:
        m.provider.shutdown()


@contextlib.asynccontextmanager
async def metered_edge(nats_url: str, meter: Meter, **overrides: Any) -> AsyncIterator[RunningEdge]:
    """`tests.support.run_edge`, its instruments recording into `meter`."""
    options: dict[str, Any] = {"auth_enabled": False, **NO_SESSION_CAP, **overrides}
    settings = EdgeSettings(nats_url=nats_url, host="127.0.0.1", port=0, **options)
    app = create_app(settings)
    app[metrics_key] = meter.metrics
    async with serve(app) as port:
        yield RunningEdge(
            f"http://127.0.0.1:{port}", app, msgspec.structs.replace(settings, port=port)
        )


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def core(**config: object) -> StreamCore:
    cfg = StreamConfig(vad=VadConfig(announce_pauses=True), interims=False, **config)  # type: ignore[arg-type]
    return StreamCore("s1", "e1", "acme", StreamParams(), cfg)


def finals(out: list[Output]) -> list[Segment]:
    return [o for o in out if isinstance(o, Segment) and o.final]


def limited(out: list[Output]) -> list[ev.Error]:
    return [o for o in out if isinstance(o, ev.Error) and o.code == FINALIZE_LIMITED]


def spam_finalize(c: StreamCore, pcm: bytes, every_ms: int = 30) -> list[Output]:
    """Audio in real time (`now` is the audio clock), a Finalize every `every_ms`."""
    step = RATE * every_ms // 1000 * 2
    out: list[Output] = []
    for i in range(0, len(pcm), step):
        now = (i + step) / 2 / RATE
        out += c.audio(pcm[i : i + step], now)
        out += c.finalize(now)
    return out


@pytest.fixture(scope="module")
def long_one(make_test_speech):  # type: ignore[no-untyped-def]
    return make_test_speech([LONG], gap_s=0.5)


# --- the Finalize limiter (the streaming core alone) -------------------------------


def test_finalize_spam_cuts_at_most_once_a_second_and_loses_no_audio(long_one) -> None:  # type: ignore[no-untyped-def]
    c = core()
    out = spam_finalize(c, long_one.pcm) + c.flush(now=99.0)
    segs = finals(out)
    speech_s = long_one.spans[0][1] - long_one.spans[0][0]
    # ~260 Finalize messages during the speech; a cut at most once per second of audio
    assert 2 <= len(segs) <= speech_s + 1, [(s.start_ms, s.end_ms) for s in segs]
    for a, b in zip(segs, segs[1:], strict=False):
        # never two cuts within a second (an end leaves out silence beyond the pad)
        assert b.end_ms - a.end_ms >= 1000 - VadConfig().endpoint_ms
        assert b.start_ms <= a.end_ms + 30  # the speech goes on in the next: none is lost
    # one Error per run of ignored ones, not one per message
    assert 1 <= len(limited(out)) <= len(segs) + 1
    assert c.finalizes_ignored > 100


def test_finalize_at_the_onset_is_ignored_and_the_utterance_ends_whole(long_one) -> None:  # type: ignore[no-untyped-def]
    c = core()
    onset_ms = int(long_one.spans[0][0] * 1000)
    head = long_one.pcm[: (onset_ms + 150) * RATE // 1000 * 2]  # 150 ms into the speech
    out = c.audio(head, now=1.0)
    out += c.finalize(now=1.0)
    [error] = limited(out)
    assert "300 ms of speech" in error.message
    assert not finals(out)
    assert c.finalize(now=1.01) == []  # told once
    rest = c.audio(long_one.pcm[len(head) :], now=20.0) + c.flush(now=21.0)
    [seg] = finals(rest)  # one utterance: the ignored Finalize did not split it
    assert seg.start_ms <= onset_ms and seg.end_ms >= long_one.spans[0][1] * 1000 - 100


def test_finalize_with_enough_speech_and_time_still_cuts(long_one) -> None:  # type: ignore[no-untyped-def]
    c = core()
    onset_ms = int(long_one.spans[0][0] * 1000)
    first = long_one.pcm[: (onset_ms + 1500) * RATE // 1000 * 2]
    out = c.audio(first, now=2.0) + c.finalize(now=2.0)
    assert cut_numbers(out) == [0] and not limited(out)
    second = long_one.pcm[len(first) : len(first) + 1200 * RATE // 1000 * 2]
    out = c.audio(second, now=3.2) + c.finalize(now=3.2)
    assert cut_numbers(out) == [1] and not limited(out)  # 1.2 s later, 1.2 s of speech


def cut_numbers(out: list[Output]) -> list[int]:
    return [o.segment for o in out if isinstance(o, ev.SpeechEnded) and o.segment is not None]


# --- tenant quotas (admission) ---------------------------------------------------------


def test_tenant_quotas_parse_and_refuse_bad_ones() -> None:
    quotas = parse_tenant_quotas("acme:share=0.8,sessions=200; trial:queued_s=10,sessions=2")
    assert quotas == {
        "acme": TenantQuota(share=0.8, sessions=200),
        "trial": TenantQuota(sessions=2, queued_s=10.0),
    }
    for bad in ("acme", "acme:speed=3", "acme:sessions=many", "acme:share=2"):
        with pytest.raises(ValueError, match="acme"):
            parse_tenant_quotas(bad)
    with pytest.raises(EdgeConfigError, match="TENANT_QUOTAS"):
        create_app(EdgeSettings(auth_enabled=False, tenant_quotas="acme:speed=3"))


async def test_shares_apply_once_another_tenant_is_known(nc) -> None:  # type: ignore[no-untyped-def]
    queued: dict[str, float] = {}
    gate = Admission(
        nc,
        AdmissionConfig(require_workers=False, max_connections=10, tenant_active_s=60),
        lambda: queued,
    )
    gate.workers = 1
    for _ in range(8):  # alone on the edge: no share
        assert gate.check("acme") is None
        gate.opened("acme")
    assert gate.quotas("acme")[0] == 500
    assert gate.check("globex") is None  # another tenant arrives: now acme is over its half
    refusal = gate.check("acme")
    assert refusal is not None and (refusal.status, refusal.reason) == (429, "tenant_quota")
    assert refusal.detail == {"quota": "sessions", "limit": 5, "used": 8}
    # queued audio: half of 30 s per live worker
    queued.update(globex=16.0)
    gate._queued = (-1e9, {})  # the cache is refreshed every refresh_s
    refusal = gate.check("globex")
    assert refusal is not None and refusal.detail["quota"] == "queued_audio_s"
    # the queue is over its high water, of acme's making: globex (under its share) gets in
    queued.update(globex=0.0, acme=40.0)
    gate._queued = (-1e9, {})
    gate.full = True
    assert gate.check("globex") is None
    blocked = gate.check("acme")
    assert blocked is not None and blocked.reason == "tenant_quota"


async def test_a_tenant_with_its_queued_audio_quota_used_is_refused(
    nats_server, nc, meter, http, make_test_speech
) -> None:  # type: ignore[no-untyped-def]
    """No worker runs: what acme says stays queued and counts against its quota."""
    speech = make_test_speech(["please turn on the lights in the kitchen"], gap_s=0.8)
    async with metered_edge(
        nats_server.url,
        meter,
        require_workers=False,
        auth_enabled=True,
        auth_secret=SECRET,
        api_keys=f"acme:{hash_key(KEY_A)},globex:{hash_key(KEY_B)}",
        tenant_quotas="acme:queued_s=2",
        drain_s=0.5,
    ) as edge:
        url = f"{edge.url}/v1/stream?interim_results=false"
        async with http.ws_connect(url, headers=bearer(KEY_A)) as ws:
            for i in range(0, len(speech.pcm), 3200):
                await ws.send_bytes(speech.pcm[i : i + 3200])
            sessions = edge.app[edge_sessions]
            await until(
                lambda: sum(s.queued_audio_s for s in sessions) >= 2, 10, "acme's audio queued"
            )
            await asyncio.sleep(0.3)  # admission's view of it is at most 250 ms old
            async with http.get(url, headers=bearer(KEY_A)) as r:
                body = await r.json()
            assert r.status == 429 and body["quota"] == "queued_audio_s", body
            assert body["used"] >= 2 and body["limit"] == 2
            async with http.ws_connect(url, headers=bearer(KEY_B)) as other:  # globex: in
                assert isinstance(ev.decode_event((await other.receive(timeout=5)).data),
                                  ev.SessionStarted)  # fmt: skip


@pytest.mark.slow
async def test_one_tenant_spamming_finalize_and_sessions_does_not_stop_another(
    nats_server, nc, engine, http, make_test_speech
) -> None:  # type: ignore[no-untyped-def]
    """acme opens every session it can and spams Finalize during speech; globex still
    gets in and gets its final, with the right words."""
    spam = make_test_speech([LONG], gap_s=0.3)
    b_speech = make_test_speech(["please turn on the lights in the kitchen"], gap_s=0.5)
    async with (
        run_worker(nats_server.url, engine),
        metered_edge(
            nats_server.url,
            Meter(),
            auth_enabled=True,
            auth_secret=SECRET,
            api_keys=f"acme:{hash_key(KEY_A)},globex:{hash_key(KEY_B)}",
            max_sessions_per_worker=4,  # one worker: 4 sessions, 2 per tenant
        ) as edge,
    ):
        admission = edge.app[admission_key]
        await until(lambda: admission.workers >= 1, 10, "the edge sees the worker")
        url = f"{edge.url}/v1/stream?interim_results=false"
        a_sockets, refused = [], []
        for _ in range(4):  # acme takes every session it can get
            try:
                a_sockets.append(await http.ws_connect(url, headers=bearer(KEY_A)))
            except aiohttp.WSServerHandshakeError as exc:
                refused.append((exc.status, (exc.headers or {}).get(ev.REASON_HEADER)))
        assert len(a_sockets) == 2 and refused == [(429, "tenant_quota")] * 2
        async with http.get(url, headers=bearer(KEY_A)) as r:  # the reason, in the body
            body = await r.json()
            assert r.status == 429 and r.headers["Retry-After"], body
        assert (body["reason"], body["quota"], body["limit"], body["used"]) == (
            "tenant_quota", "sessions", 2, 2,
        )  # fmt: skip

        async def spam_session(ws: aiohttp.ClientWebSocketResponse) -> list[ev.ServerEvent]:
            events: list[ev.ServerEvent] = []

            async def read() -> None:
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        events.append(ev.decode_event(msg.data))

            reading = asyncio.create_task(read())
            finalize = ev.encode_control(ev.Finalize())
            step = RATE // 10 * 2  # 100 ms
            t0 = time.monotonic()
            for i, offset in enumerate(range(0, len(spam.pcm), step)):
                await ws.send_bytes(spam.pcm[offset : offset + step])
                for _ in range(4):  # 40 Finalize a second
                    await ws.send_str(finalize)
                await asyncio.sleep(max(0.0, t0 + (i + 1) * 0.1 - time.monotonic()))
            await ws.send_str(ev.encode_control(ev.CloseStream()))
            await asyncio.wait_for(reading, timeout=90)
            return events

        spamming = [asyncio.create_task(spam_session(ws)) for ws in a_sockets]
        await asyncio.sleep(1.5)  # well into acme's speech and spam
        run: StreamRun = await stream_audio(
            http, edge.url, b_speech.pcm, RATE, token=KEY_B, interim_results=False
        )
        a_events = await asyncio.gather(*spamming)
        for ws in a_sockets:
            await ws.close()
    assert run.close_code == 1000 and run.finals, run.events
    assert wer(b_speech.text, run.text) <= 0.25, run.text
    speech_s = spam.spans[0][1] - spam.spans[0][0]
    for events in a_events:
        ended = [e for e in events if isinstance(e, ev.SpeechEnded)]
        told = [e for e in events if isinstance(e, ev.Error) and e.code == FINALIZE_LIMITED]
        # ~300 Finalize messages each: a cut at most once a second (without the limit: ~70
        # cuts, nearly all too short to be speech, and the words lost), told once per run
        assert 1 <= len(ended) <= speech_s + 2, len(ended)
        assert 1 <= len(told) <= len(ended) + 1, len(told)
        assert any(isinstance(e, ev.Final) and e.text for e in events)


# --- a bounded outbox -------------------------------------------------------------------


def _client_frame(opcode: int, payload: bytes) -> bytes:
    """One masked client frame (RFC 6455 5.2)."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    else:
        head = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def _server_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    b0, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        n = int.from_bytes(await reader.readexactly(2), "big")
    elif n == 127:
        n = int.from_bytes(await reader.readexactly(8), "big")
    return b0 & 0x0F, await reader.readexactly(n)


async def _raw_upgrade(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket on a socket with a tiny receive buffer, read by nobody until we say."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1024)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET /v1/stream HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        .encode()
    )  # fmt: skip
    await writer.drain()
    status = await reader.readuntil(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 101"), status
    return reader, writer


async def test_a_client_that_does_not_read_is_closed_4009_not_grown(nats_server, nc, meter) -> None:  # type: ignore[no-untyped-def]
    async with metered_edge(
        nats_server.url, meter, require_workers=False, outbox_max_frames=200
    ) as edge:
        reader, writer = await _raw_upgrade(edge.settings.port)
        bad = _client_frame(0x1, b'{"type": "Finalise"}')  # each one answered with an Error

        def slow() -> list[str]:
            return [s.slow for s in edge.app[edge_sessions] if s.slow]

        sent = 0
        while not slow() and sent < 200_000:
            writer.write(bad * 500)
            await writer.drain()
            sent += 500
            await asyncio.sleep(0)
        [why] = await until(slow, 10, "the edge gives up on the reader")
        unread = int(why.removeprefix("slow reader: ").removesuffix(" events unread"))
        assert 200 < unread < 1000, why  # bounded: 200 frames, and one burst read
        # now read: what was sent before the close, then the close frame with its reason
        kinds: list[str] = []
        while True:
            opcode, payload = await asyncio.wait_for(_server_frame(reader), timeout=15)
            if opcode == 0x8:
                break
            kinds.append(msgspec.json.decode(payload)["type"])
        code, reason = int.from_bytes(payload[:2], "big"), payload[2:].decode()
        assert (code, reason) == (4009, why)
        assert kinds[0] == "SessionStarted" and set(kinds[1:]) == {"Error"}
        writer.write(_client_frame(0x8, payload[:2]))  # the closing handshake
        await writer.drain()
        writer.close()
        assert meter.value("escapement.sessions.slow_reader") == 1
        async with aiohttp.ClientSession() as http, http.get(f"{edge.url}/healthz") as r:
            assert r.status == 200  # and the edge goes on serving


async def test_a_client_that_reads_may_send_bursts_of_bad_frames(
    nats_server, nc, meter, http
) -> None:  # type: ignore[no-untyped-def]
    """The bound is on what the socket does not take, not on a burst of answers."""
    async with (
        metered_edge(nats_server.url, meter, require_workers=False, outbox_max_frames=200) as edge,
        http.ws_connect(f"{edge.url}/v1/stream") as ws,
    ):
        errors = 0

        async def read() -> None:
            nonlocal errors
            async for msg in ws:
                if isinstance(ev.decode_event(msg.data), ev.Error):
                    errors += 1
                    if errors == 5000:
                        return

        reading = asyncio.create_task(read())
        for _ in range(10):
            for _ in range(500):  # 500 frames at once: one read of the edge's
                await ws.send_str('{"type": "Finalise"}')
            await asyncio.sleep(0.05)
        await asyncio.wait_for(reading, timeout=30)
    assert errors == 5000
    assert meter.value("escapement.sessions.slow_reader") == 0


# --- supervised background loops --------------------------------------------------------


async def test_a_fault_in_admission_refresh_is_logged_counted_and_survived(
    nats_server, nc, meter, caplog, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.ERROR, logger="services.common.supervise")
    original = Admission.refresh_backlog
    calls = 0

    async def fault_once(
        self: Admission,
    ) -> None:  # MOCK: injects a bug that cannot be had for real
        nonlocal calls
        calls += 1
        if calls == 2:  # the first run of the loop (the first call is at start-up)
            raise RuntimeError("injected fault")
        await original(self)

    monkeypatch.setattr(Admission, "refresh_backlog", fault_once)
    async with metered_edge(nats_server.url, meter, require_workers=False) as edge:
        admission = edge.app[admission_key]
        await until(lambda: calls >= 2, 5, "the fault")
        # the loop is back: it sees a segment queued now
        seg = Segment(
            session_id="filler", edge_id="nowhere", segment=0, start_ms=0, end_ms=500,
            sample_rate=RATE, pcm=bytes(RATE),
        )  # fmt: skip
        await nc.jetstream().publish(
            subjects.segments_subject("nowhere", "filler"), encode_segment(seg)
        )
        await until(lambda: admission.backlog == 1, 10, "admission's view refreshed again")
    [record] = [r for r in caplog.records if "admission-backlog" in r.getMessage()]
    assert record.exc_info is not None and "injected fault" in str(record.exc_info[1])
    assert meter.value("escapement.loop.restarts", loop="admission-backlog") == 1


async def test_a_fault_in_the_result_sweeper_is_survived(
    nats_server, nc, meter, caplog, http, make_test_speech, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """The sweeper (stored results for sessions owed one) fails once, and still
    delivers a final that never came on core NATS."""
    speech = make_test_speech(["set a timer for ten minutes"], gap_s=0.5)
    async with metered_edge(
        nats_server.url, meter, require_workers=False, recheck_after_s=0.5
    ) as edge:
        router = edge.app[router_key]
        original = router.recover
        faults = 0

        async def fault_once(session):  # type: ignore[no-untyped-def]  # MOCK: an injected bug
            nonlocal faults
            if not faults:
                faults += 1
                raise RuntimeError("injected fault")
            await original(session)

        monkeypatch.setattr(router, "recover", fault_once)
        async with http.ws_connect(f"{edge.url}/v1/stream?interim_results=false") as ws:
            for i in range(0, len(speech.pcm), 3200):
                await ws.send_bytes(speech.pcm[i : i + 3200])
            await ws.send_str(ev.encode_control(ev.Finalize()))
            # no worker: take the segment off the queue and answer it where only the
            # store sees it (another edge's subject), as if this edge missed it
            psub = await nc.jetstream().pull_subscribe_bind(
                subjects.CONSUMER_WORKERS, stream=subjects.STREAM_SEGMENTS
            )
            segs: list[Segment] = []
            with contextlib.suppress(TimeoutError):  # every revision queued (a void one too)
                while True:
                    for msg in await psub.fetch(10, timeout=2 if segs else 10):
                        segs.append(decode_segment(msg.data))
                        await msg.ack()
            for seg in segs:
                result = Result(
                    session_id=seg.session_id, segment=seg.segment, start_ms=seg.start_ms,
                    end_ms=seg.end_ms, text="Set a timer for ten minutes.",
                    words=[Word("Set", seg.start_ms, seg.end_ms)], final=True,
                    revision=seg.revision,
                )  # fmt: skip
                await nc.publish(
                    subjects.results_subject("elsewhere", seg.session_id), encode_result(result)
                )
            final = None
            while final is None:
                msg = await ws.receive(timeout=15)
                assert msg.type == aiohttp.WSMsgType.TEXT, msg  # closed idle: no Final came
                event = ev.decode_event(msg.data)
                if isinstance(event, ev.Final):
                    final = event
    assert final.segment == segs[0].segment and final.text == "Set a timer for ten minutes."
    assert faults == 1
    assert meter.value("escapement.loop.restarts", loop="result-sweeper") == 1
    assert any("result-sweeper" in r.getMessage() and r.exc_info for r in caplog.records), (
        "the fault was logged with its traceback"
    )


async def test_supervise_stops_on_cancel_and_backs_off(caplog) -> None:  # type: ignore[no-untyped-def]
    from services.common.supervise import start_supervised

    runs: list[float] = []

    async def always_failing() -> None:
        runs.append(time.monotonic())
        raise ValueError("broken")

    task = start_supervised("broken", always_failing, backoff_s=0.05, max_backoff_s=0.2)
    await until(lambda: len(runs) >= 4, 5, "restarts")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    gaps = [b - a for a, b in zip(runs, runs[1:], strict=False)]
    assert gaps[0] >= 0.04 and gaps[2] >= 0.15  # doubling: 0.05, 0.1, 0.2
    settled = len(runs)
    await asyncio.sleep(0.3)
    assert len(runs) == settled  # stopped for good
