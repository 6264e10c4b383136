"""Bad input gets a clear answer, never a crash, never another session's trouble."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from schemas import device as ev
from services.cli.client import stream_audio
from tests.support import RunningEdge, active_sessions, run_edge, until, wer


async def _refusal(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, str]]:
    async with http.get(url, headers={"Connection": "Upgrade", "Upgrade": "websocket"}) as r:
        return r.status, await r.json()


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("sample_rate=44100", "unsupported_sample_rate"),
        ("sample_rate=abc", "bad_sample_rate"),
        ("encoding=mulaw", "unsupported_encoding"),
        ("language=en.>", "bad_language"),
        ("language=en%0A", "bad_language"),  # a trailing newline is not a language code
        ("framing=protobuf", "bad_framing"),
        ("interim_results=maybe", "bad_interim_results"),
    ],
)
async def test_bad_query_is_refused_before_the_upgrade(
    edge: RunningEdge, http: aiohttp.ClientSession, query: str, reason: str
) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await http.ws_connect(f"{edge.url}/v1/stream?{query}")
    assert caught.value.status == 400
    assert caught.value.headers is not None
    assert caught.value.headers[ev.REASON_HEADER] == reason
    status, body = await _refusal(http, f"{edge.url}/v1/stream?{query}")
    assert status == 400 and body["reason"] == reason and body["message"]


async def _closed_with(ws: aiohttp.ClientWebSocketResponse) -> tuple[int | None, str]:
    while True:
        msg = await ws.receive(timeout=30)
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
            return ws.close_code, msg.extra or ""


async def _expect_close(
    edge: RunningEdge, http, query: str, frame: bytes
) -> tuple[int | None, str]:  # type: ignore[no-untyped-def]
    async with http.ws_connect(f"{edge.url}/v1/stream?{query}") as ws:
        await ws.send_bytes(frame)
        return await _closed_with(ws)


async def test_bad_frames_close_the_socket_with_a_reason_and_spare_other_sessions(
    worker, edge: RunningEdge, http: aiohttp.ClientSession, make_test_speech
) -> None:  # type: ignore[no-untyped-def]
    speech = make_test_speech(["please turn on the lights in the kitchen"])
    good = asyncio.create_task(
        stream_audio(http, edge.url, speech.pcm, speech.sample_rate, realtime=True)
    )

    async def streaming() -> bool:
        return await active_sessions(http, edge) >= 1

    await until(streaming, 10, "the good session admitted")

    code, reason = await _expect_close(edge, http, "sample_rate=16000", b"\x01\x02\x03")
    assert code == 1007 and "odd-length" in reason

    code, reason = await _expect_close(edge, http, "framing=msgpack", b"\xc1garbage")
    assert code == 1007 and "msgpack" in reason

    chunk = ev.encode_chunk(ev.AudioChunk(seq=0, pcm=b"\x00\x00\x00"))
    code, reason = await _expect_close(edge, http, "framing=msgpack", chunk)
    assert code == 1007

    too_big = bytes(edge.settings.max_frame_bytes + 2)
    code, _ = await _expect_close(edge, http, "sample_rate=16000", too_big)
    assert code == 1009

    run = await good
    assert run.close_code == 1000
    assert wer(speech.text, run.text) <= 0.25, run.text
    assert not run.of_type(ev.Error)

    async with http.get(f"{edge.url}/healthz") as r:
        assert r.status == 200


async def test_unknown_control_message_gets_an_error_and_the_session_goes_on(
    edge: RunningEdge, http: aiohttp.ClientSession
) -> None:
    async with http.ws_connect(f"{edge.url}/v1/stream?sample_rate=16000") as ws:
        started = ev.decode_event((await ws.receive()).data)
        assert isinstance(started, ev.SessionStarted)
        for bad in ('{"type":"Bogus"}', "not json", '{"no_type":1}'):
            await ws.send_str(bad)
            error = ev.decode_event((await ws.receive(timeout=5)).data)
            assert isinstance(error, ev.Error) and error.code == "bad_control"
        await ws.send_str(ev.encode_control(ev.KeepAlive()))
        await ws.send_bytes(bytes(3200))  # silence is fine
        await ws.send_str(ev.encode_control(ev.CloseStream()))
        code, reason = await _closed_with(ws)
    assert code == 1000, reason


async def test_idle_socket_is_closed(nats_server, nc, http: aiohttp.ClientSession) -> None:  # type: ignore[no-untyped-def]
    async with run_edge(nats_server.url, idle_timeout_s=0.5, require_workers=False) as edge:
        async with http.ws_connect(f"{edge.url}/v1/stream") as ws:
            code, reason = await _closed_with(ws)
    assert code == 4008 and "idle" in reason


def test_every_server_event_decodes_on_the_client() -> None:
    """What the edge sends for a click (SpeechEnded without a segment) must decode."""
    for event in (
        ev.SpeechEnded(t_ms=120, segment=None),
        ev.SpeechEnded(t_ms=3000, segment=4),
        ev.Error(code="x", message="y"),
        ev.Overloaded(message="full", segment=2),
    ):
        assert ev.decode_event(ev.encode_event(event)) == event


async def test_a_huge_jump_in_chunk_numbers_is_refused_not_filled(
    edge: RunningEdge, http: aiohttp.ClientSession
) -> None:
    """Filling a claimed gap of hours with silence would eat the edge's memory."""
    async with http.ws_connect(f"{edge.url}/v1/stream?framing=msgpack&pace=fast") as ws:
        await ws.send_bytes(ev.encode_chunk(ev.AudioChunk(seq=0, pcm=bytes(3200))))
        for seq in range(10**7, 10**7 + 12):
            await ws.send_bytes(ev.encode_chunk(ev.AudioChunk(seq=seq, pcm=bytes(3200))))
        code, reason = await _closed_with(ws)
    assert code == 1007 and "gap" in reason
