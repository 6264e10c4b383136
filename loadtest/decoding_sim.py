"""Decoding-policy benchmark: streamed finals vs whole-file offline, on real speech.

    python -m loadtest.decoding_sim --model tiny.en --variants A,B,...

For every file of the corpus the session is cut by the edge's own `Segmenter`
(services/edge/vad.py), each utterance is turned into what the edge would send
(segment audio, optional left context from the session's earlier audio, the
edge VAD's voiced spans, a prompt made only of the finals already committed,
computed in order so it is deterministic) and decoded by the shipped
`services.worker.decoding.decode`. The same run decodes each whole file
offline (`WhisperModel.transcribe(file)`, defaults) as the yardstick.

Reported per variant: pooled WER (S/D/I) streamed vs offline on clean speech,
words on the non-speech probe, inserted words per 100 reference words in the
10 dB / 5 dB SNR mixes, decode CPU-seconds per audio-second, p50/p95 decode
wall ms per segment; with --interims also how often LocalAgreement-2 commits
an interim word that the final then changes.

Corpus: a WAV folder holding `manifest.json` (name, kind = speech|probe|snr10|
snr5, ref): continuous sessions of Asterisk prompts on room noise, JFK, a
60 s non-speech probe, SNR mixes.

Measured (tiny.en, int8, 2 threads, 6 x 60 s Asterisk sessions + JFK = 607
words; whole-file offline 2.3 % WER): independent cuts 4.3 % (16/3/7);
left context re-decoded in no-timestamps mode loses whole sentences
(9-12 %, Whisper stops after the context); left context from the previous
utterance start forced as prefix 4.1 %; + prompt of committed finals 3.5 %
(15/2/4), 0 words on the probe, 1.8 inserted words / 100 at 10 dB.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from services.edge.vad import Segmenter, Utterance, VadConfig
from services.worker.decoding import DecodePolicy, DecodeRequest, decode

SR = 16000


@dataclass(frozen=True)
class Variant:
    """A decoding policy plus what the edge sends with each segment."""

    policy: DecodePolicy = field(default_factory=DecodePolicy)
    endpoint_ms: int = 500
    # Left context: "none"; "fixed:S" = S seconds before the segment;
    # "utt:S" = from the start of the earliest previous utterance that lies
    # within S seconds (a VAD boundary, so no word is cut in half).
    context: str = "none"
    prefix: bool = False  # force the committed text of the context (Whisper prefix)
    note: str = ""


P = DecodePolicy
BASE = dict(voiced_margin_s=None, prompt_chars=0)
VARIANTS: dict[str, Variant] = {
    # independent cuts, nothing else
    "A": Variant(P(**BASE), note="independent cuts, beam 1"),
    "A5": Variant(P(beam_size=5, **BASE), note="independent cuts, beam 5"),
    "B": Variant(P(**dict(BASE, prompt_chars=200)), note="A + prompt of committed finals"),
    "C3": Variant(P(**BASE), context="fixed:3", note="A + 3 s left audio, re-decoded"),
    "C6": Variant(P(**BASE), context="fixed:6", note="A + 6 s left audio"),
    "C10": Variant(P(**BASE), context="fixed:10", note="A + 10 s left audio"),
    "D": Variant(
        P(**BASE), context="utt:8", note="A + context from previous utterance start (<= 8 s)"
    ),
    "E": Variant(P(**BASE), context="utt:8", prefix=True, note="D, context text forced as prefix"),
    "F": Variant(
        P(**dict(BASE, prompt_chars=200)), context="utt:8", prefix=True, note="E + prompt"
    ),
    "G": Variant(P(prompt_chars=0), context="utt:8", note="D + voiced-span word gate"),
    "GP": Variant(
        P(prompt_chars=0), context="utt:8", prefix=True, note="E + voiced-span word gate"
    ),
    "FP": Variant(
        P(prompt_chars=200), context="utt:8", prefix=True, note="F + voiced-span word gate"
    ),
    "FP0": Variant(
        P(prompt_chars=200, no_speech_threshold=1.0),
        context="utt:8",
        prefix=True,
        note="FP without no_speech gate",
    ),
    "H": Variant(
        P(prompt_chars=200, trim_pad_s=0.2),
        context="utt:8",
        prefix=True,
        note="FP + trim to last voiced+0.2 s",
    ),
    "S": Variant(
        P(prompt_chars=200, silero=True),
        context="utt:8",
        prefix=True,
        note="FP + Silero second opinion",
    ),
    "T": Variant(
        P(prompt_chars=200, tail_min_probability=0.3),
        context="utt:8",
        prefix=True,
        note="FP + tail word prob >= 0.3",
    ),
    "R": Variant(
        P(prompt_chars=200, retry_beam_size=5),
        context="utt:8",
        prefix=True,
        note="FP + beam-5 retry when unreliable",
    ),
    "FP5": Variant(
        P(prompt_chars=200, beam_size=5), context="utt:8", prefix=True, note="FP with beam 5"
    ),
    "FPTS": Variant(
        P(prompt_chars=200, without_timestamps=False),
        context="utt:8",
        prefix=True,
        note="FP with timestamp tokens",
    ),
    "FPNW": Variant(
        P(prompt_chars=200, word_timestamps=False, voiced_margin_s=None),
        context="utt:8",
        prefix=True,
        note="F without word timestamps (cost)",
    ),
    "FP4": Variant(P(prompt_chars=200), context="utt:4", prefix=True, note="FP, context <= 4 s"),
    "FP15": Variant(P(prompt_chars=200), context="utt:15", prefix=True, note="FP, context <= 15 s"),
    "E700": Variant(
        P(prompt_chars=200),
        context="utt:8",
        prefix=True,
        endpoint_ms=700,
        note="FP, endpoint 700 ms",
    ),
    "E900": Variant(
        P(prompt_chars=200),
        context="utt:8",
        prefix=True,
        endpoint_ms=900,
        note="FP, endpoint 900 ms",
    ),
}


@dataclass
class Item:
    name: str
    kind: str  # speech | probe | snr10 | snr5
    ref: str
    audio: np.ndarray  # float32 16 kHz


def read_wav16(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as w:
        assert w.getnchannels() == 1 and w.getsampwidth() == 2, path
        pcm = w.readframes(w.getnframes())
        rate = w.getframerate()
    x = np.frombuffer(pcm, np.int16).astype(np.float32) / 32768
    if rate != SR:
        from faster_whisper.audio import decode_audio

        x = decode_audio(str(path), sampling_rate=SR)
    return x


def load_corpus(folder: Path | None) -> list[Item]:
    """WAV files listed in `folder/manifest.json` ([{name, kind, ref}, ...])."""
    if folder is None:
        raise SystemExit("pass --corpus DIR (WAVs + manifest.json: name, kind, ref)")
    manifest = json.loads((folder / "manifest.json").read_text())
    return [
        Item(m["name"], m["kind"], m["ref"], read_wav16(folder / f"{m['name']}.wav"))
        for m in manifest
    ]


# -- scoring -------------------------------------------------------------------

_NORMALIZER = None


def normalize(text: str) -> str:
    global _NORMALIZER
    if _NORMALIZER is None:
        from whisper_normalizer.english import EnglishTextNormalizer

        _NORMALIZER = EnglishTextNormalizer()
    return " ".join(_NORMALIZER(text).split())


def score(pairs: list[tuple[str, str]]) -> dict:
    """Pooled S/D/I/N over (ref, hyp) pairs after normalisation."""
    import jiwer

    s = d = i = n = 0
    for ref, hyp in pairs:
        r, h = normalize(ref), normalize(hyp)
        n += len(r.split())
        if not r:
            i += len(h.split())
            continue
        if not h:
            d += len(r.split())
            continue
        out = jiwer.process_words(r, h)
        s, d, i = s + out.substitutions, d + out.deletions, i + out.insertions
    wer = 100 * (s + d + i) / n if n else float("nan")
    return dict(wer=wer, S=s, D=d, I=i, N=n)


# -- simulation of the edge ------------------------------------------------------


def segment(audio: np.ndarray, cfg: VadConfig) -> tuple[list[Utterance], list[tuple[float, float]]]:
    """Utterances from the edge Segmenter and the VAD's voiced spans (s) on the same frames."""
    import webrtcvad

    pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16).tobytes()
    seg = Segmenter(SR, cfg)
    events = seg.feed(pcm) + seg.flush()
    utts = [e for e in events if isinstance(e, Utterance)]
    vad = webrtcvad.Vad(cfg.mode)
    fb = SR * cfg.frame_ms // 1000 * 2
    spans: list[tuple[float, float]] = []
    for k in range(len(pcm) // fb):
        if vad.is_speech(pcm[k * fb : (k + 1) * fb], SR):
            t0, t1 = k * cfg.frame_ms / 1000, (k + 1) * cfg.frame_ms / 1000
            if spans and abs(spans[-1][1] - t0) < 1e-9:
                spans[-1] = (spans[-1][0], t1)
            else:
                spans.append((t0, t1))
    return utts, spans


def clip_spans(spans, t0: float, t1: float) -> tuple[tuple[float, float], ...]:
    return tuple((max(a, t0) - t0, min(b, t1) - t0) for a, b in spans if b > t0 and a < t1)


def context_start(utts: list[Utterance], i: int, rule: str) -> float:
    start = utts[i].start_ms / 1000
    if rule == "none":
        return start
    kind, _, arg = rule.partition(":")
    limit = float(arg)
    if kind == "fixed":
        return max(0.0, start - limit)
    if kind == "utt":
        best = start
        for j in range(i - 1, -1, -1):
            if start - utts[j].start_ms / 1000 > limit:
                break
            best = utts[j].start_ms / 1000
        return best
    raise ValueError(rule)


@dataclass
class Final:
    start_s: float
    end_s: float
    words: list[tuple[str, float, float]]  # word, start, end on the session timeline
    text: str


@dataclass
class FileRun:
    finals: list[Final]
    cpu_s: float
    wall_ms: list[float]
    dropped: int
    audio_s: float
    interim_flips: int = 0
    interim_committed: int = 0


def request_for(
    item: Item,
    utts,
    spans,
    finals: list[Final],
    i: int,
    variant: Variant,
    end_s: float | None = None,
) -> DecodeRequest:
    u = utts[i]
    seg_start = u.start_ms / 1000
    seg_end = end_s if end_s is not None else u.end_ms / 1000
    c0 = context_start(utts, i, variant.context)
    if variant.prefix:
        # Forced context text must match the context audio: start after the
        # last earlier utterance whose final came back empty.
        for j in range(i - 1, -1, -1):
            if utts[j].start_ms / 1000 < c0:
                break
            if not finals[j].text:
                c0 = utts[j + 1].start_ms / 1000 if j + 1 < i else seg_start
                break
    audio = item.audio[int(round(c0 * SR)) : int(round(seg_end * SR))]
    ctx_text = ""
    prompt_finals = finals
    if variant.prefix and c0 < seg_start:
        ctx_words = [w for f in finals if f.end_s > c0 for w in f.words if (w[1] + w[2]) / 2 >= c0]
        ctx_text = "".join(w[0] for w in ctx_words).strip()
        prompt_finals = [f for f in finals if f.end_s <= c0]
    prompt = " ".join(f.text for f in prompt_finals if f.text).strip()
    return DecodeRequest(
        audio=audio,
        segment_start_s=seg_start - c0,
        prompt=prompt,
        context_text=ctx_text,
        voiced=clip_spans(spans, c0, seg_end),
        final=end_s is None,
    )


def local_agreement_flips(hyps: list[list[str]], final: list[str]) -> tuple[int, int]:
    """Words committed by LocalAgreement-2 over interims, and how many the final changed."""
    committed: list[str] = []
    for prev, cur in zip(hyps, hyps[1:], strict=False):
        k = 0
        while k < min(len(prev), len(cur)) and prev[k] == cur[k]:
            k += 1
        if k > len(committed):
            committed = cur[:k]
    flips = sum(1 for k, w in enumerate(committed) if k >= len(final) or final[k] != w)
    return len(committed), flips


def run_file(model, item: Item, variant: Variant, interims: bool = False) -> FileRun:
    cfg = VadConfig(endpoint_ms=variant.endpoint_ms)
    utts, spans = segment(item.audio, cfg)
    finals: list[Final] = []
    run = FileRun([], 0.0, [], 0, len(item.audio) / SR)
    for i, u in enumerate(utts):
        req = request_for(item, utts, spans, finals, i, variant)
        if interims:
            hyps = []
            t = u.start_ms / 1000 + 1.0
            while t < u.end_ms / 1000 - 0.3:
                ireq = request_for(item, utts, spans, finals, i, variant, end_s=t)
                ireq = dataclasses.replace(ireq, voiced=())  # the edge has no endpoint yet
                d = decode(model, ireq, dataclasses.replace(variant.policy, word_timestamps=False))
                hyps.append(normalize(d.text).split())
                t += 1.0
        c0 = u.start_ms / 1000 - req.segment_start_s
        cpu, wall = time.process_time(), time.perf_counter()
        d = decode(model, req, variant.policy)
        run.cpu_s += time.process_time() - cpu
        run.wall_ms.append((time.perf_counter() - wall) * 1000)
        run.dropped += d.dropped
        finals.append(
            Final(
                u.start_ms / 1000,
                u.end_ms / 1000,
                [(w.word, c0 + w.start_s, c0 + w.end_s) for w in d.words],
                d.text,
            )
        )
        if interims and len(hyps) >= 2:
            n, f = local_agreement_flips(hyps, normalize(d.text).split())
            run.interim_committed += n
            run.interim_flips += f
    run.finals = finals
    return run


def offline(model, item: Item, cache: Path | None) -> str:
    key = None
    if cache is not None:
        import hashlib

        key = cache / f"{hashlib.sha1(item.audio.tobytes()).hexdigest()[:16]}.txt"
        if key.exists():
            return key.read_text()
    segments, _ = model.transcribe(item.audio)  # defaults: beam 5, fallback, conditioned
    text = " ".join(s.text.strip() for s in segments)
    if key is not None:
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_text(text)
    return text


def evaluate(model, items: list[Item], variant: Variant, interims: bool, show: int = 0) -> dict:
    by_kind: dict[str, list[tuple[str, str]]] = {}
    cpu = audio = 0.0
    walls: list[float] = []
    dropped = flips = committed = 0
    worst = []
    for item in items:
        r = run_file(model, item, variant, interims and item.kind == "speech")
        hyp = " ".join(f.text for f in r.finals if f.text)
        by_kind.setdefault(item.kind, []).append((item.ref, hyp))
        cpu, audio = cpu + r.cpu_s, audio + r.audio_s
        walls += r.wall_ms
        dropped += r.dropped
        flips, committed = flips + r.interim_flips, committed + r.interim_committed
        if item.kind in ("speech", "probe"):
            sc = score([(item.ref, hyp)])
            worst.append((sc["S"] + sc["D"] + sc["I"], item.name, item.ref, hyp))
    walls.sort()
    out = {
        "speech": score(by_kind.get("speech", [])),
        "probe_words": score(by_kind.get("probe", []))["I"],
        "cpu_per_audio_s": cpu / audio if audio else 0.0,
        "p50_ms": statistics.median(walls) if walls else 0.0,
        "p95_ms": walls[int(0.95 * (len(walls) - 1))] if walls else 0.0,
        "segments": len(walls),
        "dropped": dropped,
    }
    for kind in ("snr10", "snr5"):
        if kind in by_kind:
            sc = score(by_kind[kind])
            out[kind] = dict(sc, ins_per_100=100 * sc["I"] / sc["N"] if sc["N"] else 0.0)
    if interims:
        out["la2_committed"] = committed
        out["la2_flips"] = flips
    for errs, name, ref, hyp in sorted(worst, reverse=True)[:show]:
        print(
            f"  [{name}] errors={errs}\n    REF: {normalize(ref)}\n    HYP: {normalize(hyp)}",
            file=sys.stderr,
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny.en")
    ap.add_argument("--variants", default="A,G")
    ap.add_argument("--corpus", type=Path, default=None, help="WAV folder with manifest.json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--interims", action="store_true")
    ap.add_argument(
        "--only", default="", help="comma list of file kinds to run (speech,probe,snr10,snr5)"
    )
    ap.add_argument("--show", type=int, default=0, help="print ref/hyp of the N worst files")
    ap.add_argument("--json", type=Path, default=None, help="append results as JSON lines")
    args = ap.parse_args(argv)

    from faster_whisper import WhisperModel

    from services.worker.models import resolve_model

    model = WhisperModel(
        str(resolve_model(args.model)),
        device="cpu",
        compute_type="int8",
        cpu_threads=args.threads,
        local_files_only=True,
    )
    items = load_corpus(args.corpus)
    if args.only:
        items = [i for i in items if i.kind in args.only.split(",")]
    cache = Path("/tmp/escapement-decoding-sim") / args.model
    speech = [i for i in items if i.kind == "speech"]
    off = score([(i.ref, offline(model, i, cache)) for i in speech])
    snr_off = {}
    for kind in ("snr10", "snr5"):
        its = [i for i in items if i.kind == kind]
        if its:
            sc = score([(i.ref, offline(model, i, cache)) for i in its])
            snr_off[kind] = 100 * sc["I"] / sc["N"]
    print(
        f"offline {args.model}: WER {off['wer']:.1f} S/D/I {off['S']}/{off['D']}/{off['I']} N={off['N']}"
        + "".join(f" | {k} ins/100 {v:.1f}" for k, v in snr_off.items())
    )
    hdr = "variant | WER str | S/D/I | WER off | probe | ins/100 10dB | 5dB | CPU s/s | p50 ms | p95 ms | LA2 flips"
    print(hdr)
    for name in args.variants.split(","):
        v = VARIANTS[name]
        res = evaluate(model, items, v, args.interims, args.show)
        sp = res["speech"]
        la = f"{res['la2_flips']}/{res['la2_committed']}" if "la2_flips" in res else "-"
        print(
            f"{name} | {sp['wer']:.1f} | {sp['S']}/{sp['D']}/{sp['I']} | {off['wer']:.1f} | {res['probe_words']} | "
            f"{res.get('snr10', {}).get('ins_per_100', float('nan')):.1f} | {res.get('snr5', {}).get('ins_per_100', float('nan')):.1f} | "
            f"{res['cpu_per_audio_s']:.3f} | {res['p50_ms']:.0f} | {res['p95_ms']:.0f} | {la}   ({v.note})",
            flush=True,
        )
        if args.json:
            with args.json.open("a") as f:
                f.write(
                    json.dumps(
                        {
                            "model": args.model,
                            "variant": name,
                            "note": v.note,
                            "offline": off,
                            **res,
                        }
                    )
                    + "\n"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
