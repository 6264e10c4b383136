"""The streaming core of one session: audio, controls and results in; events and segments out.

No I/O and no clock of its own (callers pass `now`), so everything a device
sees can be tested by feeding bytes. The socket adapter (`session.py`) sends
the `ServerEvent`s it returns to the device and publishes the `Segment`s.

What it decides:
- **Numbering and time.** Utterances are numbered in order; times are on the
  session timeline (a resumed session goes on from where it stopped).
- **Context, deterministically.** A final segment carries the committed text
  of the finals before it as its prompt, and a few seconds of the audio before
  it (starting at an earlier utterance's start, never mid-word). So the prompt
  never depends on which results happened to have arrived, a segment is held
  until the results of all earlier segments are in (or `prompt_wait_s` has
  passed, when whatever is known goes).
- **Early finals.** When the trailing silence reaches the segment's pad, the
  segmenter announces a `Pause` with the utterance exactly as it will end;
  that *candidate* is published at once, so its decode runs while the
  endpoint is awaited. If the endpoint is confirmed, its result is the final;
  if speech resumes, the candidate is void (a newer revision follows) and its
  result is dropped.
- **Interims.** While someone speaks, the utterance so far is published as
  interim work every `interim_every_ms`; the results come back as `Interim`
  events whose `stable_prefix` words agreed across two consecutive looks
  (LocalAgreement-2). Interims for an utterance stop the moment its final is
  settled: a stale interim never reaches the device after its `Final`.
- **Exactly once.** Each segment's result reaches the device once, whatever
  redeliveries, replays or store recoveries happen.
"""

from __future__ import annotations

import secrets
from collections import deque
from dataclasses import dataclass, field

import msgspec

from schemas import device as ev
from schemas.pipeline import ErrorResult, Result, ResultMessage, Segment, Word
from services.edge.params import StreamParams
from services.edge.timeline import Timeline, TimelineGap
from services.edge.vad import (
    Discarded,
    Event,
    Pause,
    Resumed,
    Segmenter,
    SpeechStart,
    Utterance,
    VadConfig,
)


@dataclass(frozen=True, slots=True)
class Withdraw:
    """A queued candidate went void (speech resumed): take it back out of the queue."""

    number: int
    revision: int


Output = ev.ServerEvent | Segment | Withdraw


class BadAudio(ValueError):
    """A frame that is not audio of this stream (odd-length PCM, bad msgpack, an
    impossible gap claim): the socket is closed with this message."""


LOOK_HOLD_MS = 90  # no interim look is asked for during this much trailing silence


@dataclass(frozen=True, slots=True)
class StreamConfig:
    vad: VadConfig = field(default_factory=VadConfig)
    jitter_ms: int = 200  # numbered chunks: how long a missing one is waited for (audio time)
    prompt_chars: int = 0  # committed text before the context, sent as the prompt (0: none)
    context_ms: int = 25000  # audio of earlier utterances sent as left context (0: none)
    # context + segment at most: Whisper sees 30 s, and a segment must fit a NATS message
    window_ms: int = 28000
    prompt_wait_s: float = 3.0  # hold a segment this long for earlier results
    early_finals: bool = True  # publish a candidate at the pause, before the endpoint
    interims: bool = True
    interim_first_ms: int = 400  # speech before the first interim look
    interim_every_ms: int = 1000  # speech between interim looks
    # Finalize rate limit (audio time): a cut this soon after the previous one, or of an
    # utterance with less speech, is refused; each would cost a whole decode
    min_finalize_interval_ms: int = 1000
    min_finalize_speech_ms: int = 300


FINALIZE_LIMITED = "finalize_rate_limited"


@dataclass(frozen=True, slots=True)
class StreamStart:
    """Where a (resumed) session stands when its socket opens."""

    next_segment: int = 0
    position_ms: int = 0
    delivered_below: int = 0  # every segment below was given to the device
    owed: tuple[int, ...] = ()  # queued earlier, result not seen yet
    context: tuple[str, ...] = ()  # committed text of earlier finals, oldest first
    confirmed: tuple[tuple[int, int], ...] = ()  # (segment, revision) that counted, recent ones


class Delivered:
    """Which segments the device has been given, in bounded memory.

    Everything below `floor` was delivered; `above` holds the few delivered
    out of order beyond it. Memory stays O(segments in flight), not O(session).
    """

    def __init__(self, floor: int = 0) -> None:
        self.floor = floor
        self.above: set[int] = set()

    def __contains__(self, number: int) -> bool:
        return number < self.floor or number in self.above

    def add(self, number: int) -> None:
        if number < self.floor:
            return
        self.above.add(number)
        while self.floor in self.above:
            self.above.discard(self.floor)
            self.floor += 1


@dataclass(slots=True)
class _Held:
    """A final segment waiting for the results before it (its prompt)."""

    number: int
    revision: int
    utterance: Utterance
    since: float
    void: bool = False  # a candidate whose speech went on: never to be published


@dataclass(slots=True)
class _Interims:
    """LocalAgreement-2 over the interim looks at the utterance in progress."""

    number: int
    since_ms: int  # where the utterance (or the piece after a cut) began, segmenter time
    looks: int = 0  # interim segments published for this utterance
    shown: int = -1  # newest look whose result reached the device
    previous: list[Word] = field(default_factory=list)
    committed: list[Word] = field(default_factory=list)  # agreed by two consecutive looks

    def merge(self, words: list[Word]) -> list[Word]:
        """The words to show: the committed prefix (never taken back), then the newest look's rest."""
        agreed = 0
        for a, b in zip(self.previous, words, strict=False):
            if _norm(a.word) != _norm(b.word):
                break
            agreed += 1
        if agreed > len(self.committed):
            self.committed = words[:agreed]
        self.previous = words
        return self.committed + words[len(self.committed) :]


def _norm(word: str) -> str:
    return "".join(c for c in word.lower() if c.isalnum())


class StreamCore:
    def __init__(
        self,
        session_id: str,
        edge_id: str,
        tenant: str,
        params: StreamParams,
        config: StreamConfig,
        start: StreamStart | None = None,
    ) -> None:
        start = start or StreamStart()
        self.session_id = session_id
        self.edge_id = edge_id
        self.tenant = tenant
        self.params = params
        self.config = config
        self.offset_ms = start.position_ms
        self.segmenter = Segmenter(params.sample_rate, config.vad)
        self.timeline = (
            Timeline(params.sample_rate, config.jitter_ms, start_ms=start.position_ms)
            if params.framing == "msgpack"
            else None
        )
        self.next_segment = start.next_segment
        self.fed_bytes = 0
        self.delivered = Delivered(start.delivered_below)
        self.outstanding: dict[int, float] = dict.fromkeys(
            (n for n in start.owed if n not in self.delivered), 0.0
        )
        self.failed: list[int] = []  # recent segments that will get no result (bounded)
        self._errored: set[int] = set()  # answered with an Error; a replayed Final may follow
        self._texts: deque[tuple[int, str]] = deque((-1, t) for t in start.context if t)
        self._held: deque[_Held] = deque()
        self._candidate: _Held | None = None  # published at a Pause, endpoint not yet confirmed
        self._early: dict[int, Result] = {}  # a candidate's result, waiting for its endpoint
        self._revisions: dict[int, int] = {}  # number -> revision that counts (confirmed)
        # Unique across sockets of one session: a void candidate's stored result must
        # never pass for a later revision of the same number after a resume.
        self._next_revision = secrets.randbelow(1 << 30) << 8
        self.confirmed: dict[int, int] = dict(start.confirmed)  # recent number -> revision
        self._interims: _Interims | None = None
        self._onset_ms: int | None = None
        self._audio: deque[bytes] = deque()  # recent timeline audio, for left context
        self._audio_bytes = 0
        # recent utterances: number -> start (segmenter ms); their committed text is in _texts
        self._starts: dict[int, int] = {}
        self.interim_published = 0
        self.interims_dropped = 0
        self.latencies_s: list[float] = []  # endpoint -> Final, of finals not yet collected
        # language "" (detect): the language of the newest final so far, sent as the prior
        self.session_language: tuple[int, str] = (-1, "")
        self._last_cut_ms: int | None = None  # segmenter time of the newest utterance's end
        self.finalizes_ignored = 0
        self._finalize_told = False  # the device heard finalize_rate_limited since the last cut

    # --- time ---------------------------------------------------------------

    def _bytes(self, ms: int) -> int:
        return ms * self.params.sample_rate // 1000 * 2

    @property
    def position_ms(self) -> int:
        return self.offset_ms + self.fed_bytes * 1000 // (2 * self.params.sample_rate)

    @property
    def settled(self) -> bool:
        return not self.outstanding and not self._held

    # --- audio in -------------------------------------------------------------

    def audio(self, pcm: bytes, now: float) -> list[Output]:
        """Timeline PCM (raw framing, or what `chunk` repaired) in order."""
        self.fed_bytes += len(pcm)
        self._remember_audio(pcm)
        out: list[Output] = []
        for event in self.segmenter.feed(pcm):
            self._on_vad(event, now, out)
        self._maybe_interim(out)
        out.extend(self.release(now))
        return out

    def frame(self, data: bytes, now: float) -> list[Output]:
        """A binary frame from the device: PCM (raw framing) or an `AudioChunk` (msgpack)."""
        if self.timeline is None:
            if len(data) % 2:
                raise BadAudio(f"odd-length PCM frame ({len(data)} bytes); need s16le samples")
            return self.audio(data, now)
        try:
            chunk = ev.decode_chunk(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise BadAudio(f"invalid AudioChunk msgpack: {exc}") from None
        if len(chunk.pcm) % 2 or chunk.seq < 0:
            raise BadAudio(f"invalid AudioChunk seq={chunk.seq} ({len(chunk.pcm)} bytes of pcm)")
        return self.chunk(chunk, now)

    def chunk(self, chunk: ev.AudioChunk, now: float) -> list[Output]:
        """A numbered chunk (msgpack framing), put in its place on the timeline."""
        assert self.timeline is not None
        out: list[Output] = []
        try:
            pieces = self.timeline.push(chunk)
        except TimelineGap as exc:
            raise BadAudio(str(exc)) from None
        out.extend(self.timeline.reports(now))  # Gap / ChunkStats
        for pcm in pieces:
            out.extend(self.audio(pcm, now))
        return out

    def flush(self, now: float) -> list[Output]:
        """Finalize / CloseStream / disconnect: cut the utterance in progress now."""
        out: list[Output] = []
        if self.timeline is not None:
            try:
                pieces = self.timeline.flush()
            except TimelineGap as exc:
                raise BadAudio(str(exc)) from None
            out.extend(self.timeline.reports(now, final=True))
            for pcm in pieces:
                out.extend(self.audio(pcm, now))
        for event in self.segmenter.flush():
            self._on_vad(event, now, out)
        out.extend(self.release(now))
        return out

    def finalize(self, now: float) -> list[Output]:
        """A device's `Finalize`: cut now, unless it comes too soon after the previous cut
        or too little has been said (each cut costs a whole decode). Then the speech goes
        on as if it had not come, and the device hears one `Error` for the run of them."""
        pos = self.segmenter.position_ms
        cfg = self.config
        too_soon = (
            self._last_cut_ms is not None and pos - self._last_cut_ms < cfg.min_finalize_interval_ms
        )
        too_short = self._onset_ms is not None and pos - self._onset_ms < cfg.min_finalize_speech_ms
        if not self.segmenter.in_speech or not (too_soon or too_short):
            self._finalize_told = False
            return self.flush(now)
        self.finalizes_ignored += 1
        if self._finalize_told:
            return []
        self._finalize_told = True
        why = (
            f"within {cfg.min_finalize_interval_ms} ms of the previous cut"
            if too_soon
            else f"under {cfg.min_finalize_speech_ms} ms of speech"
        )
        return [ev.Error(code=FINALIZE_LIMITED, message=f"Finalize ignored: {why}")]

    def interrupt(self) -> None:
        """Barge-in: results of interim looks already asked for are not shown."""
        if self._interims is not None:
            self._interims.shown = self._interims.looks - 1

    def _remember_audio(self, pcm: bytes) -> None:
        if self.config.context_ms <= 0:
            return
        self._audio.append(pcm)
        self._audio_bytes += len(pcm)
        wait_ms = int(self.config.prompt_wait_s * 1000)
        keep = self._bytes(self.config.window_ms + wait_ms + 1000)  # ~1 MB at 16 kHz
        while self._audio and self._audio_bytes - len(self._audio[0]) >= keep:
            self._audio_bytes -= len(self._audio.popleft())

    def _context(self, number: int, start_ms: int, end_ms: int) -> tuple[bytes, str, int]:
        """Left context for segment `number`, [start_ms, end_ms) in segmenter time.

        The audio from the start of the earliest of the utterances just before it
        that began within `context_ms` (and within `window_ms` of its end), all of
        whose finals are in and said something, with their text; else nothing.
        Returns (pcm, text, first number).
        """
        if self.config.context_ms <= 0:
            return b"", "", number
        texts = dict(self._texts)
        first = number
        earliest = max(start_ms - self.config.context_ms, end_ms - self.config.window_ms)
        while (
            first - 1 in self._starts
            and texts.get(first - 1)
            and earliest <= self._starts[first - 1] < start_ms
        ):
            first -= 1
        if first == number:
            return b"", "", number
        have_from = self.fed_bytes - self._audio_bytes  # timeline byte where _audio begins
        lo = self._bytes(self._starts[first]) - have_from
        hi = self._bytes(start_ms) - have_from
        if lo < 0 or hi <= lo:
            return b"", "", number
        text = " ".join(texts[n] for n in range(first, number))
        return b"".join(self._audio)[lo:hi], text, first

    def _on_vad(self, event: Event, now: float, out: list[Output]) -> None:
        offset = self.offset_ms
        if isinstance(event, SpeechStart):
            self._onset_ms = event.t_ms
            self._interims = (
                _Interims(self.next_segment, event.t_ms) if self.config.interims else None
            )
            out.append(ev.SpeechStarted(t_ms=offset + event.t_ms))
        elif isinstance(event, Pause):
            if self.config.early_finals:
                self._candidate = self._hold(event.utterance, now)
        elif isinstance(event, Resumed):
            self._void_candidate(out)
        elif isinstance(event, Utterance):
            number = self.next_segment
            self.next_segment += 1
            self._last_cut_ms = self.segmenter.position_ms
            self._finalize_told = False
            self._starts[number] = event.start_ms
            while len(self._starts) > 32:
                del self._starts[min(self._starts)]
            if not event.cut:
                out.append(ev.SpeechEnded(t_ms=offset + event.end_ms, segment=number))
            candidate = self._candidate
            if candidate is not None and candidate.utterance == event:
                self._candidate = None
                self._confirm(candidate, now, out)
            else:
                self._void_candidate(out)
                self._confirm(self._hold(event, now), now, out)
            if event.cut and self.config.interims:
                # the speech goes on: the next piece's looks are timed from the cut
                self._interims = _Interims(self.next_segment, event.end_ms)
            else:
                self._interims = None
                self._onset_ms = None
        elif isinstance(event, Discarded):
            self._void_candidate(out)
            self._interims = None
            self._onset_ms = None
            out.append(ev.SpeechEnded(t_ms=offset + event.end_ms, segment=None))

    def _void_candidate(self, out: list[Output] | None = None) -> None:
        candidate = self._candidate
        if candidate is not None:
            candidate.void = True  # unpublished: dropped; published: its result is ignored
            self._candidate = None
            if out is not None and candidate not in self._held:
                out.append(Withdraw(candidate.number, candidate.revision))

    def _hold(self, utterance: Utterance, now: float) -> _Held:
        """A new revision of the utterance in progress, queued behind earlier segments."""
        self._next_revision += 1
        held = _Held(self.next_segment, self._next_revision, utterance, now)
        self._held.append(held)
        return held

    def _confirm(self, held: _Held, now: float, out: list[Output]) -> None:
        number = self.next_segment - 1
        held.number = number
        self._revisions[number] = held.revision
        self.confirmed[number] = held.revision
        while len(self.confirmed) > 100:
            del self.confirmed[min(self.confirmed)]
        self.outstanding[number] = now
        early = self._early.pop(number, None)
        if early is not None and early.revision == held.revision:
            self._deliver(early, out, now)
        self._early = {n: r for n, r in self._early.items() if n > number}

    def release(self, now: float, everything: bool = False) -> list[Output]:
        """Held segments whose earlier results are in (or waited `prompt_wait_s`), in order.

        `everything`: the socket is closing; what was heard goes now, with what is known.
        """
        out: list[Output] = []
        while self._held:
            held = self._held[0]
            if held.void:
                self._held.popleft()
                continue
            waiting = any(n < held.number for n in self.outstanding)
            if waiting and not everything and now - held.since < self.config.prompt_wait_s:
                break
            self._held.popleft()
            out.append(self._segment(held))
        return out

    def _segment(self, held: _Held) -> Segment:
        return self._make(held.number, held.revision, held.utterance, final=True)

    def _make(self, number: int, revision: int, utt: Utterance, final: bool) -> Segment:
        offset = self.offset_ms
        context_pcm, context_text, first = self._context(number, utt.start_ms, utt.end_ms)
        return Segment(
            session_id=self.session_id,
            edge_id=self.edge_id,
            segment=number,
            start_ms=offset + utt.start_ms,
            end_ms=offset + utt.end_ms,
            sample_rate=self.params.sample_rate,
            pcm=utt.pcm,
            context_pcm=context_pcm,
            context_text=context_text,
            voiced=[(offset + a, offset + b) for a, b in utt.voiced],
            language=self.params.language,
            prompt=self.prompt_before(first),
            tenant=self.tenant,
            final=final,
            revision=revision,
            session_language="" if self.params.language else self.session_language[1],
            model=self.params.model,
        )

    def _maybe_interim(self, out: list[Output]) -> None:
        state = self._interims
        if state is None or self._candidate is not None:
            return
        spoken = self.segmenter.position_ms - state.since_ms
        due = self.config.interim_first_ms + state.looks * self.config.interim_every_ms
        if spoken < due:
            return
        if self.segmenter.trailing_silence_ms >= LOOK_HOLD_MS:
            return  # maybe the end: a look now could hold up the early final behind it
        utt = self.segmenter.current()
        if utt is None:
            return
        state.looks += 1
        self.interim_published += 1
        out.append(self._make(state.number, state.looks - 1, utt, final=False))

    # --- prompt ---------------------------------------------------------------

    def prompt_before(self, number: int) -> str:
        chars = self.config.prompt_chars
        if chars <= 0:
            return ""
        text = " ".join(t for n, t in self._texts if n < number)
        return text[-chars:].lstrip()

    def _commit_text(self, number: int, text: str) -> None:
        """A final's text, kept for the context and prompt of the segments after it."""
        if not text:
            return
        self._texts.append((number, text))
        self._texts = deque(sorted(self._texts, key=lambda x: x[0]))
        keep_chars = max(4 * self.config.prompt_chars, 2000)
        total = sum(len(t) + 1 for _, t in self._texts)
        while len(self._texts) > 1 and (total > keep_chars or len(self._texts) > 64):
            total -= len(self._texts.popleft()[1]) + 1

    # --- results in -------------------------------------------------------------

    def result(self, result: ResultMessage, now: float) -> list[Output]:
        """A worker's answer (or one recovered from the store / replayed from dead letters)."""
        out: list[Output] = []
        if isinstance(result, Result) and not result.final:
            self._interim_result(result, out)
            return out
        number = result.segment
        if number < 0:  # about a segment nobody could number (a dead letter)
            message = (
                ev.Error(code=result.code, message=result.message)
                if isinstance(result, ErrorResult)
                else ev.Error(code="bad_result", message="a result without a segment number")
            )
            out.append(message)
            return out
        if number in self.delivered:
            if not (isinstance(result, Result) and number in self._errored):
                return out  # transcribed twice (redelivery): the device sees it once
            self._errored.discard(number)  # replayed from the dead letters: now it has a Final
        elif not self._counts(result):
            candidate = self._candidate
            if (
                isinstance(result, Result)
                and candidate is not None
                and result.revision == candidate.revision
            ):
                self._early[number] = result  # the endpoint is not confirmed yet
            return out  # a void candidate's, or an older revision's
        self._deliver(result, out, now)
        out.extend(self.release(now))
        return out

    def _counts(self, result: ResultMessage) -> bool:
        """A final result of the revision that was confirmed (or of a segment owed from before)."""
        wanted = self._revisions.get(result.segment)
        if wanted is None:  # owed since before a resume, if at all
            known = self.confirmed.get(result.segment)
            return result.segment in self.outstanding and known in (None, result.revision)
        return result.revision == wanted

    def _deliver(self, result: ResultMessage, out: list[Output], now: float) -> None:
        number = result.segment
        since = self.outstanding.get(number)
        if since and isinstance(result, Result):
            self.latencies_s.append(max(0.0, now - since))
        self.delivered.add(number)
        self._revisions.pop(number, None)
        if self._interims is not None and self._interims.number <= number:
            self._interims = None  # too late for any interim of it
        if isinstance(result, Result):
            out.append(
                ev.Final(
                    segment=number,
                    text=result.text,
                    start_ms=result.start_ms,
                    end_ms=result.end_ms,
                    words=result.words,
                    engine=result.engine,
                    inference_ms=result.inference_ms,
                    language=result.language,
                )
            )
            self._commit_text(number, result.text)
            if result.language and result.text and number > self.session_language[0]:
                self.session_language = (number, result.language)
        else:
            self._errored.add(number)
            out.append(ev.Error(code=result.code, message=result.message, segment=number))
        self.outstanding.pop(number, None)

    def _interim_result(self, result: Result, out: list[Output]) -> None:
        state = self._interims
        number = result.segment
        if state is None or state.number != number or number in self.delivered:
            self.interims_dropped += 1
            return
        if result.revision <= state.shown or number in self._revisions:
            self.interims_dropped += 1  # older than one shown, or its final is on the way
            return
        state.shown = result.revision
        words = state.merge(list(result.words))
        out.append(
            ev.Interim(
                segment=number,
                text=" ".join(w.word for w in words) if words else result.text,
                start_ms=result.start_ms,
                end_ms=result.end_ms,
                words=words,
                stable_prefix=len(state.committed),
            )
        )

    def failed_segment(
        self, segment: Segment, code: str, message: str, overloaded: bool = False
    ) -> list[Output]:
        """A segment the edge could not queue: the device is told, a resume will not wait for it."""
        number = segment.segment
        if not segment.final:
            return []  # an interim look: the final will be asked for anyway
        if self._revisions.get(number) != segment.revision:
            candidate = self._candidate
            if candidate is not None and candidate.revision == segment.revision:
                self._void_candidate()  # the confirmed utterance is queued afresh
            return []
        self.failed.append(number)
        del self.failed[: max(0, len(self.failed) - 100)]
        self.outstanding.pop(number, None)
        self._revisions.pop(number, None)
        event: ev.ServerEvent = (
            ev.Overloaded(message=message, segment=number)
            if overloaded
            else ev.Error(code=code, message=message, segment=number)
        )
        return [event]

    def owes(self, number: int) -> bool:
        return number in self.outstanding

    def stale(self, older_than_s: float, now: float) -> bool:
        """Some result has been owed longer than this: worth looking it up in the store."""
        return any(now - t > older_than_s for t in self.outstanding.values())
