"""Sessions outlive sockets: resume after a cut, NATS restarts, edge shutdown."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from schemas import device as ev
from services.cli.client import stream_audio
from services.edge.auth import mint_token
from tests.support import first_segment_queued, run_edge, run_worker, until, wer

pytestmark = pytest.mark.slow

SECRET = "resume-secret-0123456789abcdef"
SENTENCES = [
    "please turn on the lights in the kitchen",
    "what is the weather going to be like tomorrow morning",
    "add milk and eggs to my shopping list",
]


async def next_event(
    ws: aiohttp.ClientWebSocketResponse, kind: type, **match: object
) -> ev.ServerEvent:
    while True:
        msg = await ws.receive(timeout=60)
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        event = ev.decode_event(msg.data)
        if isinstance(event, kind) and all(getattr(event, k) == v for k, v in match.items()):
            return event


async def test_resumed_session_gets_exactly_the_finals_it_missed(
    nats_server, nc, engine, make_test_speech
) -> None:  # type: ignore[no-untyped-def]
    speech = make_test_speech(SENTENCES)
    rate = speech.sample_rate

    def piece(i: int) -> bytes:  # sentence i with the silence after it
        start = 0 if i == 0 else speech.spans[i - 1][1]
        end = speech.spans[i][1] + 0.9
        return speech.pcm[int(start * rate) * 2 : int(end * rate) * 2]

    acme = mint_token(SECRET.encode(), "acme", 600)
    other = mint_token(SECRET.encode(), "other", 600)
    async with (
        run_worker(nats_server.url, engine),
        run_edge(nats_server.url, auth_enabled=True, auth_secret=SECRET) as edge,
    ):
        url = f"{edge.url}/v1/stream?pace=fast&token={acme}"
        # first socket: sentence 0 (its final arrives), sentence 1 (cut before its final)
        first = aiohttp.ClientSession()
        ws = await first.ws_connect(url)
        started = await next_event(ws, ev.SessionStarted)
        assert isinstance(started, ev.SessionStarted)
        await ws.send_bytes(piece(0))
        final0 = await next_event(ws, ev.Final, segment=0)
        await ws.send_bytes(piece(1))
        ended1 = await next_event(ws, ev.SpeechEnded, segment=1)
        await first.close()  # the network goes away: no close handshake

        async with aiohttp.ClientSession() as http:
            resume = f"resume={started.resume_token}&last_segment=0"
            # another tenant cannot use this resume token
            with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
                await http.ws_connect(f"{edge.url}/v1/stream?token={other}&{resume}")
            assert caught.value.status == 401

            async with http.ws_connect(f"{url}&{resume}") as ws2:
                again = await next_event(ws2, ev.SessionStarted)
                assert again.session_id == started.session_id
                final1 = await next_event(ws2, ev.Final)
                assert final1.segment == 1  # the missed one, first, once
                await ws2.send_bytes(piece(2))
                started2 = await next_event(ws2, ev.SpeechStarted)
                assert started2.t_ms >= ended1.t_ms  # the timeline goes on
                final2 = await next_event(ws2, ev.Final)
                assert final2.segment == 2 and final2.start_ms >= ended1.t_ms
                await ws2.send_str(ev.encode_control(ev.CloseStream()))
                rest = [ev.decode_event(m.data) async for m in ws2]
                assert not [e for e in rest if isinstance(e, ev.Final)], rest
                assert ws2.close_code == 1000

            text = " ".join(f.text for f in (final0, final1, final2))
            assert wer(speech.text, text) <= 0.25, text

            # a session closed with CloseStream cannot be resumed
            with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
                await http.ws_connect(f"{url}&{resume}")
            assert caught.value.status == 410


async def test_nats_restart_mid_sessions_loses_nothing(
    nats_server, nc, engine, http, make_test_speech
) -> None:  # type: ignore[no-untyped-def]
    speeches = [make_test_speech([s]) for s in SENTENCES] + [
        make_test_speech(SENTENCES[:2], gap_s=0.8),
        make_test_speech(SENTENCES[1:], gap_s=0.8),
    ]
    # a short publish timeout, so the edge's own retry (not only the client's buffer) is exercised
    async with (
        run_worker(nats_server.url, engine),
        run_edge(nats_server.url, publish_timeout_s=1.0) as edge,
    ):
        runs = [
            asyncio.create_task(stream_audio(http, edge.url, s.pcm, s.sample_rate, realtime=True))
            for s in speeches
        ]
        await until(lambda: first_segment_queued(nc), 30, "the devices talking")
        await asyncio.to_thread(nats_server.stop)
        down = time.monotonic()
        await asyncio.sleep(3.0)  # an outage while devices keep talking and utterances end
        await asyncio.to_thread(nats_server.start)
        up = time.monotonic()
        results = await asyncio.gather(*runs)
        async with http.get(f"{edge.url}/v1/stats") as r:
            stats = await r.json()
    assert stats["publish_retries"] > 0
    cut_in_outage = [r for run in results for r in run.of_type(ev.SpeechEnded) if down <= r.t <= up]
    assert cut_in_outage, "no utterance ended during the outage: the test proves nothing"
    for speech, run in zip(speeches, results, strict=True):
        assert run.close_code == 1000, run.close_reason
        assert not run.of_type(ev.Error), [r.event for r in run.of_type(ev.Error)]
        ended = {
            r.event.segment for r in run.of_type(ev.SpeechEnded) if r.event.segment is not None
        }
        assert {f.segment for f in run.finals} == ended
        assert wer(speech.text, run.text) <= 0.3, run.text


async def test_edge_shutdown_delivers_owed_finals_then_going_away(
    nats_server, nc, engine, make_test_speech
) -> None:  # type: ignore[no-untyped-def]
    speech = make_test_speech(SENTENCES[:2])
    async with run_worker(nats_server.url, engine):
        edge_cm = run_edge(nats_server.url)
        edge = await edge_cm.__aenter__()
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(f"{edge.url}/v1/stream?pace=fast")
            await ws.send_bytes(speech.pcm)
            await next_event(ws, ev.SpeechEnded, segment=1)
            stopping = asyncio.create_task(edge_cm.__aexit__(None, None, None))
            finals = []
            async for msg in ws:
                event = ev.decode_event(msg.data)
                if isinstance(event, ev.Final):
                    finals.append(event.segment)
            await stopping
            assert sorted(finals) == [0, 1]
            assert ws.close_code == 1001
