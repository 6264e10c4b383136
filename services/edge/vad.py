"""Utterance segmentation with webrtcvad: a plain class fed PCM, returning events.

No I/O here. The edge feeds every byte of the session timeline in order; the
segmenter answers with `SpeechStart` as soon as the VAD hears someone speaking
(two voiced frames of three: `onset_voiced`, sooner than the utterance's own
start, three of four), with `Discarded` where that was not speech after all,
and with an `Utterance` when the speech has ended (trailing silence of
`endpoint_ms`), was cut at `max_utterance_ms`, or was flushed.

Between the two, once the trailing silence reaches the pad that goes with a
segment (`trailing_pad_ms`), it announces a `Pause` holding the utterance
exactly as it will be emitted if the silence lasts until the endpoint: the
edge can have it decoded while it waits for the endpoint. If speech comes back
first, `Resumed` says that utterance goes on.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import webrtcvad

from services.common.audio import SUPPORTED_RATES


@dataclass(frozen=True, slots=True)
class SpeechStart:
    t_ms: int  # onset of the first voiced frame


@dataclass(frozen=True, slots=True)
class Utterance:
    start_ms: int  # includes the pre-roll
    end_ms: int  # includes the trailing pad
    last_voiced_ms: int  # end of the last voiced frame
    pcm: bytes
    cut: bool = False  # ended by max_utterance_ms, speech goes on
    voiced: tuple[tuple[int, int], ...] = ()  # (start_ms, end_ms) of each run of voiced frames


@dataclass(frozen=True, slots=True)
class Discarded:
    """Voice activity too short to be speech (a click, a cough)."""

    start_ms: int
    end_ms: int


@dataclass(frozen=True, slots=True)
class Pause:
    """Trailing silence reached the pad: the utterance ends as `utterance` unless speech resumes."""

    utterance: Utterance


@dataclass(frozen=True, slots=True)
class Resumed:
    """Speech came back after a `Pause`: that utterance goes on."""

    t_ms: int


Event = SpeechStart | Utterance | Discarded | Pause | Resumed


@dataclass(frozen=True, slots=True)
class VadConfig:
    mode: int = 3
    frame_ms: int = 30
    start_frames: int = 4  # window looked at to decide speech has started
    start_voiced: int = 3  # voiced frames in that window needed to start
    # `SpeechStart` comes sooner, on fewer voiced frames (onset_voiced 0: with the start).
    # The utterance still begins where the start rule says, so its audio, and so its
    # words, are what they would be without it; a `SpeechStart` that the start rule does
    # not follow (fewer than onset_voiced voiced of the last start_frames) ends in a
    # `Discarded`, as a blip too short to be speech does.
    onset_frames: int = 3
    onset_voiced: int = 2
    preroll_ms: int = 300
    endpoint_ms: int = 500  # trailing silence that ends an utterance
    trailing_pad_ms: int = (
        120  # of that silence (whole 30 ms frames), how much goes with the segment
    )
    min_speech_ms: int = 150
    max_utterance_ms: int = 15000
    announce_pauses: bool = False  # emit Pause / Resumed (for early finals)


class Segmenter:
    def __init__(self, sample_rate: int, config: VadConfig | None = None) -> None:
        if sample_rate not in SUPPORTED_RATES:
            raise ValueError(f"sample rate {sample_rate} not in {SUPPORTED_RATES}")
        self.config = cfg = config or VadConfig()
        self.sample_rate = sample_rate
        self._vad = webrtcvad.Vad(cfg.mode)
        self._frame_bytes = sample_rate * cfg.frame_ms // 1000 * 2
        self._rest = b""
        self._t_frames = 0  # frames consumed so far
        self._preroll: deque[tuple[bytes, bool]] = deque(
            maxlen=max(cfg.preroll_ms // cfg.frame_ms, cfg.start_frames)
        )
        self._in_speech = False
        self._frames: list[bytes] = []  # current utterance
        self._voiced: list[bool] = []
        self._start_frame = 0
        self._trailing_unvoiced = 0
        self._continued = False  # current piece follows a cut: speech already confirmed
        self._paused = False  # a Pause was announced for the current utterance
        self._announced: int | None = None  # onset told by the onset rule, before a start

    @property
    def in_speech(self) -> bool:
        return self._in_speech

    @property
    def trailing_silence_ms(self) -> int:
        """Unvoiced time since the last voiced frame of the utterance in progress."""
        return self._ms(self._trailing_unvoiced) if self._in_speech else 0

    @property
    def position_ms(self) -> int:
        return self._t_frames * self.config.frame_ms

    def _ms(self, frames: int) -> int:
        return frames * self.config.frame_ms

    def feed(self, pcm: bytes) -> list[Event]:
        data = self._rest + pcm if self._rest else pcm
        n = len(data) // self._frame_bytes
        events: list[Event] = []
        fb = self._frame_bytes
        for i in range(n):
            frame = data[i * fb : (i + 1) * fb]
            voiced = self._vad.is_speech(frame, self.sample_rate)
            self._step(frame, voiced, events)
        self._rest = data[n * fb :]
        return events

    def _step(self, frame: bytes, voiced: bool, events: list[Event]) -> None:
        cfg = self.config
        self._t_frames += 1
        if not self._in_speech:
            self._preroll.append((frame, voiced))
            pre = list(self._preroll)
            window = pre[-cfg.start_frames :]
            heard = sum(v for _, v in window)
            if heard >= cfg.start_voiced:
                self._in_speech = True
                if self._announced is None:
                    events.append(SpeechStart(t_ms=self._onset(window)))
                self._announced = None
                self._frames = [f for f, _ in pre]
                self._voiced = [v for _, v in pre]
                self._start_frame = self._t_frames - len(pre)
                self._trailing_unvoiced = 0
                self._preroll.clear()
            elif self._announced is None:
                early = pre[-cfg.onset_frames :]
                if cfg.onset_voiced > 0 and sum(v for _, v in early) >= cfg.onset_voiced:
                    self._announced = self._onset(early)
                    events.append(SpeechStart(t_ms=self._announced))
            elif heard < cfg.onset_voiced:  # told, and the start never came
                events.append(self._unannounce())
            return
        self._frames.append(frame)
        self._voiced.append(voiced)
        self._trailing_unvoiced = 0 if voiced else self._trailing_unvoiced + 1
        if voiced and self._paused:
            self._paused = False
            events.append(Resumed(t_ms=self._ms(self._t_frames - 1)))
        if self._ms(self._trailing_unvoiced) >= cfg.endpoint_ms:
            events.append(self._end())
        elif self._ms(len(self._frames) + 1) > cfg.max_utterance_ms:  # one more would overrun
            events.append(self._cut())
        elif (
            cfg.announce_pauses
            and self._trailing_unvoiced == self._pad_frames
            and self._pad_frames > 0
            and not self._paused
        ):
            preview = self._emit(len(self._frames), cut=False)
            if isinstance(preview, Utterance):
                self._paused = True
                events.append(Pause(preview))

    def _onset(self, window: list[tuple[bytes, bool]]) -> int:
        """The onset of the first voiced frame of `window` (the newest frames)."""
        first = next(i for i, (_, v) in enumerate(window) if v)
        return self._ms(self._t_frames - len(window) + first)

    def _unannounce(self) -> Discarded:
        start, self._announced = self._announced or 0, None
        return Discarded(start_ms=start, end_ms=self.position_ms)

    @property
    def _pad_frames(self) -> int:
        return self.config.trailing_pad_ms // self.config.frame_ms

    def current(self) -> Utterance | None:
        """The utterance in progress as it stands (for an interim look), or None."""
        if not self._in_speech or not self._frames:
            return None
        keep = len(self._frames) - max(0, self._trailing_unvoiced - self._pad_frames)
        event = self._emit(keep, cut=False)
        return event if isinstance(event, Utterance) else None

    def _spans(self, voiced: list[bool]) -> tuple[tuple[int, int], ...]:
        spans: list[tuple[int, int]] = []
        run_start: int | None = None
        for i, v in enumerate([*voiced, False]):
            if v and run_start is None:
                run_start = i
            elif not v and run_start is not None:
                spans.append(
                    (self._ms(self._start_frame + run_start), self._ms(self._start_frame + i))
                )
                run_start = None
        return tuple(spans)

    def _emit(self, n_frames: int, cut: bool) -> Utterance | Discarded:
        """Emit the first n_frames of the current utterance."""
        cfg = self.config
        frames, voiced = self._frames[:n_frames], self._voiced[:n_frames]
        start = self._start_frame
        last_voiced = max((i for i, v in enumerate(voiced) if v), default=-1)
        # The piece after a cut continues speech already confirmed: however short,
        # dropping it would clip the last word. Only a voiceless one is dropped.
        min_ms = min(cfg.min_speech_ms, cfg.frame_ms) if self._continued else cfg.min_speech_ms
        if self._ms(sum(voiced)) < min_ms:
            return Discarded(start_ms=self._ms(start), end_ms=self._ms(start + n_frames))
        return Utterance(
            start_ms=self._ms(start),
            end_ms=self._ms(start + n_frames),
            last_voiced_ms=self._ms(start + last_voiced + 1),
            pcm=b"".join(frames),
            cut=cut,
            voiced=self._spans(voiced),
        )

    def _end(self) -> Utterance | Discarded:
        cfg = self.config
        keep = len(self._frames) - self._trailing_unvoiced
        keep += min(self._trailing_unvoiced, cfg.trailing_pad_ms // cfg.frame_ms)
        event = self._emit(keep, cut=False)
        self._reset_idle()
        return event

    def _cut(self) -> Utterance | Discarded:
        """Max length reached: cut at the last unvoiced frame of the final second."""
        cfg = self.config
        n = len(self._frames)
        lookback = max(1, 1000 // cfg.frame_ms)
        cut_at = n
        for i in range(n - 1, max(0, n - lookback) - 1, -1):
            if not self._voiced[i]:
                cut_at = i + 1
                break
        event = self._emit(cut_at, cut=True)
        self._start_frame += cut_at
        self._frames = self._frames[cut_at:]
        self._voiced = self._voiced[cut_at:]
        # What is left is voiced (or empty, when the cut fell in a pause): the
        # silence counted so far went out with the piece just cut.
        self._trailing_unvoiced = 0
        self._continued = True
        self._paused = False
        return event

    def flush(self) -> list[Event]:
        """Finalize: emit the utterance in progress (if any) now."""
        if not self._in_speech:
            return [self._unannounce()] if self._announced is not None else []
        if not self._frames:
            self._reset_idle()
            return []
        return [self._end()]  # silence beyond the pad is not part of it, as at an endpoint

    def _reset_idle(self) -> None:
        self._in_speech = False
        self._announced = None
        self._frames = []
        self._voiced = []
        self._trailing_unvoiced = 0
        self._continued = False
        self._paused = False
        self._preroll.clear()
