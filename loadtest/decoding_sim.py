"""Decoding-policy benchmark: streamed finals vs whole-file offline, on real speech.

    python -m loadtest.decoding_sim --model tiny.en --variants C25RW,C25,GP

Measured 2026-12-01 (2 shared cores, CPU, 2 threads; real+jfk = 590 words; offline
float32 / int8 beam 5: tiny.en 2.4 / 2.4 %, base 3.1 / 2.7 %). Streamed model int8
unless said. "gap" = streamed WER minus offline float32 / int8, in points. ins/100 =
inserted words per 100 reference words (offline: tiny 0.0 / 4.1-4.6, base 0.0 / 2.0 at
10 / 5 dB). CPU s/s over the files run; p50/p95 ms per decode call, inflated by other
jobs on the box (+-30 %); "-" = not run on that group.

| model | variant | WER | S/D/I | gap f32/i8 | espeak | probe | ins 10/5 dB | CPU s/s | p50/p95 ms |
|---|---|---|---|---|---|---|---|---|---|
| tiny.en | A independent cuts | 8.1 | 35/3/10 | +5.8/+5.8 | - | 0 | - | 0.105 | 295-427/347-495 |
| tiny.en | A5 cuts, beam 5 | 6.8 | 30/2/8 | +4.4/+4.4 | - | 0 | - | 0.110 | 452/679 |
| tiny.en | D context 8 s re-decoded | 6.9 | 23/14/4 | +4.6/+4.6 | - | 0 | - | 0.113 | 482/909 |
| tiny.en | GP old budget (bug) | 5.1 | 22/3/5 | +2.7/+2.7 | 12.2 | 1 | 1.0/2.0 | 0.098 | 347/444 |
| tiny.en | GPF old budget, float32 | 5.1 | 22/4/4 | +2.7/+2.7 | - | 0 | - | 0.169 | 696/1079 |
| tiny.en | C4 old budget | 6.6 | 32/1/6 | +4.2/+4.2 | - | 0 | - | 0.109 | 497/1058 |
| tiny.en | C15 old budget | 14.9 | 22/61/5 | +12.5 | - | 0 | - | 0.124 | 579/1141 |
| tiny.en | E700 old budget | 4.7 | 21/3/4 | +2.4 | - | 0 | - | 0.125 | 382/700 |
| tiny.en | GP context 8 s, prefix | 4.9 | 22/2/5 | +2.5/+2.5 | - | 0 | - | 0.124 | 459/789 |
| tiny.en | B5 GP + beam 5 | 4.2 | 18/4/3 | +1.9/+1.9 | - | 0 | - | 0.168 | 482/653 |
| tiny.en | R5 GP + retry on avg logprob | = GP (never fired) | | | | | | 0.121 | 419/524 |
| tiny.en | RW GP + retry on word p<0.5 | 4.1 | 19/2/3 | +1.7/+1.7 | - | 0 | - | 0.154 | 379/696 |
| tiny.en | TS GP + timestamp tokens | 5.8 | 24/4/6 | +3.4/+3.4 | - | 0 | - | 0.141 | 374/507 |
| tiny.en | TS15 timestamps, ctx 15 s | 17.1 | 17/80/4 | +14.7 | - | 0 | - | 0.144 | 395/502 |
| tiny.en | C15 context 15 s | 4.7 | 21/2/5 | +2.4/+2.4 | - | 0 | - | 0.130 | 702/992 |
| tiny.en | C15B5 + beam 5 | 3.7 | 16/4/2 | +1.4/+1.4 | - | 0 | - | 0.165 | 575/778 |
| tiny.en | C20 context 20 s | 3.7 | 17/2/3 | +1.4/+1.4 | - | 0 | - | 0.143 | 497-561/879 |
| tiny.en | C20B5 + beam 5 | 3.9 | 18/3/2 | +1.5/+1.5 | - | 0 | - | 0.153 | 718/1183 |
| tiny.en | C20RW + retry word p<0.5 | 3.6 | 16/3/2 | +1.2/+1.2 | - | 0 | - | 0.149 | 735/1243 |
| tiny.en | C25 context 25 s | 3.6 | 16/2/3 | +1.2/+1.2 | 8.9 | 0 | 0.5/2.6 | 0.100 all, 0.146-0.162 real | 562/720 |
| tiny.en | C30 context fills window | 3.6 | 16/2/3 | +1.2/+1.2 | - | 0 | - | 0.145 | 655/1188 |
| **tiny.en** | **C25RW (default)** | **3.1** | **14/2/2** | **+0.7/+0.7** | **4.1** | **0** | **0.0/2.0** | **0.117 all, 0.194 real** | **586-622/925-1176** |
| tiny.en | C25RW3 retry with beam 3 | 3.1 | 13/2/3 | +0.7/+0.7 | - | - | - | 0.156 | (loaded box) |
| tiny.en | C25RW35 retry when p < 0.35 | 3.6 | 15/2/4 | +1.2/+1.2 | - | - | - | 0.145 | (loaded box) |
| tiny.en | C25P context as previous text + forced start timestamp | 4.1 | 17/2/5 | +1.7/+1.7 | - | - | - | 0.126 | (loaded box) |
| tiny.en | C25RWP C25P + retry | 3.7 | 16/1/5 | +1.4/+1.4 | - | 0 | 0.0 | 0.123 | 449/722 |
| tiny.en | C25B5P C25P, beam 5 | 4.1 | 17/1/6 | +1.7/+1.7 | - | - | - | 0.131 | (loaded box) |
| tiny.en | C25RW7P C25RWP, retry when p < 0.7 | 4.1 | 17/1/6 | +1.7/+1.7 | - | - | - | 0.145 | (loaded box) |
| tiny.en | C25RWT retry forcing only the last 3 s of context | 3.7 | 15/1/6 | +1.3/+1.3 | - | - | - | 0.155 | (loaded box) |
| tiny.en | C25RWT6 the same, last 6 s | 4.4 | 18/2/6 | +2.0/+2.0 | - | - | - | 0.153 | (loaded box) |
| **tiny.en** | **C25RW, Silero on the segment only (default; quiet box, new espeak voice)** | **3.1** | **13/2/3** | **+0.7/+0.7** | **6.5** | **0** | **1.0/0.0** | **0.198** | **527/990** |
| tiny.en | C25RWR forced context, retry with it as previous text | 3.2 | 14/1/4 | +0.8/+0.8 | 4.1 | 0 | 0.0/0.0 | 0.180 | 523/695 |
| tiny.en | C25RW again (quiet box, 210 ms pad) | 3.1 | 13/2/3 | +0.7/+0.7 | - | 0 | - | 0.193 | 501/984 |
| **tiny.en** | **PAD120: C25RW with a 120 ms trailing pad (default since)** | **3.1** | **13/2/3** | **+0.7/+0.7** | **-** | **0** | **-** | **0.201** | **522/1035** |
| tiny.en | PAD150, 150 ms pad | 3.4 | 15/2/3 | +1.0/+1.0 | - | 0 | - | 0.196 | 511/1057 |
| tiny.en | PAD90, 90 ms pad | 3.2 | 14/2/3 | +0.8/+0.8 | - | 0 | - | 0.201 | 524/1210 |
| tiny.en | C25RWR again (210 ms pad) | 3.2 | 14/1/4 | +0.8/+0.8 | - | 0 | - | 0.180 | 526/644 |
| tiny.en | PAD120R, 120 ms pad, the retry reading the context as previous text | 3.6 | 16/1/4 | +1.2/+1.2 | - | 0 | - | 0.182 | 521/679 |
| tiny.en | W1, the encoder window cut to the audio + 1 s (not 30 s) | 31.4 | 37/48/100 | +29.0 | - | 0 | - | 0.175 | 560/1492 |
| tiny.en | W3, the same, audio + 3 s | 12.0 | 21/4/46 | +9.7 | - | 0 | - | 0.202 | 577/1422 |
| tiny.en | X20: a 20 s encoder window (2,000 frames), context + segment <= 17 s, 1 thread | 12.2 | 26/7/39 | +9.8 | - | 0 | - | 0.094 | 342/565 |
| tiny.en | X24: 24 s (2,400 frames), <= 21 s | 7.3 | 23/1/19 | +4.9 | - | 0 | - | 0.115 | 438/682 |
| tiny.en | X27: 27 s (2,700 frames), <= 24 s | 4.1 | 18/3/3 | +1.7 | - | 0 | - | 0.144 | 563/800 |
| tiny.en | DEF beside them (30 s, <= 25 s), 1 thread | 3.1 | 13/2/3 | +0.7 | - | 0 | - | 0.168 | 631/886 |
| tiny.en | DEF again (2026-12-01 evening, loaded box) | 3.1 | 13/2/3 | - | 4.9 | 0 | 1.0/0.0 | 0.138 | 638/1168 |
| **tiny.en** | **NS4: DEF + no speech when the model says so and every kept word has p < 0.4 (default since)** | **3.1** | **13/2/3** | **-** | **4.9** | **0 (raw: the two "Mmm" finals gone)** | **1.0/0.0** | **0.141** | **596/1137** |
| tiny.en | NS5, the same below 0.5 | 3.1 | 13/2/3 | - | 4.9 | 0 | 1.0/0.0 | 0.149 | 645/1302 |
| base | GP context 8 s | 4.7 | 18/4/6 | +1.7/+2.0 | - | 0 | - | 0.249 | 1057/1736 |
| **base** | **C25 (for_model(True))** | **2.9** | **13/3/1** | **-0.2/+0.2** | **5.7** | **0** | **0.5/2.0** | **0.319 real, 0.153 noise** | **1193/1527** |
| base | C25 again (2026-12-01 evening) | 3.2 | 13/4/2 | - | 5.7 | 0 | 1.0/1.5 | 0.242 | 1025/2159 |
| base | NS4B: C25 + the NS4 gate (default since) | 3.2 | 13/4/2 | - | 5.7 | 0 | 1.0/1.5 | 0.246 | 1120/1605 |
| base | C25RW | 3.2 | 14/4/1 | +0.2/+0.5 | - | 0 | - | 0.419 | 1023/2508 |

The trailing pad (silence kept after the last voiced frame) decides when the early
final's decode can start: the edge publishes the candidate once the silence reaches the
pad. 120 ms keeps the WER of 210 ms (PAD rows; 90-150 ms move it by 0-2 words, within
run-to-run noise) and starts every final's decode 90 ms sooner. A shorter encoder
window (W rows: CTranslate2 accepts fewer than 3,000 frames, and the encoder costs
~7 times less for 10 s than for 30 s) is what would cut CPU most, since the encoder is
~70 % of a final's CPU time on one thread; but Whisper then repeats itself after the
speech ("You are now muted You are now muted") or loops until the compression gate
drops the segment: it needs its 30 s window, padding included. Shorter windows with
the context cut to leave the usual padding (X rows, 2026-12-02) show the same: on one
thread the encoder costs 383 / 242 / 136 ms for 30 / 24 / 20 s, but the decoder repeats
the forced context inside the new segment ("you are no longer muted YOU ARE NO LONGER
MUTED"), words a time filter on the alignment cannot catch (they align inside the
segment), and even 27 s costs a point of WER.

Forced context costs a decoder step per context token: CTranslate2 reads the
prompt up to `<|notimestamps|>` in one pass and forces every text token after it
one step at a time. On one real 25 s window (45 context tokens, tiny.en int8, 2
threads, median of 5): greedy forced 164 ms, beam 3 forced 237, beam 5 forced
236, beam 5 with the context as previous text 66, greedy that way 45 (encoder
~180 ms). So beam 3 saves nothing, and reading the context as previous text
(`<|startofprev|>` context, sot sequence, a forced timestamp at the segment
start: `context_in_prompt`) is 3-4 times cheaper, but costs 0.3-1.0 points of
WER when the greedy pass reads it that way (C25P, C25RWP rows), which the
finals cannot spare: the greedy pass forces the context, interim looks read it
as previous text (`WhisperEngine.look_policy`). The beam-5 retry could too
(C25RWR: one loaded-box run measured 3.4 %, the quiet rerun 3.2 %, against 3.1 %
for the forced retry; in noise it invents less; `retry_context_in_prompt`), but it
is not the default yet (see the comment on that knob). Rows marked "loaded box" ran
beside other jobs (load average 5-8): their WER is exact, their times are not.

"old budget" rows ran before the fix of the token budget: CTranslate2 returns at most
`max_length // 2` tokens after the sot sequence, forced context included, and the
decoder asked for len(prompt) + budget, so a long forced context left the new words a
handful of tokens ("You are now unm", "Press DAR to"). That, not the prefix itself, is
why forced context lost words with base and with 15 s of context; after the fix longer
context only helps, and costs little (the encoder always sees 30 s). Timestamp tokens
stay off: even with the context closed by its own timestamp they lose words. The edge
must send up to 25 s of context with context + segment <= 30 s, or the decoder drops
the whole context (the edge keeps it within 28 s: `WINDOW_MS` below). Silero, endpoint
700 with the fixed budget, the prompt and int8 vs float32 with the winner were not
measured (the variants exist: SIL, E700, PR, GPF). What is left of the gap is mostly what offline gets wrong too ("press
DAR", "say this", "be recorded"), the first utterance of a session (no context: "call
for reading" for "call forwarding") and word endings at a cut ("too" for "to").

How it works. The corpus is `loadtest.realspeech`'s, as `loadtest.accuracy`
builds it: six 60 s sessions of Asterisk prompts on room noise plus the JFK clip
("real", the headline figure), espeak-ng in room noise, a 120 s non-speech
probe, and the first two sessions mixed with room noise at 10 and 5 dB SNR.
Each file is cut by the edge's own `Segmenter` (services/edge/vad.py); each
utterance becomes what the edge sends (services/edge/stream.py): the segment
audio with its own voiced spans, and as left context the audio from the start
of the earliest of the utterances just before it that began within
`context_ms` and all said something, with their final texts joined as
`context_text` (finals computed in order, so the run is deterministic). It is
decoded by the shipped `services.worker.decoding.decode`. The yardstick is the
whole file decoded offline exactly as `loadtest.accuracy` does
(`WhisperModel.transcribe(audio, language="en", beam_size=5)`), both at the
default compute type (float32 on CPU for these models) and at int8. Scoring is
`loadtest.realspeech.score` (Whisper's English normaliser, jiwer).

Reported per variant: pooled WER (S/D/I) on real+jfk, the gap to offline
float32 and int8, WER on espeak-in-noise, words on the probe, inserted words per
100 reference words at 10 / 5 dB, decode CPU-seconds per audio-second (process
CPU time of the decode calls / audio duration of all files), p50/p95 wall ms per
decode call. `--show N` prints the N worst real files, aligned.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loadtest import realspeech as rs
from loadtest.corpus import Item
from services.edge.settings import EdgeSettings
from services.edge.vad import Segmenter, Utterance, VadConfig
from services.worker.decoding import DecodePolicy, DecodeRequest, decode

SR = 16000
# context + segment at most, as the edge sends them (28 s: within Whisper's 30 s window
# and a NATS message). Until 2026-12-02 this was 30 s, so the rows above have up to 2 s
# more context than the edge sent: DEF measured 3.1 % (13/2/3) at 30 s, 3.2 % (14/2/3)
# at the edge's window, on real+jfk in the same run.
WINDOW_MS = EdgeSettings().window_ms_at(SR)


@dataclass(frozen=True)
class Variant:
    """A decoding policy plus what the edge sends with each segment."""

    policy: DecodePolicy = field(default_factory=DecodePolicy)
    endpoint_ms: int = 500
    pad_ms: int = 120  # trailing silence kept with a segment (the edge's trailing_pad_ms)
    context_ms: int = 8000  # 0: independent cuts
    prefix: bool = True  # send the context's committed text (forced as Whisper's prefix)
    prompt_chars: int = 0  # committed text before the context, as the edge's prompt
    compute_type: str = "int8"  # the streamed model's
    note: str = ""


P = DecodePolicy


def P0(**knobs: object) -> DecodePolicy:
    """A policy without the beam-5 retry (the default before it was measured)."""
    return DecodePolicy(**{"retry_beam_size": 0, **knobs})  # type: ignore[arg-type]


VARIANTS: dict[str, Variant] = {
    "A": Variant(P0(), context_ms=0, note="independent cuts"),
    "A5": Variant(P0(beam_size=5), context_ms=0, note="independent cuts, beam 5"),
    "D": Variant(P0(), prefix=False, note="context re-decoded, no prefix"),
    "GP": Variant(P0(), note="context <= 8 s forced as prefix (current default)"),
    "GPF": Variant(P0(), compute_type="float32", note="GP, float32 model"),
    "B5": Variant(P0(beam_size=5), note="GP + beam 5"),
    "R5": Variant(
        P(retry_beam_size=5, retry_word_probability=0.0), note="GP + beam-5 retry on low confidence"
    ),
    "TS": Variant(P0(without_timestamps=False), note="GP + timestamp tokens"),
    "C4": Variant(P0(), context_ms=4000, note="GP, context <= 4 s"),
    "C15": Variant(P0(), context_ms=15000, note="GP, context <= 15 s"),
    "E700": Variant(P0(), endpoint_ms=700, note="GP, endpoint 700 ms"),
    "SIL": Variant(P0(silero=True), note="GP + Silero second opinion"),
    "C20": Variant(P0(), context_ms=20000, note="GP, context <= 20 s"),
    "C25": Variant(P0(), context_ms=25000, note="GP, context <= 25 s"),
    "C30": Variant(P0(), context_ms=30000, note="GP, context fills the 30 s window"),
    "C20B5": Variant(P0(beam_size=5), context_ms=20000, note="C20 + beam 5"),
    "C20RW": Variant(
        P(retry_beam_size=5, retry_word_probability=0.5),
        context_ms=20000,
        note="C20 + beam-5 retry when a word has p < 0.5",
    ),
    "C25RW": Variant(
        P(retry_beam_size=5, retry_word_probability=0.5, retry_context_in_prompt=False),
        context_ms=25000,
        note="C25 + beam-5 retry when a word has p < 0.5",
    ),
    "C25RWS": Variant(
        P(retry_beam_size=5, retry_word_probability=0.5, silero=True),
        context_ms=25000,
        note="C25RW + Silero second opinion on each word",
    ),
    "C25RWP": Variant(
        P(retry_beam_size=5, retry_word_probability=0.5, context_in_prompt=True),
        context_ms=25000,
        note="C25RW, context text as previous text + forced start timestamp",
    ),
    "C25B5P": Variant(
        P0(beam_size=5, context_in_prompt=True),
        context_ms=25000,
        note="C25P + beam 5 always",
    ),
    "C25RW7P": Variant(
        P(retry_beam_size=5, retry_word_probability=0.7, context_in_prompt=True),
        context_ms=25000,
        note="C25RWP, retry when a word has p < 0.7",
    ),
    "C25RWR": Variant(
        P(retry_beam_size=5, retry_word_probability=0.5, retry_context_in_prompt=True),
        context_ms=25000,
        note="C25RW, the retry with the context text as previous text",
    ),
    "C25RW3": Variant(
        P(retry_beam_size=3, retry_word_probability=0.5),
        context_ms=25000,
        note="C25RW, retry with beam 3",
    ),
    "C25RW35": Variant(
        P(retry_beam_size=5, retry_word_probability=0.35),
        context_ms=25000,
        note="C25RW, retry when a word has p < 0.35",
    ),
    "NS4": Variant(
        DecodePolicy.for_model(False, unsure_no_speech_probability=0.4),
        context_ms=25000,
        note="DEF, no speech when the model says so and every word has p < 0.4",
    ),
    "NS5": Variant(
        DecodePolicy.for_model(False, unsure_no_speech_probability=0.5),
        context_ms=25000,
        note="DEF, the same below 0.5",
    ),
    "NS4B": Variant(
        P0(unsure_no_speech_probability=0.4),
        context_ms=25000,
        note="C25 (base's default) with the NS4 gate",
    ),
    "DEF": Variant(
        DecodePolicy.for_model(False),
        context_ms=25000,
        note="the shipped default for tiny.en",
    ),
    "C25RWT": Variant(
        P(
            retry_beam_size=5,
            retry_word_probability=0.5,
            retry_forced_tail_s=3.0,
            retry_context_in_prompt=False,
        ),
        context_ms=25000,
        note="C25RW, the retry forcing only the last 3 s of context text",
    ),
    "C25RWT6": Variant(
        P(
            retry_beam_size=5,
            retry_word_probability=0.5,
            retry_forced_tail_s=6.0,
            retry_context_in_prompt=False,
        ),
        context_ms=25000,
        note="C25RW, the retry forcing only the last 6 s of context text",
    ),
    "PAD120": Variant(
        DecodePolicy.for_model(False), context_ms=25000, pad_ms=120, note="DEF, 120 ms pad"
    ),
    "PAD150": Variant(
        DecodePolicy.for_model(False), context_ms=25000, pad_ms=150, note="DEF, 150 ms pad"
    ),
    "PAD90": Variant(
        DecodePolicy.for_model(False), context_ms=25000, pad_ms=90, note="DEF, 90 ms pad"
    ),
    "PAD120R": Variant(
        DecodePolicy.for_model(False, retry_context_in_prompt=True),
        context_ms=25000,
        pad_ms=120,
        note="PAD120, the retry with the context text as previous text",
    ),
    "C25P": Variant(
        P0(context_in_prompt=True),
        context_ms=25000,
        note="C25, context text as previous text + forced start timestamp",
    ),
    "C15B5": Variant(P0(beam_size=5), context_ms=15000, note="C15 + beam 5"),
    "TS15": Variant(P0(without_timestamps=False), context_ms=15000, note="C15 + timestamp tokens"),
    "RW": Variant(
        P(retry_beam_size=5, retry_word_probability=0.5),
        note="GP + beam-5 retry when a word has p < 0.5",
    ),
    "RW15": Variant(
        P(retry_beam_size=5, retry_word_probability=0.5),
        context_ms=15000,
        note="C15 + beam-5 retry when a word has p < 0.5",
    ),
    "PR": Variant(P0(prompt_chars=200), prompt_chars=200, note="GP + prompt of earlier finals"),
}


# -- corpus ----------------------------------------------------------------------


@dataclass
class File:
    item: Item
    group: str  # real | jfk | espeak | probe | snr10 | snr5
    audio: np.ndarray  # float32 16 kHz

    @property
    def name(self) -> str:
        return self.item.name


def build_files(groups: list[str], cache_dir: Path | None = None) -> list[File]:
    """The corpus of `loadtest.accuracy --full` for these groups (cached on disk)."""
    items: list[tuple[Item, str]] = []
    corpus = rs.real_corpus(cache_dir, SR, sessions=6, session_s=60)
    real = [i for i in corpus.items if i.name != "jfk"]
    if "real" in groups:
        items += [(i, "real") for i in real]
    if "jfk" in groups:
        items += [(i, "jfk") for i in corpus.items if i.name == "jfk"]
    if "espeak" in groups:
        items += [(i, "espeak") for i in rs.espeak_in_noise(cache_dir, SR, items=4).items]
    if "probe" in groups:
        items.append((rs.noise_probe(cache_dir, SR, 120.0), "probe"))
    for snr in (10, 5):
        if f"snr{snr}" in groups:
            items += [(rs.mix_snr(i, snr), f"snr{snr}") for i in real[:2]]
    return [
        File(i, g, np.frombuffer(i.pcm, np.int16).astype(np.float32) / 32768.0) for i, g in items
    ]


# -- simulation of the edge ------------------------------------------------------


def segment(audio: np.ndarray, endpoint_ms: int, pad_ms: int = 120) -> list[Utterance]:
    pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16).tobytes()
    seg = Segmenter(SR, VadConfig(endpoint_ms=endpoint_ms, trailing_pad_ms=pad_ms))
    return [e for e in seg.feed(pcm) + seg.flush() if isinstance(e, Utterance)]


def context_first(utts: list[Utterance], texts: list[str], i: int, context_ms: int) -> int:
    """First utterance of the left context of `i`, as the edge picks it (services/edge/stream.py
    `_context`): the run just before `i` that began within `context_ms`, all with text,
    and context plus segment within Whisper's 30 s window."""
    first = i
    while (
        context_ms > 0
        and first > 0
        and texts[first - 1]
        and 0 < utts[i].start_ms - utts[first - 1].start_ms <= context_ms
        and utts[i].end_ms - utts[first - 1].start_ms <= WINDOW_MS
    ):
        first -= 1
    return first


def request_for(
    audio: np.ndarray, utts: list[Utterance], texts: list[str], i: int, v: Variant
) -> DecodeRequest:
    u = utts[i]
    first = context_first(utts, texts, i, v.context_ms)
    c0 = utts[first].start_ms
    prompt = ""
    if v.prompt_chars > 0:
        prompt = " ".join(t for t in texts[:first] if t)[-v.prompt_chars :].lstrip()
    return DecodeRequest(
        audio=audio[c0 * SR // 1000 : u.end_ms * SR // 1000],
        segment_start_s=(u.start_ms - c0) / 1000,
        prompt=prompt,
        context_text=" ".join(texts[first:i]) if v.prefix else "",
        voiced=tuple(((a - c0) / 1000, (b - c0) / 1000) for a, b in u.voiced),
    )


@dataclass
class FileRun:
    texts: list[str]
    cpu_s: float
    wall_ms: list[float]
    dropped: int
    skipped: list[str]
    retried: int = 0


def run_file(model, f: File, v: Variant) -> FileRun:
    utts = segment(f.audio, v.endpoint_ms, v.pad_ms)
    run = FileRun([], 0.0, [], 0, [])
    for i in range(len(utts)):
        req = request_for(f.audio, utts, run.texts, i, v)
        cpu, wall = time.process_time(), time.perf_counter()
        d = decode(model, req, v.policy)
        run.cpu_s += time.process_time() - cpu
        run.wall_ms.append((time.perf_counter() - wall) * 1000)
        run.dropped += d.dropped
        run.retried += d.beam_used != v.policy.beam_size
        run.skipped.append(d.skipped)
        run.texts.append(d.text.strip())
    return run


# -- offline yardstick --------------------------------------------------------------


def offline(model, f: File, cache: Path) -> str:
    """The whole file as `loadtest.accuracy.decode_offline` decodes it (cached by audio)."""
    key = cache / f"{hashlib.sha1(f.item.pcm).hexdigest()[:16]}.txt"
    if key.exists():
        return key.read_text()
    segments, _ = model.transcribe(f.audio, language="en", beam_size=5)
    text = " ".join(s.text.strip() for s in segments if s.text.strip())
    key.parent.mkdir(parents=True, exist_ok=True)
    key.write_text(text)
    return text


def pooled(pairs) -> rs.Counts:  # type: ignore[no-untyped-def]
    total = rs.Counts()
    for ref, hyp in pairs:
        total = total + rs.score(ref, hyp)
    return total


def diff(ref: str, hyp: str) -> str:
    """Aligned reference/hypothesis with errors upper-cased (jiwer's alignment)."""
    import jiwer

    r, h = rs.normalise(ref), rs.normalise(hyp)
    if not r or not h:
        return f"    REF: {r}\n    HYP: {h}"
    out = jiwer.process_words(r, h)
    rw, hw = r.split(), h.split()
    a: list[str] = []
    b: list[str] = []
    for c in out.alignments[0]:
        if c.type == "equal":
            a += rw[c.ref_start_idx : c.ref_end_idx]
            b += hw[c.hyp_start_idx : c.hyp_end_idx]
            continue
        x = [w.upper() for w in rw[c.ref_start_idx : c.ref_end_idx]]
        y = [w.upper() for w in hw[c.hyp_start_idx : c.hyp_end_idx]]
        n = max(len(x), len(y))
        x += ["*" * len(y[k]) for k in range(len(x), n)]
        y += ["*" * len(x[k]) for k in range(len(y), n)]
        for p, q in zip(x, y, strict=True):
            w = max(len(p), len(q))
            a.append(p.ljust(w))
            b.append(q.ljust(w))
    return f"    REF: {' '.join(a)}\n    HYP: {' '.join(b)}"


def evaluate(model, files: list[File], v: Variant, show: int = 0) -> dict:
    by_group: dict[str, list[tuple[str, str]]] = {}
    cpu = audio = 0.0
    walls: list[float] = []
    dropped = retried = 0
    skipped: dict[str, int] = {}
    worst = []
    for f in files:
        r = run_file(model, f, v)
        hyp = " ".join(t for t in r.texts if t)
        by_group.setdefault(f.group, []).append((f.item.text, hyp))
        cpu, audio = cpu + r.cpu_s, audio + len(f.audio) / SR
        walls += r.wall_ms
        dropped += r.dropped
        retried += r.retried
        for s in r.skipped:
            if s:
                skipped[s] = skipped.get(s, 0) + 1
        if f.group in ("real", "jfk"):
            c = rs.score(f.item.text, hyp)
            worst.append((c.errors, f.name, f.item.text, hyp))
    walls.sort()
    out = {
        "real": pooled(by_group.get("real", []) + by_group.get("jfk", [])),
        "espeak": pooled(by_group.get("espeak", [])),
        "probe_words": pooled(by_group.get("probe", [])).ins,
        "snr10": pooled(by_group.get("snr10", [])),
        "snr5": pooled(by_group.get("snr5", [])),
        "cpu_per_audio_s": cpu / audio if audio else 0.0,
        "p50_ms": statistics.median(walls) if walls else 0.0,
        "p95_ms": walls[int(0.95 * (len(walls) - 1))] if walls else 0.0,
        "segments": len(walls),
        "dropped": dropped,
        "retried": retried,
        "skipped": skipped,
    }
    for errs, name, ref, hyp in sorted(worst, reverse=True)[:show]:
        print(f"  [{name}] errors={errs}\n{diff(ref, hyp)}", file=sys.stderr, flush=True)
    return out


def _pct(c: rs.Counts) -> str:
    return f"{100 * c.wer:.1f}" if c.wer is not None else "-"


def _ins(c: rs.Counts) -> str:
    return f"{c.ins_per_100:.1f}" if c.ins_per_100 is not None else "-"


def _sdi(c: rs.Counts) -> str:
    return f"{c.sub}/{c.dele}/{c.ins}"


def _gap(c: rs.Counts, o: rs.Counts | None) -> str:
    if o is None or o.wer is None or c.wer is None:
        return "-"
    return f"{100 * (c.wer - o.wer):+.1f}"


def load_model(name: str, compute_type: str, threads: int):  # type: ignore[no-untyped-def]
    from faster_whisper import WhisperModel

    from services.worker.models import resolve_model

    return WhisperModel(
        str(resolve_model(name)),
        device="cpu",
        compute_type=compute_type,
        cpu_threads=threads,
        local_files_only=True,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny.en")
    ap.add_argument("--variants", default="C25RW")
    ap.add_argument(
        "--groups", default="real,jfk,espeak,probe,snr10,snr5", help="which files to run"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-offline", action="store_true", help="skip the offline yardstick")
    ap.add_argument("--show", type=int, default=0, help="print the N worst real files, aligned")
    ap.add_argument("--cache-dir", type=Path, default=None, help="speech cache (realspeech)")
    ap.add_argument("--json", type=Path, default=None, help="append results as JSON lines")
    args = ap.parse_args(argv)

    files = build_files(args.groups.split(","), args.cache_dir)
    models: dict[str, object] = {}

    def model_for(compute_type: str):  # type: ignore[no-untyped-def]
        if compute_type not in models:
            models[compute_type] = load_model(args.model, compute_type, args.threads)
        return models[compute_type]

    off: dict[str, dict[str, rs.Counts]] = {}
    if not args.no_offline:
        for ct in ("default", "int8"):
            cache = Path("/tmp/escapement-decoding-sim") / f"{args.model}-{ct}-beam5"
            hyps = {f.name: offline(model_for(ct), f, cache) for f in files}
            groups = {
                g: pooled([(f.item.text, hyps[f.name]) for f in files if f.group in g.split("+")])
                for g in ("real+jfk", "espeak", "probe", "snr10", "snr5")
            }
            off[ct] = groups
            o = groups
            print(
                f"offline {args.model} {ct} beam 5: real+jfk WER {_pct(o['real+jfk'])} "
                f"({_sdi(o['real+jfk'])} of {o['real+jfk'].ref_words}) | espeak {_pct(o['espeak'])}"
                f" | probe {o['probe'].ins} | ins/100 10 dB {_ins(o['snr10'])} 5 dB {_ins(o['snr5'])}",
                flush=True,
            )
        models.pop("default", None)
    f32 = off.get("default", {}).get("real+jfk")
    i8 = off.get("int8", {}).get("real+jfk")
    print(
        "variant | WER | S/D/I | -off f32 | -off i8 | espeak | probe | ins/100 10dB | 5dB "
        "| CPU s/s | p50 ms | p95 ms | segs"
    )
    for name in filter(None, args.variants.split(",")):
        v = VARIANTS[name]
        res = evaluate(model_for(v.compute_type), files, v, args.show)
        sp: rs.Counts = res["real"]
        print(
            f"{name} | {_pct(sp)} | {_sdi(sp)} | {_gap(sp, f32)} | {_gap(sp, i8)} | {_pct(res['espeak'])} | "
            f"{res['probe_words']} | {_ins(res['snr10'])} | {_ins(res['snr5'])} | "
            f"{res['cpu_per_audio_s']:.3f} | {res['p50_ms']:.0f} | {res['p95_ms']:.0f} | "
            f"{res['segments']}   ({v.note}; dropped {res['dropped']}, retried {res['retried']}, "
            f"skipped {res['skipped']})",
            flush=True,
        )
        if args.json:
            row = {
                "model": args.model,
                "variant": name,
                "note": v.note,
                **{
                    k: (dataclasses.asdict(x) if isinstance(x, rs.Counts) else x)
                    for k, x in res.items()
                },
            }
            with args.json.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
