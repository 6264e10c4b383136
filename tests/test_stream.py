"""The streaming core on its own: bytes in, events and segments out. No socket, no NATS."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import device as ev
from schemas.pipeline import ErrorResult, Result, Segment, Word
from services.edge.params import StreamParams
from services.edge.stream import Output, StreamConfig, StreamCore, StreamStart, Withdraw
from services.edge.vad import VadConfig

RATE = 16000
LONG = (
    "the committee will meet again on thursday afternoon to discuss the budget "
    "for the new library and the repairs to the old town hall"
)


def core(start: StreamStart | None = None, framing: str = "raw", **config: object) -> StreamCore:
    cfg = StreamConfig(vad=VadConfig(announce_pauses=True), **config)  # type: ignore[arg-type]
    return StreamCore("s1", "e1", "acme", StreamParams(framing=framing), cfg, start)


def feed(c: StreamCore, pcm: bytes, chunk_ms: int = 100) -> list[Output]:
    """Audio in real time: `now` is the audio clock."""
    step = RATE * chunk_ms // 1000 * 2
    out: list[Output] = []
    for i in range(0, len(pcm), step):
        out.extend(c.audio(pcm[i : i + step], now=(i + step) / 2 / RATE))
    return out


def finals_to_publish(out: list[Output]) -> list[Segment]:
    return [o for o in out if isinstance(o, Segment) and o.final]


def events(out: list[Output], kind: type) -> list:  # type: ignore[type-arg]
    return [o for o in out if isinstance(o, kind)]


def answer(segment: Segment, text: str, final: bool | None = None) -> Result:
    return Result(
        session_id=segment.session_id,
        segment=segment.segment,
        start_ms=segment.start_ms,
        end_ms=segment.end_ms,
        text=text,
        words=[Word(w, segment.start_ms, segment.end_ms) for w in text.split()],
        final=segment.final if final is None else final,
        revision=segment.revision,
    )


@pytest.fixture(scope="module")
def two(make_test_speech):  # type: ignore[no-untyped-def]
    return make_test_speech(["please turn on the lights", "set a timer for ten minutes"])


@pytest.fixture(scope="module")
def long_one(make_test_speech):  # type: ignore[no-untyped-def]
    return make_test_speech([LONG], gap_s=0.5)


def test_speech_started_comes_at_the_onset_and_segments_are_numbered_in_order(two) -> None:  # type: ignore[no-untyped-def]
    c = core(interims=False)
    out = feed(c, two.pcm)
    started = events(out, ev.SpeechStarted)
    assert len(started) == 2
    for event, (onset_s, _) in zip(started, two.spans, strict=True):
        assert abs(event.t_ms - onset_s * 1000) <= 150
    # the second waits for the first's result: its prompt is that text
    segs = finals_to_publish(out)
    assert [s.segment for s in segs] == [0]
    assert [e.segment for e in events(out, ev.SpeechEnded)] == [0, 1]
    first = c.result(answer(segs[0], "Please turn on the lights."), now=99.0)
    assert [type(o) for o in first] == [ev.Final, Segment]
    second = first[1]
    assert isinstance(second, Segment) and second.segment == 1
    # its left context: the first utterance's audio from its start, and its committed text
    assert second.context_text == "Please turn on the lights."
    assert len(second.context_pcm) == (second.start_ms - segs[0].start_ms) * RATE // 1000 * 2
    assert second.context_pcm[: len(segs[0].pcm)] == segs[0].pcm
    assert segs[0].start_ms < segs[0].end_ms <= second.start_ms
    assert c.result(answer(second, "Set a timer for ten minutes."), now=99.5)[0].segment == 1
    assert c.settled


def test_a_segment_waits_for_earlier_results_only_so_long(two) -> None:  # type: ignore[no-untyped-def]
    c = core(interims=False, prompt_wait_s=0.5)
    out = feed(c, two.pcm + b"\0" * RATE * 2)  # two more seconds of silence go by
    segs = finals_to_publish(out)
    assert [s.segment for s in segs] == [0, 1]
    # the first result never came in time: no context is guessed
    assert segs[1].context_text == "" and segs[1].context_pcm == b""


def test_same_audio_gives_the_same_segments(two) -> None:  # type: ignore[no-untyped-def]
    runs = []
    for _ in range(2):
        c = core(interims=False)
        out = feed(c, two.pcm)
        first = finals_to_publish(out)[0]
        out += c.result(answer(first, "one"), now=50)
        runs.append(
            [(s.segment, s.start_ms, s.end_ms, s.pcm, s.prompt) for s in finals_to_publish(out)]
        )
    assert runs[0] == runs[1] and len(runs[0]) == 2


@settings(max_examples=15, deadline=None)
@given(chunks=st.lists(st.integers(min_value=1, max_value=9000), min_size=1, max_size=40))
def test_chunk_boundaries_do_not_change_what_is_published(two, chunks) -> None:  # type: ignore[no-untyped-def]
    reference = core(interims=False, early_finals=False)
    expected = [(s.start_ms, s.end_ms, s.pcm) for s in finals_to_publish(feed(reference, two.pcm))]
    c = core(interims=False, early_finals=False)
    out: list[Output] = []
    pos, i = 0, 0
    while pos < len(two.pcm):
        size = chunks[i % len(chunks)] * 2
        out += c.audio(two.pcm[pos : pos + size], now=pos / 2 / RATE)
        pos, i = pos + size, i + 1
    assert [(s.start_ms, s.end_ms, s.pcm) for s in finals_to_publish(out)] == expected


def test_finalize_cuts_now_and_close_flushes_the_rest(long_one) -> None:  # type: ignore[no-untyped-def]
    c = core(interims=False)
    half = len(long_one.pcm) // 2 // 2 * 2
    out = feed(c, long_one.pcm[:half])
    assert not finals_to_publish(out)  # still speaking
    flushed = c.flush(now=10.0)
    [seg] = finals_to_publish(flushed)
    assert events(flushed, ev.SpeechEnded)[0].segment == 0
    assert seg.end_ms <= half * 1000 // (2 * RATE)
    out = c.result(answer(seg, "the committee"), now=10.2)
    rest = feed(c, long_one.pcm[half:]) + c.flush(now=20.0)
    assert [s.segment for s in finals_to_publish(out + rest)] == [1]
    assert c.flush(now=21.0) == []  # nothing more was said


def test_resume_goes_on_where_the_session_stood(two) -> None:  # type: ignore[no-untyped-def]
    start = StreamStart(next_segment=7, position_ms=60_000, delivered_below=5, owed=(5, 6))
    c = core(start, interims=False, prompt_wait_s=0.0)
    assert not c.settled
    out = feed(c, two.pcm)
    assert events(out, ev.SpeechStarted)[0].t_ms > 60_000
    segs = finals_to_publish(out)
    assert segs[0].segment == 7 and segs[0].start_ms > 60_000
    owed_result = Result(session_id="s1", segment=5, start_ms=1, end_ms=2, text="earlier")
    assert [type(o) for o in c.result(owed_result, now=9)] == [ev.Final]
    assert (
        c.result(msgspec.structs.replace(owed_result, segment=4), now=9) == []
    )  # delivered before


def test_each_result_reaches_the_device_once(two) -> None:  # type: ignore[no-untyped-def]
    c = core(interims=False)
    seg = finals_to_publish(feed(c, two.pcm))[0]
    res = answer(seg, "Please turn on the lights.")
    assert events(c.result(res, now=9), ev.Final)
    assert c.result(res, now=9.1) == []  # a redelivered segment decoded twice
    err = ErrorResult(
        session_id="s1", segment=seg.segment, code="x", message="y", revision=seg.revision
    )
    assert c.result(err, now=9.2) == []


def test_an_error_then_a_replayed_final_both_reach_the_device(two) -> None:  # type: ignore[no-untyped-def]
    c = core(interims=False)
    seg = finals_to_publish(feed(c, two.pcm))[0]
    err = ErrorResult(
        session_id="s1",
        segment=seg.segment,
        code="poison_segment",
        message="no",
        revision=seg.revision,
    )
    assert [type(o) for o in c.result(err, now=9)][0] is ev.Error
    replayed = answer(seg, "Please turn on the lights.")
    assert events(c.result(replayed, now=30), ev.Final)


def test_the_early_final_is_published_at_the_pause_and_shown_at_the_endpoint(two) -> None:  # type: ignore[no-untyped-def]
    c = core(interims=False)
    first_end = two.spans[0][1]
    cut = int((first_end + 0.35) * RATE) * 2  # 350 ms into the silence: past the pad
    out = feed(c, two.pcm[:cut], chunk_ms=10)
    [candidate] = finals_to_publish(out)
    assert not events(out, ev.SpeechEnded)  # the endpoint (500 ms) is not confirmed yet
    assert c.result(answer(candidate, "Please turn on the lights."), now=1.0) == []  # held
    rest = feed(c, two.pcm[cut : cut + RATE // 2 * 2], chunk_ms=10)
    assert [type(o) for o in rest][:2] == [ev.SpeechEnded, ev.Final]  # at once
    assert not finals_to_publish(rest)  # nothing decoded twice


def test_a_pause_that_was_not_the_end_voids_its_candidate(make_test_speech) -> None:  # type: ignore[no-untyped-def]
    speech = make_test_speech(["please turn on", "the lights"], gap_s=0.4)  # < endpoint
    c = core(interims=False)
    out = feed(c, speech.pcm, chunk_ms=10)
    candidates = finals_to_publish(out)
    assert len(candidates) == 2  # the pause, then the real end
    void, real = candidates
    assert void.revision != real.revision and void.segment == real.segment == 0
    # the void one is taken back out of the queue, once, before the real one is queued
    withdrawn = [o for o in out if isinstance(o, Withdraw)]
    assert withdrawn == [Withdraw(0, void.revision)]
    assert out.index(withdrawn[0]) < out.index(real)
    assert c.result(answer(void, "Please turn on."), now=5) == []  # dropped
    assert [
        e.text
        for e in events(c.result(answer(real, "Please turn on the lights."), now=5), ev.Final)
    ] == ["Please turn on the lights."]


def test_interims_come_while_speaking_and_never_after_the_final(long_one) -> None:  # type: ignore[no-untyped-def]
    assert long_one.duration_s > 6
    c = core()
    out: list[Output] = []
    interims_shown: list[ev.Interim] = []
    said = LONG.split()
    step = RATE // 10 * 2
    for i in range(0, len(long_one.pcm), step):
        now = (i + step) / 2 / RATE
        for o in c.audio(long_one.pcm[i : i + step], now):
            out.append(o)
            if isinstance(o, Segment) and not o.final:  # a worker answers each look at once
                k = max(1, (o.end_ms - o.start_ms) * len(said) // 7000)
                for e in c.result(answer(o, " ".join(said[:k])), now):
                    interims_shown.append(e)
    onset = events(out, ev.SpeechStarted)[0].t_ms
    looks = [o for o in out if isinstance(o, Segment) and not o.final]
    assert len(looks) >= 3
    assert looks[0].end_ms - onset <= 1000  # the first look leaves time to decode within 1.5 s
    assert [e.segment for e in interims_shown] == [0] * len(interims_shown)
    stable = [e.stable_prefix for e in interims_shown]
    assert stable == sorted(stable) and stable[-1] > 0  # agreed words are never taken back
    [final_seg] = finals_to_publish(out)
    late_look = looks[-1]
    assert events(c.result(answer(final_seg, LONG), now=99), ev.Final)
    assert c.result(answer(late_look, "stale"), now=99.1) == []  # after its Final: dropped


def test_interrupt_drops_interim_results_already_asked_for(long_one) -> None:  # type: ignore[no-untyped-def]
    c = core()
    out = feed(c, long_one.pcm[: RATE * 2 * 3])
    looks = [o for o in out if isinstance(o, Segment) and not o.final]
    assert looks
    c.interrupt()
    assert c.result(answer(looks[-1], "the committee"), now=3.1) == []


def test_interim_results_off(long_one) -> None:  # type: ignore[no-untyped-def]
    c = core(interims=False)
    out = feed(c, long_one.pcm)
    assert not [o for o in out if isinstance(o, Segment) and not o.final]


def test_looks_after_a_cut_are_timed_from_the_cut(long_one) -> None:  # type: ignore[no-untyped-def]
    cfg = VadConfig(announce_pauses=True, max_utterance_ms=3000)
    c = StreamCore("s1", "e1", "acme", StreamParams(), StreamConfig(vad=cfg))
    out = feed(c, long_one.pcm)
    pieces = finals_to_publish(out)
    assert len(pieces) >= 2  # cut at 3 s
    looks = [o for o in out if isinstance(o, Segment) and not o.final]
    for piece in pieces[1:]:
        mine = [o.end_ms for o in looks if o.segment == piece.segment]
        assert mine, f"no look at piece {piece.segment}"
        # the first look after 400 ms of the piece, then one a second: no burst of looks
        # at a piece that has barely begun
        assert mine[0] - piece.start_ms >= 400
        assert all(b - a >= 900 for a, b in zip(mine, mine[1:], strict=False))
