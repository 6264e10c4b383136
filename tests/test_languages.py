"""Languages and models: detected per session with the multilingual model, refused up
front where the workers' model cannot speak them; each session's segments go to the
workers of the model it asks for.

What a user would notice: German speech with no `language` given comes back as
German words, each `Final` tagged `de`; asking an English-only deployment for
German is refused before the socket opens, saying which language and model. With
workers of two models, a session that names one (`model=`) is transcribed by that
model alone, and a model nobody runs is refused before the socket opens.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from jetstream import subjects
from loadtest.speech import SENTENCES, Speech, make_speech
from schemas import device as ev
from schemas.pipeline import Segment
from services.common.discovery import last_seen
from services.edge.app import nats_key
from services.edge.queue_view import queue_view_key
from services.runtime.natsserver import NatsServer
from services.worker.engines import WhisperEngine
from services.worker.models import resolve_model
from tests.support import RunningEdge, run_edge, run_worker, until, wer

GERMAN = [
    "ich möchte eine tasse kaffee trinken",
    "bitte mach das licht in der küche an",
    # base alone hears this one as Thai; the session's German keeps it German
    "morgen fahren wir nach berlin",
]


@pytest.fixture(scope="module")
def base_engine() -> WhisperEngine:
    return WhisperEngine(resolve_model("base"), cpu_threads=2)


@contextlib.asynccontextmanager
async def _edge_with_workers(nats_url: str, workers: int = 1) -> AsyncIterator[RunningEdge]:
    # each segment waits for the results before it however slow the model: the same
    # left context (earlier utterances' audio and text) whatever the timing
    async with run_edge(nats_url, prompt_wait_s=60) as edge:
        await _discovered(edge, workers)
        yield edge


async def _discovered(edge: RunningEdge, workers: int) -> None:
    await until(
        lambda: len(last_seen(edge.app[nats_key], subjects.WORKER_SERVICE)) >= workers,
        within=10,
        message=f"the edge discovers {workers} worker(s)",
    )


async def _stream(http: aiohttp.ClientSession, url: str, speech: Speech) -> list[ev.ServerEvent]:
    """Send the speech (chunked, as fast as the edge takes it), CloseStream, every event back."""
    events: list[ev.ServerEvent] = []
    async with http.ws_connect(url) as ws:
        step = speech.sample_rate // 10 * 2  # 100 ms
        for i in range(0, len(speech.pcm), step):
            await ws.send_bytes(speech.pcm[i : i + step])
        await ws.send_str(ev.encode_control(ev.CloseStream()))
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                events.append(ev.decode_event(msg.data))
    assert ws.close_code == 1000, ws.close_code
    return events


@pytest.mark.slow
async def test_german_is_detected_and_transcribed_with_the_multilingual_model(
    nats_server: NatsServer, nc, http, speech_dir: Path, base_engine: WhisperEngine
) -> None:  # type: ignore[no-untyped-def]
    speech = make_speech(GERMAN, speech_dir, voice="de")
    async with (
        # a generous engine deadline: base shares 2 cores with the test
        run_worker(
            nats_server.url, base_engine, model="base", interims=False, engine_deadline_s=30
        ),
        _edge_with_workers(nats_server.url) as edge,
    ):
        # no `language` in the query; the workers of base serve sessions that ask for it
        url = f"{edge.url}/v1/stream?sample_rate=16000&pace=fast&interim_results=false&model=base"
        events = await _stream(http, url, speech)
    started = next(e for e in events if isinstance(e, ev.SessionStarted))
    assert started.language == ""  # detected, utterance by utterance
    finals = sorted((e for e in events if isinstance(e, ev.Final)), key=lambda f: f.segment)
    assert len(finals) == len(GERMAN), finals
    assert [f.language for f in finals] == ["de"] * len(GERMAN), finals
    text = " ".join(f.text for f in finals)
    assert wer(speech.text, text) <= 0.35, text


async def test_a_language_the_workers_model_cannot_speak_is_refused_up_front(
    nats_server: NatsServer, nc, http, engine: WhisperEngine
) -> None:  # type: ignore[no-untyped-def]
    async with run_worker(nats_server.url, engine), _edge_with_workers(nats_server.url) as edge:
        async with http.get(f"{edge.url}/v1/stream?language=de") as r:
            body = await r.json()
            assert r.status == 400
            assert r.headers[ev.REASON_HEADER] == "unsupported_language"
        assert body["reason"] == "unsupported_language"
        assert "'de'" in body["message"] and "tiny.en" in body["message"], body
        # no language: English, as the model speaks nothing else
        async with http.ws_connect(f"{edge.url}/v1/stream") as ws:
            started = ev.decode_event((await ws.receive()).data)
            assert isinstance(started, ev.SessionStarted) and started.language == "en"
        # English itself, a regional tag of it, and auto are admitted
        for query in ("language=en", "language=en-GB", "language=auto"):
            async with http.ws_connect(f"{edge.url}/v1/stream?{query}") as ws:
                assert isinstance(ev.decode_event((await ws.receive()).data), ev.SessionStarted)


def test_the_session_language_is_kept_and_a_clear_change_is_followed(
    speech_dir: Path, base_engine: WhisperEngine
) -> None:
    """The worker's own decision, one segment at a time as the edge sends them: after
    two German utterances (their audio as left context, their text committed, German
    as the session's language so far), a German one stays German and an English one
    is heard as English."""
    german = make_speech(GERMAN, speech_dir, voice="de", gap_s=1.0)
    english = make_speech([SENTENCES[6]], speech_dir, gap_s=1.0)
    start3 = german.spans[2][0]
    context = german.pcm[: int(start3 * 16000 - 4800) * 2]  # both earlier utterances

    def segment(pcm: bytes) -> Segment:
        context_ms = len(context) // 32
        return Segment(
            session_id="s",
            edge_id="e",
            segment=2,
            start_ms=context_ms,
            end_ms=context_ms + len(pcm) // 32,
            sample_rate=16000,
            pcm=pcm,
            context_pcm=context,
            context_text="Ich möchte eine Tasse Kaffee trinken. Bitte mach das Licht in der Küche an.",
            language="",
            session_language="de",
        )

    stays = base_engine.transcribe(segment(german.pcm[len(context) :]))
    assert stays.language == "de", stays
    assert wer(GERMAN[2], stays.text) <= 0.4, stays.text
    start = english.spans[0][0]
    changes = base_engine.transcribe(segment(english.pcm[int(start * 16000 - 4800) * 2 :]))
    assert changes.language == "en", changes
    assert wer(SENTENCES[6], changes.text) <= 0.3, changes.text


async def _refused(http: aiohttp.ClientSession, url: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    async with http.get(url) as r:
        return r.status, await r.json()


@pytest.mark.slow
async def test_workers_of_two_models_each_get_only_their_own_sessions(
    nats_server: NatsServer, nc, http, speech_dir: Path, engine, base_engine: WhisperEngine
) -> None:  # type: ignore[no-untyped-def]
    speech = make_speech(SENTENCES[:2], speech_dir, gap_s=1.0)
    query = "sample_rate=16000&pace=fast&interim_results=false"
    async with (
        run_worker(nats_server.url, engine, interims=False) as tiny,
        _edge_with_workers(nats_server.url) as edge,
    ):
        # nobody runs base yet: refused up front, naming it; a name nobody knows: 400
        status, body = await _refused(http, f"{edge.url}/v1/stream?model=base")
        assert (status, body["reason"], body["model"]) == (503, "no_workers", "base"), body
        assert "'base'" in body["message"] and "tiny.en" in body["message"], body
        status, body = await _refused(http, f"{edge.url}/v1/stream?model=large-v9")
        assert (status, body["reason"]) == (400, "unknown_model"), body
        assert "tiny.en" in body["message"], body
        async with run_worker(
            nats_server.url, base_engine, model="base", interims=False, engine_deadline_s=30
        ) as base:
            await _discovered(edge, 2)
            plain, named, by_base = await asyncio.gather(
                _stream(http, f"{edge.url}/v1/stream?{query}", speech),
                _stream(http, f"{edge.url}/v1/stream?{query}&model=tiny.en", speech),
                _stream(http, f"{edge.url}/v1/stream?{query}&model=base", speech),
            )
            # the operator's queue view (metrics, dashboard) has base's lane beside the default
            view = edge.app[queue_view_key]

            def base_lane_done() -> bool:
                lane = view.state.consumer("workers-base")
                return (
                    lane is not None and lane.stream == subjects.STREAM_SEGMENTS and lane.acked == 2
                )

            await until(base_lane_done, 10, "base's consumer, its 2 segments acked, in the view")
    finals = {
        name: [e for e in events if isinstance(e, ev.Final)]
        for name, events in (("plain", plain), ("named", named), ("base", by_base))
    }
    assert all(len(f) == 2 for f in finals.values()), finals
    # the default model's sessions (named or not) on its worker, base's on base's
    assert {f.engine for f in finals["plain"] + finals["named"]} == {engine.name}, finals
    assert {f.engine for f in finals["base"]} == {base_engine.name}, finals
    assert (tiny.stats["transcribed"], base.stats["transcribed"]) == (4, 2)
    for got in finals.values():
        assert wer(speech.text, " ".join(f.text for f in got)) <= 0.35, got
