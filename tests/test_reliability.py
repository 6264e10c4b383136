"""Zero lost segments: dead letters, redelivery after a worker dies, graceful
stop, and a chaos run. Everything is real: nats-server, the edge, worker
processes (`python -m services.worker`) that are SIGKILLed and SIGTERMed, the
model, espeak speech. The one stand-in is `AlwaysFailing`, an engine that
raises every time: an engine that keeps failing cannot be produced for real
on demand.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator

import psutil
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from jetstream import subjects
from jetstream.setup import consumer_definitions
from schemas import device as ev
from schemas.pipeline import Result, Segment, decode_result, encode_result, encode_segment
from services.cli.client import StreamRun, stream_audio
from services.cli.dlq import read_all
from services.edge.app import edge_id_key
from services.runtime.procs import free_port
from services.runtime.up import WorkerProcess
from services.worker.deadletter import DeadLetters, Queued
from services.worker.engines import RetryableEngineError, Transcription
from tests.support import Device, RunningEdge, run_edge, run_worker, until, wer

pytestmark = pytest.mark.slow

SENTENCES = [
    "please turn on the lights in the kitchen",
    "what is the weather going to be like tomorrow morning",
    "how far is it from london to paris",
    "add milk and eggs to my shopping list",
    "the quick brown fox jumps over the lazy dog",
    "remind me to call my mother this evening",
    "set a timer for ten minutes",
    "play some music by the beatles",
]
# The production consumer definition (jetstream/consumers/ASR_SEGMENTS.workers.json):
# ack_wait 10 s, max_deliver 5. Only one test below changes it, and says why.
_WORKERS = next(
    c.config
    for c in consumer_definitions()
    if c.config["durable_name"] == subjects.CONSUMER_WORKERS
)
ACK_WAIT_S = _WORKERS["ack_wait"] / 1e9
MAX_DELIVER = _WORKERS["max_deliver"]


class AlwaysFailing:
    """An engine whose every call fails with a retryable error (see the module doc)."""

    name = "always-failing"

    def __init__(self) -> None:
        self.calls = 0

    def transcribe(self, segment: Segment) -> Transcription:
        self.calls += 1
        raise RetryableEngineError(f"engine down (call {self.calls})")


async def queue_state(js: JetStreamContext) -> tuple[int, int, int, int]:
    """(messages queued, delivered not answered, waiting undelivered, deliveries so far)."""
    stream = await js.stream_info(subjects.STREAM_SEGMENTS)
    consumer = await js.consumer_info(subjects.STREAM_SEGMENTS, subjects.CONSUMER_WORKERS)
    return (
        stream.state.messages,
        consumer.num_ack_pending,
        consumer.num_pending,
        consumer.delivered.consumer_seq,
    )


async def in_the_model(js: JetStreamContext, worker: WorkerProcess, cpu_s: float = 0.2) -> None:
    """Once the one segment is delivered, for the first time, and `worker` has spent
    `cpu_s` of CPU on it: it is transcribing (a worker waiting for work uses next to none)."""

    async def in_flight() -> bool:
        _, ack_pending, _, deliveries = await queue_state(js)
        return ack_pending == 1 and deliveries == 1

    await until(in_flight, within=30, every=0.01, message="first delivery")
    process = psutil.Process(worker.pid)

    def used() -> float:
        times = process.cpu_times()
        return times.user + times.system

    start = used()
    await until(lambda: used() - start >= cpu_s, within=30, message="the worker in the model")


async def assert_queue_empty(js: JetStreamContext) -> None:
    """Soon empty: a worker acks just after it publishes the result the device saw."""
    await until(lambda: _queue_empty(js), within=5, message="work queue empty")


def segment_of(speech, session_id: str, edge_id: str, number: int, language: str = "en") -> Segment:  # type: ignore[no-untyped-def]
    return Segment(
        session_id=session_id,
        edge_id=edge_id,
        segment=number,
        start_ms=0,
        end_ms=int(speech.duration_s * 1000),
        sample_rate=speech.sample_rate,
        pcm=speech.pcm,
        language=language,
    )


def exactly_once(run: StreamRun) -> tuple[set[int], Counter[int]]:
    """Segments the edge announced (SpeechEnded with a number) and the Finals per segment."""
    ended = [r.event for r in run.of_type(ev.SpeechEnded)]
    announced = {
        e.segment for e in ended if isinstance(e, ev.SpeechEnded) and e.segment is not None
    }
    return announced, Counter(f.segment for f in run.finals)


# --- (a) dead letters -----------------------------------------------------------


async def test_poison_segments_are_dead_lettered_at_once(
    edge: RunningEdge, nc: NATS, nats_server, engine, http, make_test_speech
) -> None:  # type: ignore[no-untyped-def]
    """Garbage on a real session's subject, and a segment the model cannot do
    (German for the English-only tiny.en: `PoisonSegment`): each is termed on its
    first delivery and kept on ASR_DEAD with its reason. The device hears of the
    segment it queued; garbage it never queued is not passed off as its own.

    The German session opens before any worker runs: once the edge knows its
    workers speak only English it refuses `language=de` up front (test_languages.py),
    so this is the case of a worker whose model changed under admitted sessions."""
    js = nc.jetstream()
    edge_id = edge.app[edge_id_key]
    device = await Device.open(http, edge, "&language=de")
    async with run_worker(nats_server.url, engine) as worker:
        await _poison_scenario(js, edge, edge_id, device, worker, http, make_test_speech)


async def _poison_scenario(js, edge, edge_id, device, worker, http, make_test_speech) -> None:  # type: ignore[no-untyped-def]
    bystander = await Device.open(http, edge)
    subject = subjects.segments_subject(edge_id, bystander.session_id)
    await js.publish(
        subject,
        b"\xc1 not msgpack",
        headers={subjects.Header.MSG_ID: subjects.segment_msg_id(bystander.session_id, 41)},
    )

    speech = make_test_speech(SENTENCES[:1])
    for i in range(0, len(speech.pcm), 3200):
        await device.ws.send_bytes(speech.pcm[i : i + 3200])
    await device.ws.send_str(ev.encode_control(ev.Finalize()))
    error = await device.error()
    assert (error.code, error.segment) == ("poison_segment", 0), error
    await device.close()
    await bystander.close()
    assert not [e for e in bystander.events if isinstance(e, ev.Error)]

    dead = {d.letter.reason: d.letter for d in await read_all(js)}
    assert set(dead) == {"bad_segment", "poison_segment"}
    for reason, session in (
        ("bad_segment", bystander.session_id),
        ("poison_segment", device.session_id),
    ):
        letter = dead[reason]
        assert (letter.attempts, letter.subject, letter.session) == (
            1,
            subjects.segments_subject(edge_id, session),
            session,
        )
    await assert_queue_empty(js)
    assert worker.stats["retried"] == 0


async def test_failing_engine_is_retried_then_dead_lettered(
    edge: RunningEdge, nc: NATS, nats_server, http, make_test_speech
) -> None:  # type: ignore[no-untyped-def]
    """A retryable failure is naked with a growing delay, max_deliver times in all,
    then dead-lettered; the device gets an Error, and nothing is retried after."""
    js = nc.jetstream()
    engine = AlwaysFailing()
    speech = make_test_speech(SENTENCES[:1])
    async with run_worker(nats_server.url, engine, nak_delay_s=0.2) as worker:  # type: ignore[arg-type]
        started = time.monotonic()
        run = await stream_audio(
            http, edge.url, speech.pcm, speech.sample_rate, realtime=False, interim_results=False
        )
        took = time.monotonic() - started
        await asyncio.sleep(1.0)  # a retry after the last attempt would show here
        assert engine.calls == MAX_DELIVER
        assert worker.stats["retried"] == MAX_DELIVER - 1

    assert run.close_code == 1000
    errors = [r.event for r in run.of_type(ev.Error)]
    assert [(e.code, e.segment) for e in errors] == [("engine_error", 0)], errors  # type: ignore[union-attr]
    assert f"after {MAX_DELIVER} attempts" in errors[0].message  # type: ignore[union-attr]
    assert not run.finals
    # back-off: 0.2 s times the delivery count after each failed attempt (0.2 + 0.4 + ...)
    assert took >= sum(0.2 * n for n in range(1, MAX_DELIVER)), took
    [letter] = [d.letter for d in await read_all(js)]
    assert subjects.parse_segment_msg_id(letter.segment_id) == (run.session_id, 0)
    assert (letter.reason, letter.attempts) == ("engine_error", MAX_DELIVER)
    await assert_queue_empty(js)


async def test_segment_nobody_answers_is_dead_lettered_from_the_advisory(
    nc: NATS, nats_server, http, spawn_worker, make_test_speech
) -> None:  # type: ignore[no-untyped-def]
    """Every worker that takes the segment dies (SIGKILL) before answering, so no
    worker ever sees it fail. After the last delivery nats-server stops redelivering
    and publishes MAX_DELIVERIES; in a work-queue stream the message stays behind
    until a worker hearing the advisory dead-letters it, tells the device and
    deletes it.

    Five kills at the real 10 s ack_wait would take a minute, so this test (and
    only this one) edits the consumer on its own nats-server to ack_wait 2 s, as
    an operator would with `nats consumer edit`; max_deliver stays 5."""
    js = nc.jetstream()
    fast = {"ESCAPEMENT_IN_PROGRESS_EVERY_S": "0.5", "ESCAPEMENT_LEASE_MARGIN_S": "0.3"}

    async with run_edge(nats_server.url, idle_timeout_s=120.0, require_workers=False) as edge:
        # after the edge started: it applies the definitions (ack_wait 10 s) as it starts
        info = await js.consumer_info(subjects.STREAM_SEGMENTS, subjects.CONSUMER_WORKERS)
        config = info.config
        config.ack_wait = 2.0
        await js.add_consumer(subjects.STREAM_SEGMENTS, config)
        device = await Device.open(http, edge)
        session_id = device.session_id
        speech = make_test_speech(SENTENCES[:1])
        for i in range(0, len(speech.pcm), 3200):
            await device.ws.send_bytes(speech.pcm[i : i + 3200])
        await device.ws.send_str(ev.encode_control(ev.Finalize()))
        started = time.monotonic()
        for attempt in range(1, MAX_DELIVER + 1):
            worker = spawn_worker(**fast)

            async def delivered(n: int = attempt) -> bool:
                _, ack_pending, _, deliveries = await queue_state(js)
                return ack_pending == 1 and deliveries == n

            await until(delivered, within=30, every=0.01, message=f"delivery {attempt}")
            worker.kill()
            print(f"delivery {attempt} at {time.monotonic() - started:.1f} s: killed its worker")

        last = spawn_worker(**fast)  # hears the advisory when it pulls
        error = await device.error(within=30)
        print(
            f"\nmax_deliveries reported {time.monotonic() - started:.1f} s after the first delivery"
        )
        assert (error.code, error.segment) == ("max_deliveries", 0), error
        await device.close()
    [letter] = [d.letter for d in await read_all(js)]
    assert (letter.segment_id, letter.reason, letter.attempts) == (
        f"{session_id}:0",
        "max_deliveries",
        MAX_DELIVER,
    )
    await assert_queue_empty(js)
    last.kill()


async def _queue_empty(js: JetStreamContext) -> bool:
    messages, ack_pending, pending, _ = await queue_state(js)
    return (messages, ack_pending, pending) == (0, 0, 0)


async def test_an_answered_segment_is_not_kept_as_dead(nc: NATS) -> None:
    """A worker whose lease lapsed may publish a transcript without acking; if that
    segment is later given up on, the stored Result wins and no dead letter is kept."""
    js = nc.jetstream()
    result = Result(session_id="s1", segment=3, start_ms=0, end_ms=900, text="hello")
    await js.publish(
        subjects.results_subject("e1", "s1"),
        encode_result(result),
        headers={subjects.Header.MSG_ID: subjects.result_msg_id("s1", 3)},
    )
    queued = Queued(
        subjects.segments_subject("e1", "s1"), b"junk", {subjects.Header.MSG_ID: "s1:3"}, 77, 5
    )
    assert await DeadLetters(js).bury(queued, "max_deliveries", "test") is False
    assert await read_all(js) == []
    # ...while an unanswered one is kept, once, however often it is reported
    queued = Queued(
        subjects.segments_subject("e1", "s1"), b"junk", {subjects.Header.MSG_ID: "s1:4"}, 78, 5
    )
    assert await DeadLetters(js).bury(queued, "max_deliveries", "test") is True
    assert await DeadLetters(js).bury(queued, "max_deliveries", "test") is True
    assert [d.letter.segment_id for d in await read_all(js)] == ["s1:4"]


# --- (b) a worker killed mid-inference ------------------------------------------


@pytest.fixture
async def one_segment_edge(nc: NATS, nats_server) -> AsyncIterator[RunningEdge]:  # type: ignore[no-untyped-def]
    """An edge without early finals: an utterance with short pauses inside is one queued
    segment (no candidate at each pause), so the queue's counters count its deliveries."""
    async with run_edge(nats_server.url, require_workers=False, early_finals=False) as running:
        yield running


async def test_worker_killed_mid_inference(
    one_segment_edge: RunningEdge, nc: NATS, http, spawn_worker, make_test_speech
) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL the worker transcribing a segment: the segment is redelivered once its
    lease (ack_wait, 10 s since the delivery or the last in-progress ack) runs out,
    to another worker, and the device gets its Final exactly once."""
    js = nc.jetstream()
    speech = make_test_speech(SENTENCES[:4], gap_s=0.3)  # one long utterance: ~10 s of audio
    first = await spawn_worker(ESCAPEMENT_BEAM_SIZE="5").ready()  # slower: easier to catch mid-job
    streaming = asyncio.create_task(
        stream_audio(http, one_segment_edge.url, speech.pcm, speech.sample_rate, realtime=False)
    )
    await in_the_model(js, first)
    first.kill()
    killed_at = time.monotonic()
    second = await spawn_worker().ready()

    async def redelivered() -> bool:
        return (await queue_state(js))[3] >= 2

    await until(redelivered, within=ACK_WAIT_S + 10, every=0.05, message="redelivery")
    delay = time.monotonic() - killed_at
    run = await asyncio.wait_for(streaming, timeout=60)
    final_after = max(r.t for r in run.of_type(ev.Final)) - killed_at
    print(f"\nredelivered {delay:.2f} s after the kill; Final {final_after:.2f} s after it")

    assert all(r.t > killed_at for r in run.of_type(ev.Final)), "killed after it answered"
    assert ACK_WAIT_S - 3.5 <= delay <= ACK_WAIT_S + 2, delay  # in-progress acks every 3 s
    announced, finals = exactly_once(run)
    assert announced == {0} and finals == Counter({0: 1}), (announced, finals)
    assert not run.of_type(ev.Error)
    assert wer(speech.text, run.text) <= 0.3, run.text
    assert (await queue_state(js))[3] == 2, "delivered twice in all"
    await assert_queue_empty(js)
    assert await read_all(js) == []
    second.kill()


# --- SIGTERM: finish or hand back, then stop -------------------------------------


@pytest.mark.parametrize("grace", ["finish", "hand back"])
async def test_sigterm_finishes_or_hands_back_in_flight_work(
    one_segment_edge: RunningEdge, nc: NATS, http, spawn_worker, make_test_speech, grace: str
) -> None:  # type: ignore[no-untyped-def]
    js = nc.jetstream()
    speech = make_test_speech(SENTENCES[:4], gap_s=0.3)
    env = {"ESCAPEMENT_SHUTDOWN_GRACE_S": "20" if grace == "finish" else "0.05"}
    worker = await spawn_worker(**env).ready()
    streaming = asyncio.create_task(
        stream_audio(http, one_segment_edge.url, speech.pcm, speech.sample_rate, realtime=False)
    )
    await in_the_model(js, worker)  # the worker waiting for a free slot meanwhile
    worker.terminate()
    signalled = time.monotonic()
    assert await worker.wait(within=30) == 0
    stopped = time.monotonic() - signalled
    print(f"\n{grace}: worker exited {stopped:.2f} s after SIGTERM")
    if grace == "finish":
        run = await asyncio.wait_for(streaming, timeout=30)
        assert (await queue_state(js))[3] == 1, "finished by the worker that had it: no redelivery"
    else:
        # handed back (nak) at once: the next worker gets it as soon as it pulls,
        # not when ack_wait runs out
        await spawn_worker().ready()

        async def redelivered() -> bool:
            return (await queue_state(js))[3] >= 2

        await until(redelivered, within=ACK_WAIT_S + 5, message="redelivery")
        after = time.monotonic() - signalled
        print(f"hand back: redelivered {after:.2f} s after SIGTERM (a worker start included)")
        assert after < ACK_WAIT_S / 2, after
        run = await asyncio.wait_for(streaming, timeout=30)
    assert "worker stopped" in worker.log()
    assert run.close_code == 1000
    assert exactly_once(run) == ({0}, Counter({0: 1}))
    await assert_queue_empty(js)


# --- (c) chaos --------------------------------------------------------------------


@pytest.mark.timeout(240)
async def test_chaos_every_final_arrives_exactly_once(
    nc: NATS, nats_server, http, spawn_worker, make_test_speech
) -> None:  # type: ignore[no-untyped-def]
    """3 worker processes; 20 devices stream speech in real time; every 2 s for 20 s
    a random worker is SIGKILLed and a new one started. Every segment the edge
    announced reaches its device as a Final, exactly once."""
    js = nc.jetstream()
    sessions, kills, every_s = 20, 10, 2.0
    rng = random.Random(4786)
    workers = [spawn_worker() for _ in range(3)]
    every_worker = list(workers)
    for w in workers:
        await w.ready()
    speeches = [
        make_test_speech([SENTENCES[(i + k) % len(SENTENCES)] for k in range(3)])
        for i in range(sessions)
    ]

    async def device(i: int) -> StreamRun:
        await asyncio.sleep(i * 0.25)  # devices join over ~5 s
        speech = speeches[i]
        return await stream_audio(
            http, edge.url, speech.pcm, speech.sample_rate, realtime=True, close_timeout=120
        )

    async def chaos() -> list[float]:
        at = []
        for _ in range(kills):
            await asyncio.sleep(every_s)
            k = rng.randrange(len(workers))
            workers[k].kill()
            at.append(time.monotonic())
            workers[k] = spawn_worker()
            every_worker.append(workers[k])
        return at

    async with run_edge(nats_server.url, close_wait_s=90.0, require_workers=False) as edge:
        started = time.monotonic()
        runs, kill_times = await asyncio.gather(
            asyncio.gather(*(device(i) for i in range(sessions))), chaos()
        )
        took = time.monotonic() - started

    problems = []
    total = 0
    for i, run in enumerate(runs):
        announced, finals = exactly_once(run)
        total += len(announced)
        missing, extra = announced - set(finals), set(finals) - announced
        twice = {n for n, c in finals.items() if c > 1}
        errors = [r.event for r in run.of_type(ev.Error)]
        if missing or extra or twice or errors or run.close_code != 1000:
            problems.append(
                f"session {i} ({run.session_id}): missing {sorted(missing)} extra {sorted(extra)} "
                f"twice {sorted(twice)} errors {errors} close {run.close_code}"
            )
    messages, ack_pending, pending, deliveries = await queue_state(js)
    queued = (await js.stream_info(subjects.STREAM_SEGMENTS)).state.last_seq
    text = " ".join(r.text for r in runs)
    reference = " ".join(s.text for s in speeches)
    print(
        f"\nchaos: {sessions} sessions, {total} segments, {len(kill_times)} kills, "
        f"{deliveries - queued} redeliveries, {took:.1f} s, WER {wer(reference, text):.3f}, "
        f"{sum(w.log().count('lease may have lapsed') for w in every_worker)} lease lapses"
    )
    assert not problems, "\n".join(problems)
    assert total == sum(len(s.texts) for s in speeches), total
    assert (messages, ack_pending, pending) == (0, 0, 0)
    assert await read_all(js) == []
    assert wer(reference, text) <= 0.3


# --- (d) escapement dlq -------------------------------------------------------------


def dlq(nats_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NATS_URL": nats_url}
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "dlq", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_dlq_ls_replay_rm(nc: NATS, nats_server, engine, make_test_speech) -> None:  # type: ignore[no-untyped-def]
    js = nc.jetstream()
    url = nats_server.url
    speech = make_test_speech(SENTENCES[:1])
    segment = segment_of(speech, "sess-1", "edge-1", 0)
    subject = subjects.segments_subject("edge-1", "sess-1")
    results = await nc.subscribe(subjects.results_subject("edge-1", "sess-1"))

    failing = AlwaysFailing()
    async with run_worker(url, failing, nak_delay_s=0.05):  # type: ignore[arg-type]
        await js.publish(
            subject, encode_segment(segment), headers={subjects.Header.MSG_ID: "sess-1:0"}
        )
        await js.publish(subject, b"junk", headers={subjects.Header.MSG_ID: "sess-1:1"})
        await until(lambda: _count_dead(js, 2), within=30, message="two dead letters")
    assert failing.calls == MAX_DELIVER

    listed = dlq(url, "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    letters = {d["segment_id"]: d for d in json.loads(listed.stdout)}
    assert set(letters) == {"sess-1:0", "sess-1:1"}
    assert (letters["sess-1:0"]["reason"], letters["sess-1:0"]["attempts"]) == (
        "engine_error",
        MAX_DELIVER,
    )
    assert (letters["sess-1:1"]["reason"], letters["sess-1:1"]["attempts"]) == ("bad_segment", 1)
    assert letters["sess-1:0"]["session"] == "sess-1" and letters["sess-1:0"]["subject"] == subject
    table = dlq(url, "ls")
    assert (
        table.returncode == 0 and "sess-1:0" in table.stdout and "engine_error" in table.stdout
    ), table.stdout

    # the ErrorResults the device got; then the engine is back and the segment is replayed
    errors = [decode_result((await results.next_msg(timeout=5)).data) for _ in range(2)]
    assert {e.segment for e in errors} == {0, 1}
    async with run_worker(url, engine):
        replayed = dlq(url, "replay", "--segment", "sess-1:0")
        assert replayed.returncode == 0, replayed.stderr
        assert "replayed sess-1:0" in replayed.stdout
        answer = decode_result((await results.next_msg(timeout=30)).data)
    assert isinstance(answer, Result) and answer.segment == 0
    assert wer(speech.text, answer.text) <= 0.25, answer.text
    # the replay is stored on ASR_TRANSCRIPTS beside the earlier error (fresh ids)
    stored = await js.stream_info(
        subjects.STREAM_TRANSCRIPTS, subjects_filter=subjects.results_for_session("sess-1")
    )
    assert stored.state.messages == 3
    assert [d["segment_id"] for d in json.loads(dlq(url, "ls", "--json").stdout)] == ["sess-1:1"]
    await assert_queue_empty(js)

    missing = dlq(url, "replay", "--segment", "sess-1:9")
    assert missing.returncode == 1 and "no dead letter" in missing.stderr
    removed = dlq(url, "rm", "--all")
    assert removed.returncode == 0 and "removed sess-1:1" in removed.stdout
    assert json.loads(dlq(url, "ls", "--json").stdout) == []
    assert dlq(url, "ls").stdout.strip() == "no dead letters"

    down = dlq(f"nats://127.0.0.1:{free_port()}", "ls")
    assert down.returncode == 3 and "cannot reach NATS" in down.stderr, down.stderr
    usage = dlq(url, "replay")
    assert usage.returncode == 2


async def _count_dead(js: JetStreamContext, n: int) -> bool:
    return len(await read_all(js)) == n
