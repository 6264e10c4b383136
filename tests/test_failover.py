"""Engine failover and hot swap, on the real thing: nats-server, worker processes
(`python -m services.worker`) running tiny.en, espeak speech published straight to
JetStream as the edge would, and a remote OpenAI-compatible engine.

The remote engine is a real aiohttp server in this file that answers
`POST /v1/audio/transcriptions` in OpenAI's `verbose_json` shape, decoding with the
real tiny.en model in this process. Faults come from the product's own drill
wrapper (`ESCAPEMENT_FAULTS`); nothing is mocked. The in-process chain test gives
the one shared model two engine names (`Named`), so its chain has two elements
without loading a second model.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import sys
import time
import wave
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import msgspec
import pytest
from aiohttp import web
from nats.aio.client import Client as NATS

from jetstream import subjects
from loadtest.speech import Speech
from observability.metrics import Metrics
from schemas import device as ev
from schemas.pipeline import Result, Segment, decode_result, encode_segment
from services.cli.client import stream_audio
from services.common.discovery import ping_services
from services.worker.chain import ChainError, EngineSpec, build_chain, parse_chain, parse_faults
from services.worker.engines import PoisonSegment, Transcription, WhisperEngine
from services.worker.settings import WorkerSettings
from tests.support import RunningEdge, until, wer

pytestmark = pytest.mark.slow

SENTENCES = [
    "turn on the kitchen lights",
    "set a timer for ten minutes",
    "what is the weather like today",
]
KEY = "drill-key"
PRIMARY = EngineSpec("tiny.en").name  # faster-whisper:tiny.en
ACK_WAIT_S = 10.0  # jetstream/consumers/ASR_SEGMENTS.workers.json
# Finals only, no interim looks. The long poll (a fetch returns as soon as a segment
# waits, so it costs no latency) keeps the worker off a nats-py quirk: a fetch whose
# deadline passes between its two pull requests (an event loop busy for longer than the
# poll) raises a plain TimeoutError (nats/js/client.py `_fetch_n`), not nats'.
WORKER_ENV = {"ESCAPEMENT_INTERIMS": "false", "ESCAPEMENT_INTERIM_POLL_S": "2"}


@dataclass
class Remote:
    url: str
    name: str  # what results name as their engine
    prompts: list[str] = field(default_factory=list)  # the `prompt` of each request


@pytest.fixture
async def remote(engine: WhisperEngine) -> AsyncIterator[Remote]:
    """An OpenAI-compatible transcription server on a free port, backed by tiny.en."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="remote-asr")
    prompts: list[str] = []

    async def transcriptions(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {KEY}":
            return web.json_response({"error": {"message": "bad API key"}}, status=401)
        form = await request.post()
        upload = form.get("file")
        if not isinstance(upload, web.FileField) or form.get("response_format") != "verbose_json":
            return web.json_response({"error": {"message": "file + verbose_json"}}, status=400)
        with wave.open(io.BytesIO(upload.file.read()), "rb") as w:
            pcm, rate = w.readframes(w.getnframes()), w.getframerate()
        prompts.append(str(form.get("prompt", "")))
        segment = Segment(
            session_id="remote", edge_id="remote", segment=0, start_ms=0,
            end_ms=len(pcm) * 500 // rate, sample_rate=rate, pcm=pcm,
            language=str(form.get("language", "en")),
        )  # fmt: skip
        loop = asyncio.get_running_loop()
        t = await loop.run_in_executor(pool, engine.transcribe, segment)
        words = [
            {"word": w.word, "start": w.start_ms / 1000, "end": w.end_ms / 1000} for w in t.words
        ]
        return web.json_response(
            {"task": "transcribe", "language": "english", "duration": segment.end_ms / 1000,
             "text": t.text, "words": words, "segments": []}
        )  # fmt: skip

    app = web.Application()
    app.router.add_post("/v1/audio/transcriptions", transcriptions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    url = f"http://127.0.0.1:{port}/v1"
    try:
        yield Remote(url, EngineSpec(f"openai:{url}").name, prompts)
    finally:
        await runner.cleanup()
        pool.shutdown(wait=True)


@pytest.fixture(scope="module")
def clips(make_test_speech) -> list[Speech]:  # type: ignore[no-untyped-def]
    return [make_test_speech([s], gap_s=0.3) for s in SENTENCES]


class Session:
    """One session's segments, published one after another as the edge does (each
    once the previous result is in, with the previous utterance as context)."""

    def __init__(self, nc: NATS, session_id: str, clips: list[Speech]) -> None:
        self.nc = nc
        self.id = session_id
        self.clips = clips
        self.results: list[tuple[Result, float, float]] = []  # (result, published at, latency)
        self._position_ms = 0
        self._previous: tuple[Speech, str] | None = None
        self._sub = None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(subjects.results_subject("edge-1", self.id))

    def segment(self) -> Segment:
        n = len(self.results)
        clip = self.clips[n % len(self.clips)]
        duration = int(clip.duration_s * 1000)
        context_pcm, context_text = (
            (self._previous[0].pcm, self._previous[1]) if self._previous else (b"", "")
        )
        segment = Segment(
            session_id=self.id, edge_id="edge-1", segment=n, start_ms=self._position_ms,
            end_ms=self._position_ms + duration, sample_rate=clip.sample_rate, pcm=clip.pcm,
            context_pcm=context_pcm, context_text=context_text,
            voiced=[(self._position_ms, self._position_ms + duration)],
        )  # fmt: skip
        self._position_ms += duration
        return segment

    async def next(self) -> Result:
        """Publish the next segment; its result, which must come well within ack_wait."""
        assert self._sub is not None
        segment = self.segment()
        msg_id = subjects.segment_msg_id(self.id, segment.segment)
        published = time.monotonic()
        await self.nc.jetstream().publish(
            subjects.segments_subject("edge-1", self.id),
            encode_segment(segment),
            headers={subjects.Header.MSG_ID: msg_id},
        )
        answer = decode_result((await self._sub.next_msg(timeout=ACK_WAIT_S - 1)).data)
        assert isinstance(answer, Result), answer  # never an ErrorResult
        assert (answer.segment, answer.final) == (segment.segment, True)
        self.results.append((answer, published, time.monotonic() - published))
        clip = self.clips[segment.segment % len(self.clips)]
        self._previous = (clip, answer.text)
        return answer

    def engines(self) -> list[str]:
        return [r.engine for r, _, _ in self.results]

    def word_error_rate(self) -> float:
        scores = [
            wer(self.clips[r.segment % len(self.clips)].texts[0], r.text)
            for r, _, _ in self.results
        ]
        return sum(scores) / len(scores)


def cli(*args: str, nats_url: str) -> tuple[int, str, str]:
    import subprocess

    env = {**os.environ, "NATS_URL": nats_url}
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "workers", *args],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return done.returncode, done.stdout, done.stderr


async def acli(*args: str, nats_url: str) -> tuple[int, str, str]:
    """`cli` without blocking the event loop (sessions keep streaming meanwhile)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "workers", *args,
        env={**os.environ, "NATS_URL": nats_url},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    return process.returncode or 0, out.decode(), err.decode()


async def chain_of(nc: NATS) -> list[dict[str, object]]:
    """The one worker's engines, as its micro endpoint reports them."""
    [worker] = await ping_services(nc, subjects.WORKER_SERVICE)
    msg = await nc.request(subjects.worker_engine(str(worker["id"])), b"{}", timeout=10)
    return json.loads(msg.data)["engines"]  # type: ignore[no-any-return]


async def redelivered(nc: NATS) -> int:
    """Deliveries past the first, plus any still unacked 10 s on: a worker acks after it
    publishes, so the last ack may trail the result the test has just seen."""
    js = nc.jetstream()
    deadline = time.monotonic() + 10
    while True:
        info = await js.consumer_info(subjects.STREAM_SEGMENTS, subjects.CONSUMER_WORKERS)
        if not info.num_ack_pending or time.monotonic() > deadline:
            return info.num_redelivered + info.num_ack_pending
        await asyncio.sleep(0.1)


# --- settings --------------------------------------------------------------------------


def test_chain_and_fault_settings_are_parsed_or_refused_clearly() -> None:
    assert [s.name for s in parse_chain("base, tiny.en,openai:http://asr:8000/v1/")] == [
        "faster-whisper:base",
        "faster-whisper:tiny.en",
        "openai:asr:8000/v1",
    ]
    assert [s.text for s in parse_chain('["tiny.en", "/models/small"]')] == [
        "tiny.en",
        "/models/small",
    ]
    plans = parse_faults("base:hang=0.5,error=0.1,seed=7;tiny.en:hang-after=3")
    assert (plans[PRIMARY].hang, plans[PRIMARY].after) == (1.0, 3)
    assert (plans["faster-whisper:base"].error, plans["faster-whisper:base"].seed) == (0.1, 7)
    for bad, says in [
        ("", "empty"),
        ("tiny.en,tiny.en", "twice"),
        ("openai:ftp://x", r"http\(s\) URL"),
        ('["tiny.en", 3]', "JSON list of strings"),
    ]:
        with pytest.raises(ChainError, match=says):
            parse_chain(bad)
    for bad, says in [
        ("base:boom=1", "unknown 'boom=1'"),
        ("base:hang=0.8,error=0.5", "fractions"),
        ("hang=1", "ENGINE:key=value"),
        ("base:hang=lots", "not a number"),
    ]:
        with pytest.raises(ChainError, match=says):
            parse_faults(bad)


# --- a failing primary, in this process ------------------------------------------------


class Named:
    """The shared tiny.en model under another engine name (two chain elements, one model)."""

    def __init__(self, engine: WhisperEngine, name: str) -> None:
        self.engine, self.name = engine, name

    def transcribe(self, segment: Segment) -> Transcription:
        return self.engine.transcribe(segment)


async def test_failing_primary_passes_the_segment_on_and_is_probed_back(
    engine: WhisperEngine, clips: list[Speech]
) -> None:
    """The primary fails its calls 0 and 1 (call 1 is the first probe): the segment goes
    to the second engine in the same call, the breaker opens, a probe reopens it, the
    next closes it. A segment neither engine can decode (German for English-only
    models) is poison because both said so, and opens no breaker."""
    settings = WorkerSettings(
        faults="primary:error=1,until=2", breaker_cooldown_s=0.1, engine_deadline_s=30
    )
    chain, _ = await build_chain(
        [EngineSpec("primary"), EngineSpec("fallback")],
        lambda spec: Named(engine, spec.name),
        settings,
        Metrics(),
    )
    clip = clips[0]
    segment = Segment(
        session_id="s", edge_id="e", segment=0, start_ms=0, end_ms=int(clip.duration_s * 1000),
        sample_rate=clip.sample_rate, pcm=clip.pcm,
    )  # fmt: skip
    try:
        transcription, by = await chain.transcribe(segment)
        assert by == "faster-whisper:fallback" and wer(clip.text, transcription.text) <= 0.25
        primary = chain.view()[0]
        assert (primary["breaker"], primary["opens"]) == ("open", 1), primary
        assert "fault drill: injected failure" in str(primary["last_error"])
        await until(lambda: chain.view()[0]["breaker"] == "closed", within=30)
        assert chain.view()[0]["opens"] == 2  # the probe that failed
        assert (await chain.transcribe(segment))[1] == "faster-whisper:primary"
        with pytest.raises(PoisonSegment, match="English only"):
            await chain.transcribe(msgspec.structs.replace(segment, language="de"))
        assert [(e["breaker"], e["opens"]) for e in chain.view()] == [("closed", 2), ("closed", 0)]
    finally:
        await chain.close()


# --- 1. a primary that hangs mid-stream -------------------------------------------------


async def test_hung_primary_fails_over_at_once_and_recovers(
    nc: NATS, nats_server, spawn_worker, remote: Remote, clips: list[Speech], http
) -> None:  # type: ignore[no-untyped-def]
    """tiny.en hangs on its calls 2 and 3 (call 3 is the first half-open probe) and
    works again from call 4. Segment 2 goes to the remote engine as soon as tiny.en
    passes its deadline, far inside ack_wait; the segments after it go straight to the
    remote while the breaker is open; once a probe succeeds tiny.en answers again.
    No segment is lost, redelivered or answered with an error."""
    deadline_s, factor = 2.0, 1.0  # the deadline: max(2 s, audio seconds)
    worker = spawn_worker(
        ESCAPEMENT_ENGINES=f"tiny.en,openai:{remote.url}",
        ESCAPEMENT_REMOTE_API_KEY=KEY,
        ESCAPEMENT_FAULTS="tiny.en:hang=1,after=2,until=4",
        ESCAPEMENT_ENGINE_DEADLINE_S=str(deadline_s),
        ESCAPEMENT_ENGINE_DEADLINE_FACTOR=str(factor),
        ESCAPEMENT_BREAKER_COOLDOWN_S="0.5",
        ESCAPEMENT_METRICS_PORT="0",
        **WORKER_ENV,
    )
    await worker.ready()
    [metrics_url] = re.findall(r"metrics on (http://\S+/metrics)", worker.log())
    session = Session(nc, "failover", clips)
    await session.start()
    for _ in range(30):
        await session.next()
        engines = session.engines()
        if remote.name in engines and engines[-2:] == [PRIMARY, PRIMARY]:
            break
    engines = session.engines()
    why = "\n".join(line for line in worker.log().splitlines() if "services.worker" in line)
    assert remote.name in engines, why
    switched = engines.index(remote.name)
    back = len(engines) - 2
    assert switched == 2, (engines, why)  # the first call that hung
    assert engines == [PRIMARY] * 2 + [remote.name] * (back - 2) + [PRIMARY] * 2, (engines, why)

    print("engines:", engines, "latency s:", [round(w, 2) for _, _, w in session.results])
    hung, _, waited = session.results[2]
    limit = max(deadline_s, factor * (hung.end_ms - hung.start_ms) / 1000) + 3.0
    assert waited < limit, f"segment 2 answered {waited:.1f} s after it was queued"
    # the fallback got the same segment, context included (as its prompt)
    assert remote.prompts[0] == session.results[1][0].text != ""
    assert session.word_error_rate() <= 0.25, [r.text for r, _, _ in session.results]
    assert await redelivered(nc) == 0  # nothing waited for ack_wait, nothing handed back

    code, out, err = await acli("ls", "--json", nats_url=nats_server.url)
    assert code == 0, err
    [answer] = json.loads(out)
    primary, fallback = answer["engines"]
    assert (primary["engine"], primary["breaker"], fallback["breaker"]) == (
        PRIMARY,
        "closed",
        "closed",
    )
    # opened by segment 2, again by the probe that hung (and by any probe that was too
    # slow on this busy machine); the two calls that hung still hold their threads
    assert primary["opens"] >= 2 and primary["stuck"] >= 2, primary
    assert "took over" in primary["last_error"]
    log = worker.log()
    assert "breaker open" in log and "breaker closed" in log
    async with http.get(metrics_url) as r:
        scraped = await r.text()
    on_primary = f'engine="{PRIMARY}"'
    assert re.search(rf"escapement_engine_breaker_open\{{{on_primary}\}} 0", scraped), scraped
    opens = re.search(
        rf'escapement_engine_breaker_opens_total\{{{on_primary},reason="deadline"\}} (\d+)', scraped
    )
    assert opens and int(opens.group(1)) == primary["opens"], scraped
    stuck = re.search(rf"escapement_engine_stuck\{{{on_primary}\}} (\d+)", scraped)
    assert stuck and int(stuck.group(1)) == primary["stuck"], scraped


# --- 2. hot swap under load -------------------------------------------------------------


async def test_hot_swap_under_load_fails_no_segment(
    nc: NATS,
    nats_server,
    spawn_worker,
    remote: Remote,
    clips: list[Speech],
    edge: RunningEdge,
    http,
) -> None:  # type: ignore[no-untyped-def]
    """Three sessions stream while the worker's chain goes from tiny.en to the remote
    engine (with tiny.en kept as its fallback, not reloaded). Every segment gets a
    final; jobs running at the swap finish on tiny.en, and every segment queued after
    the swap answered is decoded by the remote. A chain naming an unknown model is
    refused and changes nothing. Back on tiny.en, a device's Final names it."""
    worker = spawn_worker(
        ESCAPEMENT_REMOTE_API_KEY=KEY,
        ESCAPEMENT_CONCURRENCY="2",
        ESCAPEMENT_ENGINE_DEADLINE_S="10",  # this test is about the swap, not deadlines
        **WORKER_ENV,
    )
    await worker.ready()
    sessions = [Session(nc, f"swap-{i}", clips) for i in range(3)]
    for s in sessions:
        await s.start()
    swapped_at: list[float] = []

    async def stream(session: Session) -> None:
        for _ in range(5):
            await session.next()

    async def swap() -> tuple[int, str, str]:
        await until(lambda: sum(len(s.results) for s in sessions) >= 3, within=60)
        done = await acli("set-engine", f"openai:{remote.url},tiny.en", nats_url=nats_server.url)
        swapped_at.append(time.monotonic())
        return done

    *_, (code, out, err) = await asyncio.gather(*(stream(s) for s in sessions), swap())
    assert code == 0, err
    assert f"{remote.name} -> {PRIMARY}  (was {PRIMARY})" in out, out
    for s in sessions:
        engines = s.engines()
        # tiny.en until the swap, the remote after: never back and forth
        assert engines == sorted(engines, key=lambda e: e != PRIMARY), engines
        for result, published, _ in s.results:
            if published > swapped_at[0]:
                assert result.engine == remote.name, (result.segment, engines)
        assert s.word_error_rate() <= 0.25, [r.text for r, _, _ in s.results]
    everything = [e for s in sessions for e in s.engines()]
    assert everything.count(PRIMARY) >= 3 and everything.count(remote.name) >= 3, everything
    assert await redelivered(nc) == 0

    code, out, err = await acli("set-engine", "tiny.en,large-v9", nats_url=nats_server.url)
    assert code == 1 and "unknown_model" in out and "'large-v9'" in err, (out, err)
    code, out, err = await acli(
        "set-engine", "tiny.en", "--worker", "nosuch", nats_url=nats_server.url
    )
    assert code == 1 and "no worker 'nosuch'" in err, err
    assert [e["engine"] for e in await chain_of(nc)] == [remote.name, PRIMARY]

    code, out, err = await acli("set-engine", "tiny.en", nats_url=nats_server.url)
    assert code == 0, err
    speech = clips[1]
    run = await stream_audio(
        http, edge.url, speech.pcm, speech.sample_rate, realtime=False, interim_results=False
    )
    assert run.finals and all(isinstance(f, ev.Final) and f.engine == PRIMARY for f in run.finals)
    assert "engines closed after their last jobs: " + remote.name in worker.log()
