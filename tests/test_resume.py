"""Sessions outlive sockets: resume after a cut, NATS restarts, edge shutdown."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from jetstream import subjects
from schemas import device as ev
from schemas.device import REASON_HEADER
from schemas.pipeline import Segment, decode_record
from services.cli.client import stream_audio
from services.edge.auth import mint_token
from services.edge.publisher import PublishFailure, SegmentPublisher
from services.edge.resume import RESUME_HEADER
from tests.support import active_sessions, first_segment_queued, run_edge, run_worker, until, wer

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
        run_edge(
            nats_server.url, auth_enabled=True, auth_secret=SECRET, fast_pace_tenants="*"
        ) as edge,
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


async def test_a_disconnect_mid_utterance_still_gets_that_utterance_transcribed(
    nats_server, nc, engine, make_test_speech
) -> None:  # type: ignore[no-untyped-def]
    """The network goes away in the middle of a sentence: what was heard of it is
    flushed as a segment, its Final stored, and the resumed socket gets it."""
    speech = make_test_speech(SENTENCES[:2])
    rate = speech.sample_rate
    (_, end0), (start1, end1) = speech.spans[:2]
    cut = start1 + (end1 - start1) * 0.6  # mid-sentence, no pause after it
    async with run_worker(nats_server.url, engine), run_edge(nats_server.url) as edge:
        url = f"{edge.url}/v1/stream?pace=fast"
        first = aiohttp.ClientSession()
        ws = await first.ws_connect(url)
        started = await next_event(ws, ev.SessionStarted)
        assert isinstance(started, ev.SessionStarted)
        await ws.send_bytes(speech.pcm[: int((end0 + 0.9) * rate) * 2])
        await next_event(ws, ev.Final, segment=0)
        await ws.send_bytes(speech.pcm[int((end0 + 0.9) * rate) * 2 : int(cut * rate) * 2])
        await next_event(ws, ev.SpeechStarted)
        await first.close()  # no close handshake, no CloseStream, mid-utterance

        resume = f"resume={started.resume_token}&last_segment=0"
        async with aiohttp.ClientSession() as http, http.ws_connect(f"{url}&{resume}") as ws2:
            final1 = await asyncio.wait_for(next_event(ws2, ev.Final), 60)
    assert isinstance(final1, ev.Final) and final1.segment == 1
    said = final1.text.lower().replace(",", "").split()
    assert said[:3] == ["what", "is", "the"], final1.text  # the part heard before the cut
    assert "list" not in said, final1.text  # nothing from later audio


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


def pieces(speech) -> list[bytes]:  # type: ignore[no-untyped-def]
    """Each sentence with the silence after it (enough for its utterance to end)."""
    rate, out = speech.sample_rate, []
    for i, (_, end) in enumerate(speech.spans):
        start = 0 if i == 0 else speech.spans[i - 1][1]
        out.append(speech.pcm[int(start * rate) * 2 : int((end + 0.9) * rate) * 2])
    return out


async def refused_with(http: aiohttp.ClientSession, url: str, **kwargs: object) -> tuple[int, str]:
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await http.ws_connect(url, **kwargs)  # type: ignore[arg-type]
    headers = caught.value.headers or {}
    return caught.value.status, headers.get(REASON_HEADER, "")


async def test_a_used_resume_token_cannot_take_over_a_live_session(
    nats_server, nc, engine, make_test_speech
) -> None:  # type: ignore[no-untyped-def]
    speech = make_test_speech([SENTENCES[0]])
    acme = mint_token(SECRET.encode(), "acme", 600)
    async with (
        run_worker(nats_server.url, engine),
        run_edge(
            nats_server.url, auth_enabled=True, auth_secret=SECRET, fast_pace_tenants="*"
        ) as edge,
    ):
        url = f"{edge.url}/v1/stream?pace=fast&token={acme}"
        first = aiohttp.ClientSession()
        ws = await first.ws_connect(url)
        started = await next_event(ws, ev.SessionStarted)
        await first.close()  # the network goes away
        async with aiohttp.ClientSession() as http:
            # the device resumes (header), and gets a new token: the old one is spent
            live = await http.ws_connect(
                f"{url}&last_segment=-1", headers={RESUME_HEADER: started.resume_token}
            )
            again = await next_event(live, ev.SessionStarted)
            assert again.session_id == started.session_id
            assert again.resume_token != started.resume_token
            # whoever saw the old token (in a log, a URL) cannot take the live session over
            stolen = started.resume_token
            assert await refused_with(http, f"{url}&resume={stolen}") == (401, "resume_token_used")
            assert await refused_with(http, url, headers={RESUME_HEADER: stolen}) == (
                401,
                "resume_token_used",
            )
            # the live socket was not touched: it still transcribes
            await live.send_bytes(pieces(speech)[0])
            final = await next_event(live, ev.Final, segment=0)
            assert wer(speech.text, final.text) <= 0.25, final.text
            assert not live.closed
            await live.send_str(ev.encode_control(ev.CloseStream()))
            _ = [m async for m in live]
            assert live.close_code == 1000


async def test_double_resume_keeps_next_segment_and_finals_true(
    nats_server, nc, engine, http, make_test_speech
) -> None:  # type: ignore[no-untyped-def]
    """Edge A keeps a half-open socket while the device resumes on edge B and goes on; A's
    late save must not move the session back, or the device's next resume reuses numbers
    JetStream has seen (its new speech dropped as a duplicate, an old final shown for it)."""
    sentences = [*SENTENCES, "set a timer for ten minutes please"]
    speech = make_test_speech(sentences)
    audio = pieces(speech)
    acme = mint_token(SECRET.encode(), "acme", 600)
    kv = await nc.jetstream().key_value(subjects.KV_SESSIONS)
    seen: list[int] = []

    async def next_segment(session_id: str) -> int:
        seen.append(decode_record((await kv.get(session_id)).value or b"").next_segment)
        return seen[-1]

    auth = {"auth_enabled": True, "auth_secret": SECRET, "fast_pace_tenants": "*"}
    async with (
        run_worker(nats_server.url, engine),
        run_edge(nats_server.url, **auth) as edge_a,
        run_edge(nats_server.url, **auth) as edge_b,
    ):
        query = f"/v1/stream?pace=fast&token={acme}"
        old = await http.ws_connect(edge_a.url + query)  # stays open: half-open to the device
        started = await next_event(old, ev.SessionStarted)
        sid = started.session_id
        await old.send_bytes(audio[0])
        await next_event(old, ev.Final, segment=0)

        on_b = aiohttp.ClientSession()
        ws_b = await on_b.ws_connect(
            f"{edge_b.url}{query}&last_segment=0", headers={RESUME_HEADER: started.resume_token}
        )
        resumed = await next_event(ws_b, ev.SessionStarted)
        for n in (1, 2):
            await ws_b.send_bytes(audio[n])
            final = await next_event(ws_b, ev.Final, segment=n)
            assert wer(sentences[n], final.text) <= 0.3, final.text
        await until(lambda: next_segment(sid), 10, "B saved segment 2", every=0.1)
        assert await next_segment(sid) == 3

        await old.close()  # A's socket finally goes: A saves where it thinks the session is
        await until(lambda: _none_active(http, edge_a), 20, "A closed its socket")
        assert await next_segment(sid) == 3, "a stale save moved the session back"

        await on_b.close()  # and the device loses B too
        await until(lambda: _none_active(http, edge_b), 20, "B closed its socket")
        async with http.ws_connect(
            f"{edge_a.url}{query}&last_segment=2", headers={RESUME_HEADER: resumed.resume_token}
        ) as ws:
            await next_event(ws, ev.SessionStarted)
            await ws.send_bytes(audio[3])
            final = await next_event(ws, ev.Final)
            assert final.segment == 3 and wer(sentences[3], final.text) <= 0.3, final
            await ws.send_str(ev.encode_control(ev.CloseStream()))
            rest = [ev.decode_event(m.data) async for m in ws]
            assert not [e for e in rest if isinstance(e, ev.Error)], rest
    assert seen == sorted(seen), f"next_segment went back: {seen}"


async def _none_active(http: aiohttp.ClientSession, edge) -> bool:  # type: ignore[no-untyped-def]
    return await active_sessions(http, edge) == 0


async def test_a_segment_number_another_socket_queued_is_reported_not_dropped(nc) -> None:  # type: ignore[no-untyped-def]
    """Two sockets of one session queue the same segment number: JetStream keeps the first
    (Nats-Msg-Id dedup); the second publisher says so instead of counting it as queued."""
    failures: list[PublishFailure] = []
    published: list[int] = []

    async def on_published(segment: Segment) -> None:
        published.append(segment.segment)

    def publisher() -> SegmentPublisher:
        return SegmentPublisher(
            nc.jetstream(),
            outage_buffer_s=5,
            publish_timeout_s=2,
            buffer_bytes=1 << 20,
            on_failure=failures.append,
            on_published=on_published,
        )

    pcm = b"\x01\x00" * 16000
    first, second = publisher(), publisher()
    for pub, text in ((first, b"old"), (second, b"new")):
        pub.enqueue(
            Segment(
                session_id="sess-dup",
                edge_id="edge-1",
                segment=4,
                start_ms=0,
                end_ms=1000,
                sample_rate=16000,
                pcm=pcm + text,
            )  # fmt: skip
        )
        pub.close()
        await asyncio.wait_for(pub.run(), timeout=10)
    assert published == [4]  # only the first counts as queued
    [failure] = failures
    assert failure.code == "duplicate_segment" and failure.segment.segment == 4
    assert second.duplicates == 1 and first.duplicates == 0
