"""`GET /v1/listen` with Deepgram's official SDK: an app switches by changing its base URL."""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

import aiohttp
import pytest
from deepgram import AsyncDeepgramClient, DeepgramClientEnvironment
from deepgram.core.api_error import ApiError
from deepgram.listen.v1.types import (
    ListenV1Metadata,
    ListenV1Results,
    ListenV1SpeechStarted,
    ListenV1UtteranceEnd,
)
from multidict import MultiDict

from schemas import deepgram as dg
from schemas import device as ev
from schemas.pipeline import Word
from services.edge.auth import hash_key
from services.edge.deepgram import MIN_ENDPOINT_MS, DeepgramDialect, negotiate, parse_listen
from services.edge.params import BadRequest, StreamParams
from services.edge.settings import EdgeSettings
from services.edge.stream import StreamConfig, StreamCore
from tests.support import run_edge, run_worker, until, wer

# deepgram-sdk 7 still reaches for websockets' legacy names (not ours to fix)
pytestmark = pytest.mark.filterwarnings(
    r"ignore:websockets\.[\w.]+ is deprecated:DeprecationWarning"
)

SECRET = "listen-test-secret-0123456789abcdef"
KEY = "deepgram-style-key-0123456789"
FIRST = "please turn on the lights in the kitchen"
SECOND = "the quick brown fox jumps over the lazy dog"
CHUNK_S = 0.1


def environment(url: str) -> DeepgramClientEnvironment:
    """The SDK pointed at a local edge: its one switch is the base URL."""
    ws = url.replace("http://", "ws://")
    return DeepgramClientEnvironment(base=url, production=ws, agent=ws, agent_rest=url)


def auth_edge(nats_url: str, **overrides: Any):  # type: ignore[no-untyped-def]
    return run_edge(
        nats_url,
        auth_enabled=True,
        auth_secret=SECRET,
        api_keys=f"acme:{hash_key(KEY)}",
        **overrides,
    )


async def stream_realtime(conn, pcm: bytes, rate: int) -> None:  # type: ignore[no-untyped-def]
    """Send PCM in 100 ms frames at the pace it was spoken, as a microphone would."""
    step = int(rate * CHUNK_S) * 2
    started = time.monotonic()
    for i, at in enumerate(range(0, len(pcm), step)):
        await conn.send_media(pcm[at : at + step])
        await asyncio.sleep(max(0.0, started + (i + 1) * CHUNK_S - time.monotonic()))


@pytest.mark.slow
async def test_sdk_streams_speech_and_gets_deepgram_results(
    nats_server, nc, engine, make_test_speech
) -> None:  # type: ignore[no-untyped-def]
    speech = make_test_speech([FIRST, SECOND], gap_s=2.0)
    rate = speech.sample_rate
    # Everything up to just after the second sentence: it is cut by Finalize, not by a pause.
    spoken = speech.pcm[: int((speech.spans[1][1] + 0.1) * rate) * 2]
    tail = bytes(int(1.2 * rate) * 2)  # silence after the Finalize, for its UtteranceEnd
    messages: list[Any] = []
    async with run_worker(nats_server.url, engine), auth_edge(nats_server.url) as edge:
        client = AsyncDeepgramClient(api_key=KEY, environment=environment(edge.url))
        async with client.listen.v1.connect(
            model="nova-3",
            encoding="linear16",
            sample_rate=rate,
            channels=1,
            language="en-US",
            interim_results=True,
            utterance_end_ms=1000,
            vad_events=True,
            smart_format=True,
            keyterm=["kitchen", "lazy dog"],
        ) as conn:

            async def receive() -> None:
                async for message in conn:
                    messages.append(message)

            receiver = asyncio.create_task(receive())
            await stream_realtime(conn, spoken, rate)
            await conn.send_finalize()
            await until(
                lambda: any(isinstance(m, ListenV1Results) and m.from_finalize for m in messages),
                within=15,
                message="a Results with from_finalize",
            )
            await stream_realtime(conn, tail, rate)
            await conn.send_close_stream()
            await asyncio.wait_for(receiver, timeout=30)

    results = [m for m in messages if isinstance(m, ListenV1Results)]
    finals = [r for r in results if r.is_final and r.channel.alternatives[0].transcript]
    interims = [r for r in results if not r.is_final]
    transcript = " ".join(r.channel.alternatives[0].transcript for r in finals)
    assert wer(speech.text, transcript) <= 0.25, transcript
    assert len(finals) == 2, [r.channel.alternatives[0].transcript for r in finals]
    first, second = finals
    assert wer(FIRST, first.channel.alternatives[0].transcript) <= 0.25
    # the first ended at a pause; the second was cut by the client's Finalize
    assert (first.speech_final, first.from_finalize) == (True, False)
    assert (second.speech_final, second.from_finalize) == (False, True)
    # interim results came while the sentences were spoken, each before its final
    assert interims and any(i.channel.alternatives[0].transcript for i in interims)
    assert all(messages.index(i) < messages.index(second) for i in interims)
    for final, (start_s, end_s) in zip(finals, speech.spans, strict=True):
        alt = final.channel.alternatives[0]
        assert alt.transcript[0].isupper()  # smart_format: Whisper's own casing and punctuation
        assert 0 < alt.confidence <= 1
        words = alt.words
        assert [w.word for w in words] == [w.word.lower() for w in words]
        assert all(w.punctuated_word for w in words)
        # seconds on the stream timeline, inside the speech of that sentence
        assert start_s - 0.6 <= words[0].start < words[-1].end <= end_s + 0.6
        assert final.start <= words[0].start and words[-1].end <= final.start + final.duration
        assert final.channel_index == [0, 1]
        assert final.metadata.request_id and final.metadata.model_info.name
    started = [m for m in messages if isinstance(m, ListenV1SpeechStarted)]
    assert len(started) == 2
    for event, (start_s, _) in zip(started, speech.spans, strict=True):
        assert abs(event.timestamp - start_s) <= 0.5
    ends = [m for m in messages if isinstance(m, ListenV1UtteranceEnd)]
    assert ends, "no UtteranceEnd"
    assert ends[-1].last_word_end == second.channel.alternatives[0].words[-1].end
    for end in ends:  # each after the final whose last word it names
        named = [f for f in finals if f.channel.alternatives[0].words[-1].end == end.last_word_end]
        assert named and messages.index(named[0]) < messages.index(end)
    metadata = messages[-1]
    assert isinstance(metadata, ListenV1Metadata), messages[-3:]
    sent = spoken + tail
    assert metadata.request_id == first.metadata.request_id
    assert metadata.sha256 == hashlib.sha256(sent).hexdigest()
    assert abs(metadata.duration - len(sent) / 2 / rate) <= 0.05
    assert metadata.channels == 1


async def test_refusals_name_what_cannot_be_done(nats_server, nc, http) -> None:  # type: ignore[no-untyped-def]
    async with auth_edge(nats_server.url, require_workers=False) as edge:
        url = f"{edge.url}/v1/listen"
        token = {"Authorization": f"Token {KEY}"}

        async def refused(query: str, headers: dict[str, str] = token) -> tuple[int, str, str]:
            async with http.get(f"{url}?{query}", headers=headers) as r:
                body = await r.json()
                return r.status, body["reason"], body["message"]

        status, reason, message = await refused("model=nova-3&diarize=true")
        assert (status, reason) == (400, "unsupported_option") and "diarize" in message
        status, reason, message = await refused("model=nova-2-medical")
        assert (status, reason) == (400, "unsupported_model")
        assert "nova-2-medical" in message and "medical model" in message
        status, reason, message = await refused("model=nova-3&channels=2")
        assert (status, reason) == (400, "unsupported_option") and "channels" in message
        status, reason, message = await refused("model=nova-3&encoding=opus")
        assert (status, reason) == (400, "unsupported_encoding") and "opus" in message
        status, reason, message = await refused("model=nova-3")  # container audio, for Deepgram
        assert (status, reason) == (400, "encoding_required") and "linear16" in message
        status, reason, message = await refused("model=nova-3&redact=pci")
        assert (status, reason) == (400, "unsupported_option") and "redact" in message
        status, reason, message = await refused("model=nova-3&sentiment=true")
        assert (status, reason) == (400, "unknown_parameter") and "sentiment" in message
        status, reason, _ = await refused(
            "model=nova-3&encoding=linear16", {"Authorization": "Token wrong"}
        )
        assert (status, reason) == (401, "invalid_credentials")

        # what the SDK itself reports for a refused option
        client = AsyncDeepgramClient(api_key=KEY, environment=environment(edge.url))
        with pytest.raises(ApiError) as caught:
            async with client.listen.v1.connect(model="nova-3", diarize=True):
                pass
        assert caught.value.status_code == 400


def test_model_names_apps_send() -> None:
    for name in ("nova-3", "nova-2-meeting", "nova-phonecall", "enhanced", "base", "phonecall"):
        _, options = parse_listen(MultiDict(encoding="linear16", model=name))
        assert options.model == "", name  # the deployment's model
    assert parse_listen(MultiDict(encoding="linear16", model="tiny.en"))[1].model == "tiny.en"
    for name in ("nova-3-medical", "nova-medical", "medical"):
        with pytest.raises(BadRequest, match="medical model"):
            parse_listen(MultiDict(encoding="linear16", model=name))
    with pytest.raises(BadRequest, match="not known"):
        parse_listen(MultiDict(encoding="linear16", model="whisper-large"))
    with pytest.raises(BadRequest, match="English only"):
        parse_listen(MultiDict(encoding="linear16", model="tiny.en", language="de"))


def _final_as_rendered(query: dict[str, str]) -> dg.Results:
    """One native Final, as a `/v1/listen` session with this query would send it."""
    _, options = parse_listen(MultiDict({"encoding": "linear16", **query}))
    dialect = DeepgramDialect(options)
    core = StreamCore("sess", "edge", "acme", StreamParams(), StreamConfig())
    started = ev.SessionStarted(session_id="sess", resume_token="r", sample_rate=16000, language="")
    assert dialect.render(started, core) == []  # Deepgram sends nothing at the start
    dialect.render(ev.SpeechEnded(t_ms=1500, segment=0), core)  # ended at a pause
    words = [Word(" Guten", 500, 900, 0.9), Word(" Tag", 900, 1200, 0.7), Word(".", 1200, 1200)]
    final = ev.Final(
        segment=0,
        text=" Guten Tag.",
        start_ms=300,
        end_ms=1500,
        words=words,
        engine="faster-whisper:base",
        language="de",
    )
    [frame] = dialect.render(final, core)
    message = dg.decode(frame)
    assert isinstance(message, dg.Results)
    return message


def test_final_rendered_as_deepgram_results() -> None:
    plain = _final_as_rendered({"model": "nova-2", "language": "multi"})
    alt = plain.channel.alternatives[0]
    assert alt.transcript == "guten tag"  # punctuate is off by default, as on Deepgram
    assert [(w.word, w.punctuated_word, w.start, w.end) for w in alt.words] == [
        ("guten", "Guten", 0.5, 0.9),
        ("tag", "Tag.", 0.9, 1.2),
    ]
    assert alt.confidence == 0.8
    assert (plain.start, plain.duration, plain.is_final, plain.speech_final) == (
        0.3,
        1.2,
        True,
        True,
    )
    assert alt.languages == ["de"] and {w.language for w in alt.words} == {"de"}
    assert plain.metadata.request_id == "sess"
    assert plain.metadata.model_info.name == "faster-whisper:base"
    detected = _final_as_rendered({"detect_language": "true", "punctuate": "true"})
    assert detected.channel.detected_language == "de"
    assert detected.channel.alternatives[0].languages is None
    assert detected.channel.alternatives[0].transcript == "Guten Tag."
    no_endpoint = _final_as_rendered({"language": "de", "endpointing": "false"})
    assert not no_endpoint.speech_final


def test_endpointing_sets_the_pause_that_ends_an_utterance() -> None:
    settings = EdgeSettings()
    assert (
        negotiate(MultiDict(encoding="linear16", endpointing="800"), settings)[1].endpoint_ms == 800
    )
    # shorter than the VAD can tell a pause inside a word from the end: raised
    assert (
        negotiate(MultiDict(encoding="linear16", endpointing="10"), settings)[1].endpoint_ms
        == MIN_ENDPOINT_MS
    )
    assert (
        negotiate(MultiDict(encoding="linear16"), settings)[1].endpoint_ms == settings.endpoint_ms
    )


async def test_control_messages_and_closes(nats_server, nc, http) -> None:  # type: ignore[no-untyped-def]
    token = {"Authorization": f"Token {KEY}"}
    async with auth_edge(nats_server.url, require_workers=False, idle_timeout_s=1.0) as edge:
        url = f"{edge.url}/v1/listen?model=nova-3&encoding=linear16&sample_rate=16000"
        async with http.ws_connect(url, headers=token) as ws:
            await ws.send_bytes(bytes(3200))
            await ws.send_str('{"type": "KeepAlive"}')
            await ws.send_str('{"type": "Finalize", "channel": 0}')  # nothing to cut: answered now
            answer = dg.decode(await ws.receive_str(timeout=5))
            assert isinstance(answer, dg.Results) and answer.from_finalize and answer.is_final
            assert answer.channel.alternatives[0].transcript == ""
            await ws.send_str('{"type": "Configure", "keyterms": ["Escapement"]}')
            failure = dg.decode(await ws.receive_str(timeout=5))
            assert isinstance(failure, dg.ConfigureFailure)
            assert failure.code == "CONFIGURE_KEYTERMS_NOT_SUPPORTED"
            await ws.send_str('{"type": "Shout"}')
            error = dg.decode(await ws.receive_str(timeout=5))
            assert isinstance(error, dg.Error) and error.variant == "SchemaError"
            assert error.message == '{"type": "Shout"}'
            # then nothing for longer than the idle timeout: Deepgram's NET-0001
            closing = await ws.receive(timeout=5)
            assert closing.type == aiohttp.WSMsgType.CLOSE
            assert ws.close_code == 1011 and closing.extra.startswith("NET-0001")
        async with http.ws_connect(url, headers=token) as ws:
            await ws.send_bytes(b"\x00\x01\x02")  # not s16le samples
            closing = await ws.receive(timeout=5)
            assert ws.close_code == 1008 and closing.extra.startswith("DATA-0000")
