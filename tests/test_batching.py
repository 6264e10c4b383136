"""Batching across sessions (services/worker/batching.py): several segments share
model calls and each comes out exactly as it does alone, whatever else is in the
batch; a worker with `batch_max=4` answers four queued segments of four sessions
in one engine call, each final once. Real tiny.en, recorded speech (the Asterisk
prompts of `loadtest.realspeech`) and espeak-ng speech, a real nats-server.
"""

from __future__ import annotations

import asyncio
import dataclasses

import msgspec
import pytest
from nats.aio.client import Client as NATS

from jetstream import subjects
from loadtest.batching import real_windows
from loadtest.corpus import CorpusError
from observability.metrics import Metrics
from schemas.pipeline import Result, Segment, decode_result, encode_segment
from services.worker.batching import decode_batch
from services.worker.chain import EngineSpec, build_chain
from services.worker.decoding import decode
from services.worker.engines import (
    PoisonSegment,
    RetryableEngineError,
    Transcription,
    WhisperEngine,
)
from services.worker.settings import WorkerSettings
from tests.support import run_worker, until, wer

SENTENCES = [
    "please turn on the lights in the kitchen",
    "what is the weather going to be like tomorrow morning",
    "add milk and eggs to my shopping list",
    "remind me to call my mother this evening",
]


@pytest.fixture(scope="module")
def windows(engine: WhisperEngine):  # type: ignore[no-untyped-def]
    """Eight utterances of a recorded session as the edge sends them (context audio and
    its committed text, voiced spans), with what `decode` gives for each alone."""
    try:
        pairs = real_windows(engine.model, engine.policy, count=8)
    except CorpusError as exc:
        pytest.skip(f"recorded speech not available: {exc}")
    return [r for r, _ in pairs], [d for _, d in pairs]


def test_batched_decode_is_the_decode_of_each_alone(engine: WhisperEngine, windows) -> None:  # type: ignore[no-untyped-def]
    """Text, word times and probabilities, scores: equal, in two different batch
    layouts (so nothing depends on the batch an utterance landed in)."""
    requests, alone = windows
    assert sum(bool(d.text) for d in alone) >= 6, [d.text for d in alone]
    assert sum(bool(r.context_text) for r in requests) >= 6  # forced context, mostly
    assert any(d.beam_used > engine.policy.beam_size for d in alone)  # a retry among them
    for layout in ([[0, 1, 2, 3], [4, 5, 6, 7]], [[7, 5, 3, 1], [6, 0, 4, 2]]):
        for batch in layout:
            out = decode_batch(engine.model, [requests[k] for k in batch], engine.policy)
            for k, decoded in zip(batch, out, strict=True):
                assert decoded.text == alone[k].text, (layout, k)
                assert decoded == alone[k], (layout, k)


def test_batched_retry_with_a_forced_tail_is_the_decode_alone(
    engine: WhisperEngine, windows
) -> None:  # type: ignore[no-untyped-def]
    """The same with the retry forcing only the context's last seconds (a policy
    variant: its prompts differ in shape per segment, so they go in separate calls)."""
    requests, _ = windows
    policy = dataclasses.replace(engine.policy, retry_forced_tail_s=3.0)
    alone = [decode(engine.model, r, policy) for r in requests]
    for batch in ([7, 5, 3, 1], [6, 0, 4, 2]):
        out = decode_batch(engine.model, [requests[k] for k in batch], policy)
        for k, decoded in zip(batch, out, strict=True):
            assert decoded == alone[k], k


def _segment(speech, number: int) -> Segment:  # type: ignore[no-untyped-def]
    return Segment(
        session_id=f"batch-{number}",
        edge_id="edge-batching",
        segment=0,
        start_ms=0,
        end_ms=int(speech.duration_s * 1000),
        sample_rate=speech.sample_rate,
        pcm=speech.pcm,
        voiced=[(0, int(speech.duration_s * 1000))],
    )


class OneByOne:
    """The real engine, seen as an engine that cannot batch (only `transcribe`)."""

    def __init__(self, engine: WhisperEngine, name: str) -> None:
        self.engine, self.name, self.calls = engine, name, 0

    def transcribe(self, segment: Segment) -> Transcription:
        self.calls += 1
        return self.engine.transcribe(segment)


class BatchFails(OneByOne):
    """The real engine whose batched call fails: a fault that cannot be produced for
    real on demand (the one stand-in here)."""

    def transcribe_batch(self, segments: list[Segment]) -> list[Transcription]:
        raise RetryableEngineError("batched call failed")


async def test_chain_batches_where_it_can_and_falls_back_per_segment(
    engine: WhisperEngine, make_test_speech
) -> None:  # type: ignore[no-untyped-def]
    """A batch with a segment the model cannot do (German for tiny.en) answers the
    others and reports that one as poison. An engine whose batched call fails opens its
    breaker and each segment goes on alone to the next engine, which (not batching)
    gets one call per segment."""
    settings = WorkerSettings(engine_deadline_s=60, breaker_cooldown_s=600)
    segments = [_segment(make_test_speech([s]), n) for n, s in enumerate(SENTENCES[:2])]
    german = msgspec.structs.replace(segments[0], session_id="batch-de", language="de")
    engines: dict[str, OneByOne] = {}

    def build(spec: EngineSpec) -> object:
        if spec.text == "tiny.en":
            return engine
        engines[spec.text] = (BatchFails if spec.text == "broken" else OneByOne)(engine, spec.name)
        return engines[spec.text]

    chain, _ = await build_chain([EngineSpec("tiny.en")], build, settings, Metrics())  # type: ignore[arg-type]
    try:
        out = await chain.transcribe_batch([*segments, german])
    finally:
        await chain.close()
    for (transcription, by), sentence in zip(out[:2], SENTENCES, strict=False):  # type: ignore[misc]
        assert by == engine.name and wer(sentence, transcription.text) <= 0.2
    assert isinstance(out[2], PoisonSegment)

    chain, _ = await build_chain(
        [EngineSpec("broken"), EngineSpec("plain")],
        build,
        settings,
        Metrics(),  # type: ignore[arg-type]
    )
    try:
        out = await chain.transcribe_batch(segments)
        broken = chain.view()[0]
    finally:
        await chain.close()
    assert [by for _, by in out] == ["faster-whisper:plain"] * 2, out  # type: ignore[misc]
    assert (broken["breaker"], broken["opens"]) == ("open", 1)
    assert "batched call failed" in str(broken["last_error"])
    assert (engines["broken"].calls, engines["plain"].calls) == (0, 2)


@pytest.mark.slow
async def test_worker_decodes_queued_segments_of_four_sessions_in_one_batch(
    nc: NATS, nats_server, engine: WhisperEngine, make_test_speech
) -> None:  # type: ignore[no-untyped-def]
    """Four segments of four sessions wait in the queue; a worker with batch_max=4
    decodes them in one call and publishes each final once, with the text each gets
    decoded alone."""
    js = nc.jetstream()
    segments = [_segment(make_test_speech([s]), n) for n, s in enumerate(SENTENCES)]
    finals: list[Result] = []

    async def collect(msg) -> None:  # type: ignore[no-untyped-def]
        result = decode_result(msg.data)
        assert isinstance(result, Result)
        finals.append(result)

    sub = await nc.subscribe(subjects.results_for_edge("edge-batching"), cb=collect)
    for seg in segments:
        await js.publish(
            subjects.segments_subject(seg.edge_id, seg.session_id),
            encode_segment(seg),
            headers={subjects.Header.MSG_ID: subjects.segment_msg_id(seg.session_id, 0)},
        )
    async with run_worker(nats_server.url, engine, batch_max=4, batch_wait_ms=200) as worker:
        await until(lambda: len(finals) >= 4, within=60, message="four finals")
        await asyncio.sleep(0.5)  # a duplicate would show here
        assert worker.stats["batched"] == 4
        assert worker.stats["transcribed"] == 4
    await sub.unsubscribe()

    by_session = {f.session_id: f for f in finals}
    assert len(finals) == 4 and set(by_session) == {s.session_id for s in segments}
    alone = await asyncio.to_thread(lambda: [engine.transcribe(s) for s in segments])
    for seg, sentence, single in zip(segments, SENTENCES, alone, strict=True):
        final = by_session[seg.session_id]
        assert final.final and final.engine == engine.name
        assert final.text == single.text
        assert wer(sentence, final.text) <= 0.2, final.text
        assert final.words and all(0 <= w.start_ms <= w.end_ms <= seg.end_ms for w in final.words)
    stream = await js.stream_info(subjects.STREAM_SEGMENTS)
    assert stream.state.messages == 0  # every one acked


def test_final_cost_times_every_step_of_a_final_and_leaves_the_decoder_as_it_was(
    tmp_path,
) -> None:  # type: ignore[no-untyped-def]
    """`python -m loadtest.final_cost` at CI size: each window's encoder pass, greedy
    generate and alignment are counted once, the forced-token probe ran with and without
    the context, and the draft check compared every window; `decode` is untimed after."""
    import json

    from loadtest import final_cost
    from services.worker import decoding

    silero = decoding.silero_spans
    out = tmp_path / "cost.json"
    try:
        code = final_cost.main(["--windows", "3", "--draft-check", "--json", str(out)])
    except CorpusError as exc:
        pytest.skip(f"recorded speech not available: {exc}")
    assert code == 0
    report = json.loads(out.read_text())
    steps = report["steps"]
    assert report["windows"] == 3
    assert steps["encoder"]["calls"] == 3 and steps["generate, beam 1"]["calls"] == 3
    assert steps["alignment"]["calls"] >= 3 and steps["silero"]["calls"] >= 3
    assert "0" in report["forced_ms"] and len(report["forced_ms"]) >= 2  # some context
    check = report["draft_check"]
    assert check["windows"] == 3 and check["verified but not equal"] == 0
    assert decoding.silero_spans is silero
