"""`POST /v1/audio/transcriptions` through the official `openai` SDK, end to end:
a real nats-server, the edge, a worker with tiny.en, espeak-ng speech."""

from __future__ import annotations

import re

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI

from loadtest import upload
from loadtest.corpus import Item
from services.common.audio import wav_bytes
from services.edge.app import transcriptions_key
from services.edge.auth import hash_key
from services.edge.transcriptions import TranscriptionConfig
from services.worker.service import Worker
from tests.support import RunningEdge, run_edge, run_worker, wer

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call me back when you get home tonight.",
    "We will meet at the station at nine in the morning.",
    "Turn on the kitchen lights and close the window.",
]
KEY = "sk-test-escapement-key"


def client(edge: RunningEdge, key: str = "unused", retries: int = 0) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{edge.url}/v1", api_key=key, max_retries=retries, timeout=60)


@pytest.fixture(scope="module")
def speech_wav(make_test_speech):  # type: ignore[no-untyped-def]
    speech = make_test_speech(SENTENCES, gap_s=0.8)
    return speech, wav_bytes(speech.pcm, speech.sample_rate)


SRT_CUE = re.compile(
    r"(\d+)\n(\d\d):(\d\d):(\d\d),(\d{3}) --> (\d\d):(\d\d):(\d\d),(\d{3})\n(.+?)\n(?:\n|$)", re.S
)


def _seconds(h: str, m: str, s: str, ms: str) -> float:
    return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000


@pytest.mark.slow
async def test_sdk_gets_text_words_and_subtitles(
    edge: RunningEdge, worker: Worker, speech_wav
) -> None:  # type: ignore[no-untyped-def]
    speech, wav = speech_wav
    reference = " ".join(SENTENCES)
    async with client(edge) as sdk:
        await _text_words_and_subtitles(sdk, speech, wav, reference)


async def _text_words_and_subtitles(sdk: AsyncOpenAI, speech, wav: bytes, reference: str) -> None:  # type: ignore[no-untyped-def]
    plain = await sdk.audio.transcriptions.create(
        model="whisper-1", file=("speech.wav", wav, "audio/wav")
    )
    assert wer(reference, plain.text) <= 0.25, plain.text

    verbose = await sdk.audio.transcriptions.create(
        model="gpt-4o-transcribe",
        file=("speech.wav", wav, "audio/wav"),
        response_format="verbose_json",
        timestamp_granularities=["word", "segment"],
        language="en",
    )
    assert wer(reference, verbose.text) <= 0.25, verbose.text
    assert verbose.duration == pytest.approx(speech.duration_s, abs=0.05)
    assert verbose.language == "english"
    words = verbose.words or []
    assert len(words) >= 0.8 * len(reference.split())
    starts = [w.start for w in words]
    assert starts == sorted(starts), "word times go forward"
    assert all(0 <= w.start <= w.end <= speech.duration_s for w in words)
    # each sentence's words fall inside (or right at the edges of) where it was spoken
    first = next(w for w in words if w.word.strip(".,").lower() == "station")
    spoken = speech.spans[2]
    assert spoken[0] - 0.5 <= first.start <= spoken[1] + 0.5
    segments = verbose.segments or []
    assert len(segments) >= 2 and [s.id for s in segments] == list(range(len(segments)))
    assert all(a.end <= b.start + 0.05 for a, b in zip(segments, segments[1:], strict=False))

    srt = await sdk.audio.transcriptions.create(
        model="whisper-1", file=("speech.wav", wav, "audio/wav"), response_format="srt"
    )
    cues = SRT_CUE.findall(srt)
    assert cues, srt
    assert [int(c[0]) for c in cues] == list(range(1, len(cues) + 1))
    times = [(_seconds(*c[1:5]), _seconds(*c[5:9])) for c in cues]
    assert all(a <= b <= speech.duration_s for a, b in times)
    assert all(t1[1] <= t2[0] + 0.05 for t1, t2 in zip(times, times[1:], strict=False))
    assert wer(reference, " ".join(c[9] for c in cues)) <= 0.25, srt


@pytest.mark.slow
async def test_stream_yields_deltas_then_the_whole_text(
    edge: RunningEdge, worker: Worker, speech_wav
) -> None:  # type: ignore[no-untyped-def]
    _, wav = speech_wav
    events = []
    async with client(edge) as sdk:
        stream = await sdk.audio.transcriptions.create(
            model="whisper-1", file=("speech.wav", wav, "audio/wav"), stream=True
        )
        async for event in stream:
            events.append(event)
    kinds = [e.type for e in events]
    assert kinds[-1] == "transcript.text.done" and kinds.count("transcript.text.done") == 1
    assert kinds[:-1] and set(kinds[:-1]) == {"transcript.text.delta"}, kinds
    joined = "".join(e.delta for e in events[:-1])
    assert joined == events[-1].text
    assert wer(" ".join(SENTENCES), events[-1].text) <= 0.25, events[-1].text


async def _post(
    http: aiohttp.ClientSession, edge: RunningEdge, **fields: object
) -> tuple[int, dict, aiohttp.typedefs.LooseHeaders]:  # type: ignore[name-defined]
    form = aiohttp.FormData(default_to_multipart=True)
    for name, value in fields.items():
        if isinstance(value, bytes):
            form.add_field(name, value, filename="upload.wav", content_type="audio/wav")
        else:
            form.add_field(name, str(value))
    async with http.post(f"{edge.url}/v1/audio/transcriptions", data=form) as r:
        return r.status, await r.json(), r.headers


async def test_bad_input_is_refused_in_openais_error_shape(
    edge: RunningEdge, http: aiohttp.ClientSession, speech_wav
) -> None:  # type: ignore[no-untyped-def]
    _, wav = speech_wav
    async with client(edge) as sdk:
        with pytest.raises(openai.BadRequestError) as caught:
            await sdk.audio.transcriptions.create(
                model="whisper-1", file=("notes.wav", b"this is not audio at all" * 40, "audio/wav")
            )
    assert caught.value.status_code == 400
    error = caught.value.body
    assert error["type"] == "invalid_request_error" and error["param"] == "file"
    assert "not audio" in error["message"] and error["code"] == "invalid_file"

    status, body, _ = await _post(http, edge, file=wav, model="whisper-9")
    assert status == 400 and body["error"]["param"] == "model"
    assert "whisper-9" in body["error"]["message"]
    assert set(body["error"]) == {"message", "type", "param", "code"}

    status, body, _ = await _post(http, edge, model="whisper-1")
    assert status == 400 and body["error"]["param"] == "file"

    status, body, _ = await _post(http, edge, file=wav, model="whisper-1", response_format="xml")
    assert status == 400 and body["error"]["param"] == "response_format"

    edge.app[transcriptions_key].config = TranscriptionConfig(max_file_bytes=64 * 1024)
    status, body, _ = await _post(http, edge, file=wav, model="whisper-1")
    assert status == 413 and body["error"]["code"] == "file_too_large"


async def test_uploads_share_auth_and_admission_with_sessions(nats_server, nc) -> None:  # type: ignore[no-untyped-def]
    async with run_edge(
        nats_server.url, auth_enabled=True, api_keys=f"acme:{hash_key(KEY)}", require_workers=True
    ) as edge:
        async with client(edge, "sk-wrong") as sdk:
            with pytest.raises(openai.AuthenticationError) as caught:
                await sdk.audio.transcriptions.create(
                    model="whisper-1", file=("a.wav", b"RIFF", "audio/wav")
                )
        assert caught.value.body["code"] == "invalid_credentials"
        async with client(edge, KEY) as sdk:
            with pytest.raises(openai.InternalServerError) as refused:  # no worker runs: 503
                await sdk.audio.transcriptions.create(
                    model="whisper-1", file=("a.wav", b"RIFF", "audio/wav")
                )
        assert refused.value.status_code == 503
        assert refused.value.body["code"] == "no_workers"
        assert int(refused.value.response.headers["Retry-After"]) >= 1


@pytest.mark.slow
async def test_upload_benchmark_smoke(edge: RunningEdge, worker: Worker, make_test_speech) -> None:  # type: ignore[no-untyped-def]
    """`python -m loadtest.upload` in small: a live session alone, then with an upload."""
    said = make_test_speech(SENTENCES[:1])
    speech = make_test_speech(SENTENCES[1:3], gap_s=0.8)
    wav = wav_bytes(speech.pcm, speech.sample_rate)
    live = Item(
        "live",
        said.pcm,
        said.sample_rate,
        said.text,
        tuple((a * 1000, b * 1000) for a, b in said.spans),
    )
    file = Item("file", speech.pcm, speech.sample_rate, speech.text)
    base = await upload.run_phase("baseline", edge.url, [live], None)
    loaded = await upload.run_phase("with_upload", edge.url, [live], None, upload=wav)
    result = upload.report([base, loaded], file, "smoke")
    assert result["sessions_not_completed"] == {"baseline": 0, "with_upload": 0}
    assert result["sessions_completed"]["baseline"] == 1
    assert result["baseline"]["count"] >= 1 and result["with_upload"]["count"] >= 1
    assert result["upload"]["status"] == 200, result["upload"]
    assert result["upload"]["wer"] <= 0.25 and result["upload"]["wall_s"] > 0


@pytest.mark.slow
async def test_an_upload_is_decoded_by_the_idle_priority_worker(
    nats_server, nc, engine, speech_wav
) -> None:  # type: ignore[no-untyped-def]
    """`escapement up`'s layout: a file's segments go to the worker that takes interim
    looks (at idle CPU priority), never to the one that takes live finals."""
    speech, wav = speech_wav
    async with (
        run_worker(nats_server.url, engine, role="finals") as finals,
        run_worker(nats_server.url, engine, role="looks") as looks,
        run_edge(nats_server.url) as edge,
        client(edge) as sdk,
    ):
        result = await sdk.audio.transcriptions.create(
            model="whisper-1", file=("speech.wav", wav, "audio/wav")
        )
    assert wer(" ".join(SENTENCES), result.text) <= 0.25, result.text
    assert finals.stats["transcribed"] == 0
    assert looks.stats["transcribed"] == len(speech.spans)
