"""Parse and validate the query of `GET /v1/stream` before the upgrade.

`language`: a code ("de", "en-US") forces it; omitted (unless the edge sets
`default_language`) or `auto` means detect, which is `StreamParams.language == ""`.
Whether the workers can speak it is checked before the upgrade too
(`check_language`, from what the workers say in discovery).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from jetstream import subjects
from services.common.audio import SUPPORTED_RATES
from services.common.discovery import WorkerLanguages
from services.common.languages import is_language_tag, primary_language

ENCODINGS = ("linear16",)
FRAMINGS = ("raw", "msgpack")
DETECT = ("", "auto")  # language values that mean: detect it
MAX_JITTER_MS = 2000  # bounds the audio a session's jitter buffer holds


# The models the project ships (services/worker/models.py): one no worker runs is
# refused as unavailable (503), any other name as unknown (400).
SHIPPED_MODELS = ("tiny.en", "base")
_MODEL = re.compile(r"[A-Za-z0-9._/-]{1,200}")


class ModelUnavailable(Exception):
    """A model this deployment knows but no live worker runs: HTTP 503 no_workers."""

    def __init__(self, model: str, message: str) -> None:
        super().__init__(message)
        self.model = model
        self.message = message


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
    # model=: the model asked for by name; "" the deployment's default (`route_model`
    # turns a name the default-lane workers run into "" too)
    model: str = ""


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
        model=_model(query.get("model", "")),
    )


def _model(raw: str) -> str:
    raw = raw.strip()
    if raw and not _MODEL.fullmatch(raw):
        raise BadRequest("unknown_model", f"model {raw[:40]!r} is not a model name")
    return raw


def route_model(
    params: StreamParams, workers: Sequence[WorkerLanguages], default_model: str
) -> tuple[StreamParams, list[WorkerLanguages]]:
    """The session's model (`route`), and the live workers that serve it."""
    model, serving = route(params.model, workers, default_model)
    return dataclasses.replace(params, model=model), serving


def route(
    model: str, workers: Sequence[WorkerLanguages], default_model: str
) -> tuple[str, list[WorkerLanguages]]:
    """The model a session or upload goes to ("": the default lane's), and the live
    workers that serve it.

    No model, or one the default lane's workers run (or the deployment's
    `default_model`): the default lane ("", every worker there). Another: the lane of
    that model, when a live worker takes it. Else refused up front: a model the project
    ships but nobody runs with `ModelUnavailable` (503 no_workers), any other name with
    BadRequest unknown_model (400), each naming what is served."""
    default = [w for w in workers if not w.lane]
    if not model or model in {default_model, *(w.serves for w in default)}:
        return "", default
    lane = subjects.lane_of_model(model)
    serving = [w for w in workers if w.lane == lane]
    if serving:
        return model, serving
    served = sorted({default_model, *(w.serves for w in workers if w.serves)})
    if model in SHIPPED_MODELS:
        raise ModelUnavailable(
            model, f"no live worker runs model {model!r} (served now: {', '.join(served)})"
        )
    raise BadRequest(
        "unknown_model", f"model {model[:40]!r} is not served here; use one of {', '.join(served)}"
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
