"""Parse and validate the query of `GET /v1/stream` before the upgrade.

`language`: a code ("de", "en-US") forces it; omitted (unless the edge sets
`default_language`) or `auto` means detect, which is `StreamParams.language == ""`.
Whether the workers can speak it is checked before the upgrade too
(`check_language`, from what the workers say in discovery).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from services.common.audio import SUPPORTED_RATES
from services.common.discovery import WorkerLanguages
from services.common.languages import is_language_tag, primary_language

ENCODINGS = ("linear16",)
FRAMINGS = ("raw", "msgpack")
DETECT = ("", "auto")  # language values that mean: detect it
MAX_JITTER_MS = 2000  # bounds the audio a session's jitter buffer holds


class BadRequest(ValueError):
    """Answered with HTTP 400 and this reason, before any upgrade."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class StreamParams:
    sample_rate: int = 16000
    encoding: str = "linear16"
    language: str = "en"  # "": detect it per utterance (multilingual models)
    framing: str = "raw"
    fast: bool = False  # pace=fast: a file upload, exempt from the real-time rate limit
    interim_results: bool = True
    jitter_ms: int | None = None  # framing=msgpack: the jitter buffer (None: the edge's)


def parse_stream_params(query: Mapping[str, str], default_language: str = "") -> StreamParams:
    raw_rate = query.get("sample_rate", "16000")
    try:
        rate = int(raw_rate)
    except ValueError:
        raise BadRequest(
            "bad_sample_rate", f"sample_rate must be an integer, got {raw_rate[:32]!r}"
        ) from None
    if rate not in SUPPORTED_RATES:
        rates = ", ".join(map(str, SUPPORTED_RATES))
        raise BadRequest(
            "unsupported_sample_rate", f"sample_rate {rate} not supported; use one of {rates}"
        )
    encoding = query.get("encoding", "linear16").lower()
    if encoding not in ENCODINGS:
        raise BadRequest(
            "unsupported_encoding",
            f"encoding {encoding[:32]!r} not supported; use linear16 (PCM s16le mono)",
        )
    language = query.get("language", default_language)
    if language in DETECT:
        language = ""
    elif not is_language_tag(language):
        raise BadRequest(
            "bad_language",
            f"language {language[:32]!r} is not a language code like 'en' or 'de' (or auto)",
        )
    framing = query.get("framing", "raw")
    if framing not in FRAMINGS:
        raise BadRequest(
            "bad_framing", f"framing {framing[:32]!r} not supported; use raw or msgpack"
        )
    pace = query.get("pace", "realtime")
    if pace not in ("realtime", "fast"):
        raise BadRequest("bad_pace", f"pace {pace[:32]!r} not supported; use realtime or fast")
    interim = query.get("interim_results", "true").lower()
    if interim not in ("true", "false"):
        raise BadRequest(
            "bad_interim_results", f"interim_results {interim[:32]!r}: use true or false"
        )
    return StreamParams(
        sample_rate=rate,
        encoding=encoding,
        language=language,
        framing=framing,
        fast=pace == "fast",
        interim_results=interim == "true",
        jitter_ms=_jitter_ms(query.get("jitter_ms")),
    )


def _jitter_ms(raw: str | None) -> int | None:
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_JITTER_MS:
        raise BadRequest(
            "bad_jitter_ms", f"jitter_ms {raw[:32]!r}: use an integer from 0 to {MAX_JITTER_MS}"
        )
    return value


def check_language(params: StreamParams, workers: Sequence[WorkerLanguages]) -> StreamParams:
    """Refuse a language that not every live worker's model speaks (HTTP 400 before
    the upgrade, rather than a failed segment per utterance: any worker may take any
    segment, so one English-only worker in the fleet would dead-letter German); with
    only English-only models, a language left to detect is English. Workers that do
    not say what they speak (or none answering yet) are given the benefit of the doubt."""
    if not workers or any(w.languages is None for w in workers):
        return params
    if not params.language:
        if any(w.multilingual for w in workers):
            return params
        spoken = {lang for w in workers for lang in w.languages or ()}
        return dataclasses.replace(params, language=spoken.pop()) if len(spoken) == 1 else params
    wanted = primary_language(params.language)
    if all(wanted in (w.languages or ()) for w in workers):
        return params
    models = ", ".join(sorted({w.describe() for w in workers}))
    raise BadRequest(
        "unsupported_language",
        f"language {params.language!r} is not spoken by every model serving this edge "
        f"({models}); omit language or name one they all speak",
    )
