"""End to end: a device streams speech to a real edge, a real nats-server queues
it, a real worker runs faster-whisper, and the finals come back to the socket."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from nats.aio.client import Client as NATS

from jetstream import subjects
from schemas import device as ev
from services.cli.client import StreamRun, stream_audio
from services.worker.withdrawn import WITHDRAWN
from tests.support import RunningEdge, run_edge, run_worker, until, wer

pytestmark = pytest.mark.slow

SENTENCES_A = [
    "please turn on the lights in the kitchen",
    "what is the weather going to be like tomorrow morning",
    "how far is it from london to paris",
    "add milk and eggs to my shopping list",
]
SENTENCES_B = [
    "the quick brown fox jumps over the lazy dog",
    "remind me to call my mother this evening",
]


def check_words(run: StreamRun, audio_ms: float) -> None:
    """Every word's times lie within the audio and never go backwards."""
    last = 0
    for final in sorted(run.finals, key=lambda f: f.segment):
        assert final.words, f"segment {final.segment} has no words"
        for w in final.words:
            assert 0 <= w.start_ms <= w.end_ms <= audio_ms, w
            assert w.start_ms >= last, f"word {w} starts before the previous word ended ({last})"
            assert final.start_ms <= w.start_ms and w.end_ms <= final.end_ms
            last = w.start_ms


async def test_realtime_speech_is_transcribed(
    worker, edge: RunningEdge, http, make_test_speech
) -> None:  # type: ignore[no-untyped-def]
    speech = make_test_speech(SENTENCES_A)
    run = await stream_audio(http, edge.url, speech.pcm, speech.sample_rate, realtime=True)

    assert run.close_code == 1000
    assert wer(speech.text, run.text) <= 0.25, run.text
    check_words(run, speech.duration_s * 1000)
    # one final per sentence, each placed over its sentence on the session timeline
    assert len(run.finals) == len(SENTENCES_A), [f.text for f in run.finals]
    for final, (start_s, end_s) in zip(
        sorted(run.finals, key=lambda f: f.segment), speech.spans, strict=True
    ):
        assert final.start_ms <= start_s * 1000 + 100 and final.end_ms >= end_s * 1000 - 100
    # the barge-in signal precedes each final, and each final came once
    kinds = [type(r.event).__name__ for r in run.events]
    assert kinds[0] == "SessionStarted"
    assert kinds.count("SpeechStarted") == len(SENTENCES_A)
    assert kinds.index("SpeechStarted") < kinds.index("Final")
    assert len({f.segment for f in run.finals}) == len(run.finals)


async def test_concurrent_sessions_get_only_their_own_finals(
    worker, edge: RunningEdge, http, make_test_speech
) -> None:  # type: ignore[no-untyped-def]
    a, b = make_test_speech(SENTENCES_A[:2]), make_test_speech(SENTENCES_B)
    run_a, run_b = await asyncio.gather(
        stream_audio(http, edge.url, a.pcm, a.sample_rate, realtime=True),
        stream_audio(http, edge.url, b.pcm, b.sample_rate, realtime=True),
    )
    assert run_a.session_id != run_b.session_id
    assert wer(a.text, run_a.text) <= 0.25, run_a.text
    assert wer(b.text, run_b.text) <= 0.25, run_b.text
    words_a, words_b = set(run_a.text.lower().split()), set(run_b.text.lower().split())
    assert not {"kitchen", "weather", "morning"} & words_b, run_b.text
    assert not {"fox", "dog", "mother"} & words_a, run_a.text


async def test_segments_wait_in_the_queue_until_a_worker_starts(
    nc: NATS, nats_server, engine, http, make_test_speech
) -> None:  # type: ignore[no-untyped-def]
    speech = make_test_speech(SENTENCES_B)
    js = nc.jetstream()
    async with run_edge(nats_server.url, require_workers=False) as edge:
        streaming = asyncio.create_task(
            stream_audio(
                http, edge.url, speech.pcm, speech.sample_rate, realtime=False, close_timeout=120
            )
        )

        async def all_queued() -> bool:  # no worker: the work-queue stream holds them
            info = await js.stream_info(subjects.STREAM_SEGMENTS)
            return info.state.messages == len(SENTENCES_B)

        await until(all_queued, 10, "every segment queued")
        await asyncio.sleep(0.5)  # and left there a while: nobody takes them
        assert not streaming.done()  # CloseStream waits for the finals

        async with run_worker(nats_server.url, engine):
            run = await asyncio.wait_for(streaming, timeout=120)
    assert run.close_code == 1000
    assert wer(speech.text, run.text) <= 0.25, run.text
    info = await js.stream_info(subjects.STREAM_SEGMENTS)
    assert info.state.messages == 0, "work queue should be empty after every segment is acked"
    consumer = await js.consumer_info(subjects.STREAM_SEGMENTS, subjects.CONSUMER_WORKERS)
    assert consumer.num_pending == 0 and consumer.num_ack_pending == 0
    stored = await js.stream_info(
        subjects.STREAM_TRANSCRIPTS, subjects_filter=subjects.results_for_session(run.session_id)
    )
    assert stored.state.messages == len(SENTENCES_B), "finals are kept for resume"


async def test_a_pause_inside_a_sentence_leaves_one_segment_queued(
    nc: NATS, nats_server, engine, http, make_test_speech
) -> None:  # type: ignore[no-untyped-def]
    """A pause longer than the trailing pad but shorter than the endpoint queues an
    early-final candidate; when the speech goes on, that candidate is taken back out
    of the queue, so no worker decodes it, and the device gets one Final for all of it."""
    speech = make_test_speech(["please turn on", "the lights in the kitchen"], gap_s=0.35)
    js = nc.jetstream()
    async with run_edge(nats_server.url, require_workers=False) as edge:
        streaming = asyncio.create_task(
            stream_audio(
                http, edge.url, speech.pcm, speech.sample_rate, realtime=False, close_timeout=120
            )
        )

        async def queued() -> int:
            return (await js.stream_info(subjects.STREAM_SEGMENTS)).state.messages

        async def one_left() -> bool:  # the candidate was queued, then withdrawn
            info = await js.stream_info(subjects.STREAM_SEGMENTS)
            return info.state.last_seq >= 2 and info.state.messages == 1

        await until(one_left, 15, "the void candidate withdrawn, the real segment queued")
        await asyncio.sleep(0.5)
        assert await queued() == 1
        async with run_worker(nats_server.url, engine) as worker:
            run = await asyncio.wait_for(streaming, timeout=120)
    assert [f.segment for f in run.finals] == [0]
    assert wer(speech.text, run.text) <= 0.25, run.text
    assert worker.stats["transcribed"] == 1, "the void candidate was never decoded"


async def test_a_candidate_withdrawn_while_a_worker_decodes_it_is_told_to_the_workers(
    nc: NATS, nats_server, engine, http, make_test_speech
) -> None:  # type: ignore[no-untyped-def]
    """A worker is free, so it takes the early final at the pause at once; the speech
    goes on, the edge withdraws it and tells the workers (core NATS), and the device
    gets one Final for all of it. Whether the notice comes before the encoder is done
    is up to the CPU: the decode stopping there is tested in tests/test_decoding.py."""
    speech = make_test_speech(["please turn on", "the lights in the kitchen"], gap_s=0.35)
    heard = WITHDRAWN.heard
    async with (
        run_worker(nats_server.url, engine),
        run_edge(nats_server.url) as edge,
    ):
        run = await stream_audio(
            http, edge.url, speech.pcm, speech.sample_rate, realtime=True, close_timeout=120
        )
        await until(lambda: WITHDRAWN.heard > heard, 5, "the workers told of the void candidate")
    assert [f.segment for f in run.finals] == [0]
    assert wer(speech.text, run.text) <= 0.25, run.text


@pytest.mark.parametrize("rate", [8000, 48000])
async def test_other_sample_rates(
    worker, edge: RunningEdge, http, make_test_speech, rate: int
) -> None:  # type: ignore[no-untyped-def]
    speech = make_test_speech(SENTENCES_A[:1], sample_rate=rate)
    run = await stream_audio(http, edge.url, speech.pcm, rate, realtime=False)
    assert run.close_code == 1000
    assert wer(speech.text, run.text) <= 0.25, run.text
    check_words(run, speech.duration_s * 1000)


async def test_finalize_cuts_the_utterance_now(
    worker, edge: RunningEdge, http, make_test_speech
) -> None:  # type: ignore[no-untyped-def]
    """A device that knows the user stopped (push-to-talk) need not wait for the endpoint."""
    speech = make_test_speech(SENTENCES_A[:1])
    _, end_s = speech.spans[0]
    pcm = speech.pcm[: int(end_s * speech.sample_rate) * 2]  # no trailing silence at all
    async with http.ws_connect(f"{edge.url}/v1/stream?sample_rate=16000") as ws:
        await ws.send_bytes(pcm)
        await ws.send_str(ev.encode_control(ev.Finalize()))
        final = None
        async for msg in ws:
            event = ev.decode_event(msg.data)
            if isinstance(event, ev.Final):
                final = event
                break
        assert final is not None
        assert wer(SENTENCES_A[0], final.text) <= 0.25, final.text
        await ws.send_str(ev.encode_control(ev.CloseStream()))
        async for _ in ws:
            pass
        assert ws.close_code == 1000


async def test_edge_readiness(edge: RunningEdge, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{edge.url}/healthz") as r:
        assert r.status == 200
    async with http.get(f"{edge.url}/readyz") as r:
        assert r.status == 200
        assert (await r.json())["status"] == "ready"
