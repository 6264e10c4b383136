"""Parse and validate the query of `GET /v1/stream` before the upgrade."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from services.common.audio import SUPPORTED_RATES

ENCODINGS = ("linear16",)
FRAMINGS = ("raw", "msgpack")
_LANGUAGE = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})?$")


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
    language: str = "en"
    framing: str = "raw"
    fast: bool = False  # pace=fast: a file upload, exempt from the real-time rate limit
    interim_results: bool = True


def parse_stream_params(query: Mapping[str, str], default_language: str = "en") -> StreamParams:
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
    if not _LANGUAGE.fullmatch(language):
        raise BadRequest(
            "bad_language", f"language {language[:32]!r} is not a language code like 'en' or 'de'"
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
    )
