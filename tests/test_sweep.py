"""The dead-letter sweep: a segment nobody will answer is reported, advisory or not.

Real nats-server, real edge, real worker loop. Two stand-ins, each a fault
that cannot be produced on demand, and each says so where it is used:
`AlwaysFailing`, an engine that raises every time, and the fault drill
`max_deliveries_advisory=False`, which drops the worker's MAX_DELIVERIES
advisory subscription as if every advisory were lost. Short timings come
from editing this test server's consumer (`ack_wait`) and stream (`max_age`),
as an operator would with `nats consumer edit` / `nats stream edit`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from jetstream import subjects
from jetstream.setup import apply_all
from schemas import device as ev
from schemas.pipeline import ErrorResult, Segment, decode_result, encode_segment
from services.cli.dlq import read_all
from services.common.natsconn import connect
from services.runtime.natsserver import NatsServer, NatsUsers
from services.worker.deadletter import DeadLetters
from services.worker.engines import RetryableEngineError, Transcription
from services.worker.sweep import Sweep, stamp
from tests import support
from tests.support import RunningEdge, run_edge, run_worker, until

ACK_WAIT_S = 1.0
MAX_DELIVER = 5  # jetstream/consumers/ASR_SEGMENTS.workers.json


class AlwaysFailing:
    """An engine whose every call fails with a retryable error (a stand-in: see the module doc)."""

    name = "always-failing"

    def __init__(self) -> None:
        self.calls: list[float] = []  # when each call was made

    def transcribe(self, segment: Segment) -> Transcription:
        self.calls.append(time.monotonic())
        raise RetryableEngineError(f"engine down (call {len(self.calls)})")


class Device(support.Device):
    """A device holding a session open, collecting its events, that can say something."""

    async def say(self, pcm: bytes) -> None:
        for i in range(0, len(pcm), 3200):
            await self.ws.send_bytes(pcm[i : i + 3200])
        await self.ws.send_str(ev.encode_control(ev.Finalize()))

    def errors(self) -> list[ev.Error]:
        return [e for e in self.events if isinstance(e, ev.Error)]


async def set_ack_wait(js: JetStreamContext, seconds: float) -> None:
    info = await js.consumer_info(subjects.STREAM_SEGMENTS, subjects.CONSUMER_WORKERS)
    config = info.config
    config.ack_wait = seconds
    await js.add_consumer(subjects.STREAM_SEGMENTS, config)


async def stored_results(js: JetStreamContext, session_id: str) -> list[object]:
    """Every result kept on ASR_TRANSCRIPTS for `session_id` (what a resume would replay)."""
    out: list[object] = []
    seq = 1
    while True:
        try:
            raw = await js.get_msg(
                subjects.STREAM_TRANSCRIPTS,
                seq,
                subject=subjects.results_for_session(session_id),
                next=True,
            )
        except NotFoundError:
            return out
        out.append(decode_result(raw.data or b""))
        seq = (raw.seq or seq) + 1


async def queued(js: JetStreamContext) -> int:
    return (await js.stream_info(subjects.STREAM_SEGMENTS)).state.messages


@pytest.fixture
async def edge(nc: NATS, nats_server) -> AsyncIterator[RunningEdge]:  # type: ignore[no-untyped-def]
    async with run_edge(nats_server.url, require_workers=False, idle_timeout_s=120.0) as running:
        yield running


async def test_exhausted_segment_is_dead_lettered_with_every_advisory_lost(
    edge: RunningEdge, nc: NATS, nats_server, http, make_test_speech
) -> None:  # type: ignore[no-untyped-def]
    """Every delivery of a segment goes unanswered and the MAX_DELIVERIES advisory is
    never heard: the sweep still dead-letters it, and the device gets its Error within
    one sweep of the last delivery running out and the segment staying stuck for
    `sweep_settle_s`.

    Fault injection, both labelled: the advisory subscription is dropped
    (`max_deliveries_advisory=False`), and the worker treats each lease as lapsed on
    arrival (`lease_margin_s` above `ack_wait`), so it never answers a delivery: a worker
    that stalls past ack_wait every time, without waiting 10 s per delivery."""
    js = nc.jetstream()
    await set_ack_wait(js, ACK_WAIT_S)  # after the edge applied the definitions
    engine = AlwaysFailing()
    sweep_every_s, settle_s = 1.0, 2.0
    device = await Device.open(http, edge)
    async with run_worker(
        nats_server.url,
        engine,  # type: ignore[arg-type]
        max_deliveries_advisory=False,  # fault drill: every advisory lost
        lease_margin_s=ACK_WAIT_S + 1.0,  # fault: never answers a delivery
        sweep_every_s=sweep_every_s,
        sweep_settle_s=settle_s,
    ) as worker:
        await device.say(make_test_speech(["please turn on the lights in the kitchen"]).pcm)
        error = await until(
            lambda: next(iter(device.errors()), None), within=30, message="the device's Error"
        )
        told = time.monotonic()
        ci = await js.consumer_info(subjects.STREAM_SEGMENTS, subjects.CONSUMER_WORKERS)
        assert ci.delivered.consumer_seq == MAX_DELIVER  # the server's count of deliveries
        ran_out = engine.calls[-1] + ACK_WAIT_S  # the last delivery's lease ended
        print(f"\nError {told - ran_out:.2f} s after the last delivery ran out")
        assert (error.code, error.segment) == ("max_deliveries", 0), error
        assert told - ran_out <= settle_s + sweep_every_s + 1.5
        await until(lambda: worker.sweep.stats.exhausted == 1, within=3, message="sweep done")
        assert worker.dead.buried == 1
    [letter] = [d.letter for d in await read_all(js)]
    assert (letter.segment_id, letter.reason, letter.attempts) == (
        f"{device.session_id}:0",
        "max_deliveries",
        MAX_DELIVER,
    )
    assert await queued(js) == 0
    await asyncio.sleep(0.3)
    assert len(device.errors()) == 1
    await device.close()


async def test_segment_near_max_age_is_dead_lettered_before_the_server_deletes_it(
    edge: RunningEdge, nc: NATS, nats_server, http, make_test_speech
) -> None:  # type: ignore[no-untyped-def]
    """A segment no worker takes (an operator paused the consumer) would be deleted by
    ASR_SEGMENTS' max_age with no word to anyone; the sweep dead-letters it first and
    the device gets an Error. The stream's max_age is cut to 8 s on this test server."""
    js = nc.jetstream()
    stream = await js.stream_info(subjects.STREAM_SEGMENTS)
    config = stream.config
    config.max_age = 8.0
    config.duplicate_window = 4.0  # it may not exceed max_age
    await js.update_stream(config)
    await js.pause_consumer(
        subjects.STREAM_SEGMENTS, subjects.CONSUMER_WORKERS, "2099-01-01T00:00:00Z"
    )
    engine = AlwaysFailing()
    device = await Device.open(http, edge)
    async with run_worker(
        nats_server.url,
        engine,  # type: ignore[arg-type]
        sweep_every_s=0.5,
        sweep_expiry_margin_s=3.0,  # dead-lettered at 5 s of age, 3 s before the server would
    ) as worker:
        await device.say(make_test_speech(["add milk and eggs to my shopping list"]).pcm)
        await until(lambda: queued(js), within=10, message="the segment queued")
        raw = await js.get_msg(subjects.STREAM_SEGMENTS, 0, subject=">", next=True)
        published = stamp(raw.time)
        assert published is not None
        error = await until(
            lambda: next(iter(device.errors()), None), within=15, message="the device's Error"
        )
        age = time.time() - published
        print(f"\nexpiring segment reported at {age:.1f} s of age (max_age 8 s)")
        assert (error.code, error.segment) == ("expired", 0), error
        assert "min in the queue" in error.message
        assert age < 8.0
        await until(lambda: worker.sweep.stats.expired == 1, within=3, message="sweep done")
        ci = await js.consumer_info(subjects.STREAM_SEGMENTS, subjects.CONSUMER_WORKERS)
        assert ci.delivered.consumer_seq == 0  # never delivered: only its age gave it away
    [letter] = [d.letter for d in await read_all(js)]
    assert (letter.segment_id, letter.reason) == (f"{device.session_id}:0", "expired")
    assert await queued(js) == 0
    await device.close()


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[NatsServer]:
    """A nats-server with the per-role users (services/runtime/natsserver.py)."""
    server = NatsServer(tmp_path / "nats", users=NatsUsers.generate())
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_advisory_and_sweep_together_bury_once(secured: NatsServer) -> None:
    """The advisory and the sweeps of other workers find the same exhausted segment at
    the same moment: one dead letter, one stored ErrorResult, and the queue empties;
    all of it within the `worker` user's NATS permissions.

    The deliveries are real: this test pulls the segment MAX_DELIVER times and never
    answers, as workers that die holding it would."""
    refused: list[str] = []

    async def on_error(exc: Exception) -> None:
        refused.append(str(exc))

    admin = await connect(secured.url, "test-admin")
    worker = await connect(secured.url_for("worker"), "test-worker", error_cb=on_error)
    try:
        await apply_all(admin.jetstream())
        await _together(admin.jetstream(), worker)
    finally:
        await worker.close()
        await admin.close()
    assert not refused, refused


async def _together(js: JetStreamContext, worker: NATS) -> None:
    await set_ack_wait(js, 0.5)
    advisories: list[Msg] = []
    sub = await worker.subscribe(subjects.ADVISORY_MAX_DELIVERIES, cb=_keep(advisories))
    segment = Segment(
        session_id="s1",
        edge_id="e1",
        segment=0,
        start_ms=0,
        end_ms=1000,
        sample_rate=16000,
        pcm=bytes(32000),
    )
    await js.publish(
        subjects.segments_subject("e1", "s1"),
        encode_segment(segment),
        headers={subjects.Header.MSG_ID: subjects.segment_msg_id("s1", 0)},
    )
    psub = await js.pull_subscribe_bind(subjects.CONSUMER_WORKERS, stream=subjects.STREAM_SEGMENTS)
    deliveries = 0
    deadline = time.monotonic() + 20
    while not advisories and time.monotonic() < deadline:
        try:
            msgs = await psub.fetch(1, timeout=0.6)
        except TimeoutError:
            continue
        deliveries += len(msgs)  # held and never answered
    assert deliveries == MAX_DELIVER and advisories

    # A sweep that read the segment just before the advisory's handler deleted it buries
    # it too; so may a whole sweep of a third worker.
    wjs = worker.jetstream()
    raw = await wjs.get_msg(subjects.STREAM_SEGMENTS, 0, subject=">", next=True)
    outcomes = await asyncio.gather(
        DeadLetters(wjs).on_max_deliveries(advisories[0]),
        DeadLetters(wjs).give_up_on(raw.seq or 0, MAX_DELIVER, "max_deliveries", "test", raw=raw),
        Sweep(wjs, DeadLetters(wjs)).sweep_once(),
    )
    print(f"\nadvisory, early sweep, whole sweep: {outcomes}")
    [letter] = [d.letter for d in await read_all(js)]
    assert (letter.segment_id, letter.reason, letter.attempts) == ("s1:0", "max_deliveries", 5)
    [stored] = await stored_results(js, "s1")
    assert isinstance(stored, ErrorResult) and stored.code == "max_deliveries"
    assert await queued(js) == 0
    # and a later sweep finds nothing more
    assert await Sweep(wjs, DeadLetters(wjs)).sweep_once() == {"max_deliveries": 0, "expired": 0}
    await sub.unsubscribe()
    await psub.unsubscribe()


def _keep(into: list[Msg]):  # type: ignore[no-untyped-def]
    async def cb(msg: Msg) -> None:
        into.append(msg)

    return cb


async def test_sweep_leaves_a_segment_being_decoded_alone(nc: NATS) -> None:
    """An exhausted segment below one a worker is decoding (renewing its lease): the
    counts say one of the two is exhausted; the sweep buries the older once it has
    stayed a candidate `settle_s`, and never the one in progress."""
    js = nc.jetstream()
    await set_ack_wait(js, 0.5)
    psub = await js.pull_subscribe_bind(subjects.CONSUMER_WORKERS, stream=subjects.STREAM_SEGMENTS)
    for number in (0, 1):
        await _publish(js, number)
    [first] = await psub.fetch(1, timeout=2)
    [second] = await psub.fetch(1, timeout=2)
    assert first.metadata.sequence.stream == 1

    async def decoding() -> None:  # the second one's worker keeps its lease
        while True:
            await second.in_progress()
            await asyncio.sleep(0.1)

    holder = asyncio.create_task(decoding())
    try:
        for _ in range(MAX_DELIVER - 1):  # the first one: delivered and never answered
            await asyncio.sleep(0.6)
            [again] = await psub.fetch(1, timeout=2)
            assert again.metadata.sequence.stream == 1
        await asyncio.sleep(0.6)
        with pytest.raises(TimeoutError):  # its deliveries are used up
            await psub.fetch(1, timeout=0.5)
        sweep = Sweep(js, DeadLetters(js), settle_s=1.0)
        assert await sweep.sweep_once() == {"max_deliveries": 0, "expired": 0}  # not settled
        await asyncio.sleep(1.1)
        assert await sweep.sweep_once() == {"max_deliveries": 1, "expired": 0}
    finally:
        holder.cancel()
    [letter] = [d.letter for d in await read_all(js)]
    assert letter.segment_id == "s1:0"
    await second.ack()
    await until(lambda: _empty(js), within=5, message="queue empty")
    await psub.unsubscribe()


async def _empty(js: JetStreamContext) -> bool:
    return await queued(js) == 0


def _segment(number: int) -> Segment:
    return Segment(
        session_id="s1",
        edge_id="e1",
        segment=number,
        start_ms=0,
        end_ms=1000,
        sample_rate=16000,
        pcm=bytes(32000),
    )


async def _publish(js: JetStreamContext, number: int) -> None:
    await js.publish(
        subjects.segments_subject("e1", "s1"),
        encode_segment(_segment(number)),
        headers={subjects.Header.MSG_ID: subjects.segment_msg_id("s1", number)},
    )


class RacedSweep(Sweep):
    """A sweep whose count of the queue comes right after a device's next segment arrived.

    The fault injected: that publish lands between the sweep's read of the consumer and
    its count of the queue, a window of a millisecond or two that a real burst of
    publishes (the edges catching up after a NATS restart) hits by chance only."""

    async def _count(self, filter_subject: str) -> int:
        if not getattr(self, "raced", False):
            self.raced = True
            await _publish(self.js, 1)
        return await super()._count(filter_subject)


async def test_a_segment_published_mid_sweep_never_gets_the_one_being_decoded_buried(
    nc: NATS,
) -> None:
    """A worker is decoding a device's segment when the device's next one is queued, just
    as a sweep looks: nothing is exhausted, so nothing is dead-lettered, and the segment
    being decoded is answered as usual."""
    js = nc.jetstream()
    psub = await js.pull_subscribe_bind(subjects.CONSUMER_WORKERS, stream=subjects.STREAM_SEGMENTS)
    await _publish(js, 0)
    [decoding] = await psub.fetch(1, timeout=2)
    sweep = RacedSweep(js, DeadLetters(js), settle_s=60.0)
    assert await sweep.sweep_once() == {"max_deliveries": 0, "expired": 0}
    assert sweep.raced
    assert await read_all(js) == []
    await decoding.ack()
    [after] = await psub.fetch(1, timeout=2)  # the segment published mid-sweep, still queued
    assert after.metadata.sequence.stream == 2
    await after.ack()
    await until(lambda: _empty(js), within=5, message="queue empty")
    await psub.unsubscribe()
