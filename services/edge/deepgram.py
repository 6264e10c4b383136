"""`GET /v1/listen`: Deepgram's live-streaming protocol on Escapement's pipeline.

An app written for Deepgram switches by changing its base URL: the same edge,
admission, auth and streaming core as `/v1/stream`, with Deepgram's query
parameters (checked before the upgrade: what cannot be honoured is refused with
HTTP 400 naming it, never silently ignored) and Deepgram's messages on the
socket (`Results`, `SpeechStarted`, `UtteranceEnd`, `Metadata`; wire shapes in
schemas/deepgram.py). `negotiate` parses the query; `DeepgramDialect` is the
session's dialect (services/edge/session.py): it renders the core's native
events, reads Deepgram's control messages and maps close codes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec
from multidict import MultiMapping

from schemas import deepgram as dg
from schemas import device as ev
from schemas.pipeline import Word
from services.common.languages import is_language_tag, primary_language
from services.edge.params import BadRequest, StreamParams, parse_stream_params
from services.edge.session import CLOSE_IDLE, Dialect
from services.edge.settings import EdgeSettings
from services.edge.stream import StreamCore

CHANNEL = [0, 1]  # (channel index, channels): mono only
MIN_ENDPOINT_MS = 300  # the VAD works in 30 ms frames and pauses inside words reach ~200 ms

# --- models -----------------------------------------------------------------

# Deepgram's model names apps already send. Each family's domain variants are tunings
# of one general model: the deployment's model serves them. A medical model is a
# vocabulary this deployment does not have.
_FAMILIES = {
    "nova-3": ("general", "medical"),
    "nova-2": (
        "general",
        "meeting",
        "phonecall",
        "finance",
        "conversationalai",
        "voicemail",
        "video",
        "medical",
        "drivethru",
        "automotive",
        "atc",
    ),
    "nova": ("general", "phonecall", "medical"),
    "enhanced": ("general", "meeting", "phonecall", "finance"),
    "base": (
        "general",
        "meeting",
        "phonecall",
        "finance",
        "conversationalai",
        "voicemail",
        "video",
    ),
}
_LEGACY = ("general", "meeting", "phonecall", "finance", "conversationalai", "voicemail", "video")
_UNSERVED_DOMAINS = {"medical": "a medical model"}
ESCAPEMENT_MODELS = ("tiny.en",)  # `base` is Deepgram's base here: the deployment's model
_TIERS = ("nova", "enhanced", "base")


def resolve_model(name: str) -> str:
    """The model a Deepgram `model` value asks for: "" (the deployment's) or an
    Escapement model name; BadRequest for one this deployment cannot serve."""
    if name == "" or name in ESCAPEMENT_MODELS:
        return name
    family, domain = name, "general"
    for prefix in sorted(_FAMILIES, key=len, reverse=True):  # nova-2-... before nova-...
        if name.startswith(prefix + "-") and name not in _FAMILIES:
            family, domain = prefix, name[len(prefix) + 1 :]
            break
    legacy = name in (*_LEGACY, *_UNSERVED_DOMAINS)  # a domain alone (with `tier`)
    if legacy:
        domain = name
    elif family not in _FAMILIES or domain not in _FAMILIES[family]:
        known = ", ".join([*_FAMILIES, *ESCAPEMENT_MODELS])
        raise BadRequest("unknown_model", f"model {name[:40]!r} is not known; use one of {known}")
    if domain in _UNSERVED_DOMAINS:
        raise BadRequest(
            "unsupported_model",
            f"model {name!r} needs {_UNSERVED_DOMAINS[domain]}, which this deployment does not "
            "have; use a general model (nova-3, nova-2, ...)",
        )
    return ""


# --- query ------------------------------------------------------------------

# Deepgram features accepted only when off: on, they would change what the app gets.
_OFF_ONLY = (
    "diarize",
    "multichannel",
    "profanity_filter",
    "numerals",
    "dictation",
    "detect_entities",
    "filler_words",
    "redact",
)
# Deepgram features refused whatever their value.
_NEVER = {
    "diarize_model": "speaker diarization is not available",
    "search": "search is not available",
    "replace": "find-and-replace is not available",
    "callback": "callbacks are not available: results come on the socket",
    "callback_method": "callbacks are not available: results come on the socket",
    "language_hint": "language hints are not available; use language=multi to detect",
}
_KNOWN = {
    "encoding",
    "sample_rate",
    "channels",
    "language",
    "detect_language",
    "interim_results",
    "endpointing",
    "utterance_end_ms",
    "vad_events",
    "punctuate",
    "smart_format",
    "model",
    "tier",
    "version",
    "keyterm",
    "keywords",
    "tag",
    "extra",
    "mip_opt_out",
    "token",  # the credential, for clients that cannot set headers (auth.py)
    *_OFF_ONLY,
    *_NEVER,
}


@dataclass(frozen=True, slots=True)
class ListenOptions:
    """What a `/v1/listen` request asked for, checked."""

    model: str = ""  # "": the deployment's model
    detect: str = ""  # "": a language given; "multi" (language=multi); "detect_language"
    interim_results: bool = False
    endpoint_ms: int | None = None  # None: the deployment's endpoint
    speech_final: bool = True  # endpointing=false: never set speech_final
    utterance_end_ms: int = 0  # 0: no UtteranceEnd
    vad_events: bool = False
    punctuate: bool = False  # punctuate or smart_format
    keyterms: tuple[str, ...] = ()  # accepted; no vocabulary hook in the pipeline
    extra: dict[str, str] = dataclasses.field(default_factory=dict)


def _flag(query: MultiMapping[str], name: str, default: bool = False) -> bool:
    raw = query.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value not in ("true", "false"):
        raise BadRequest(f"bad_{name}", f"{name} must be true or false, not {raw[:32]!r}")
    return value == "true"


def _ms(query: MultiMapping[str], name: str) -> int | None:
    raw = query.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(
            f"bad_{name}", f"{name} must be milliseconds (an integer), not {raw[:32]!r}"
        ) from None
    if value < 0:
        raise BadRequest(f"bad_{name}", f"{name} must not be negative")
    return value


def _refuse_unsupported(query: MultiMapping[str]) -> None:
    unknown = sorted({k for k in query if k not in _KNOWN})
    if unknown:
        names = ", ".join(repr(k[:32]) for k in unknown[:5])
        raise BadRequest(
            "unknown_parameter", f"unknown query parameter(s) {names}; see README, /v1/listen"
        )
    for name, why in _NEVER.items():
        if name in query:
            raise BadRequest("unsupported_option", f"{name} is not supported: {why}")
    for name in _OFF_ONLY:
        if name in query and query[name].strip().lower() != "false":
            raise BadRequest(
                "unsupported_option", f"{name}={query[name][:32]} is not supported here"
            )
    if query.get("channels", "1").strip() != "1":
        raise BadRequest("unsupported_option", "channels must be 1: only mono audio is transcribed")
    if query.get("version", "latest") != "latest":
        raise BadRequest("unsupported_option", "version: only 'latest' is served")
    tier = query.get("tier")
    if tier is not None and tier not in _TIERS:
        raise BadRequest("unsupported_option", f"tier {tier[:32]!r} is not known")


def _language(query: MultiMapping[str], default_language: str) -> tuple[str, str]:
    """(language for the pipeline, detect mode)."""
    detect = _flag(query, "detect_language")
    language = query.get("language")
    if detect and language not in (None, "multi"):
        raise BadRequest(
            "conflicting_options", "detect_language=true and a language: send one of them"
        )
    if detect:
        return "", "detect_language"
    if language == "multi":
        return "", "multi"
    if language is None:
        return default_language, ""
    if not is_language_tag(language):
        raise BadRequest(
            "bad_language", f"language {language[:32]!r} is not a language tag like 'en-US'"
        )
    return primary_language(language), ""


def _extra(query: MultiMapping[str]) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for raw in query.getall("extra", []):
        key, sep, value = raw.partition(":")
        if not sep or not key:
            raise BadRequest("bad_extra", f"extra must be key:value, not {raw[:32]!r}")
        pairs[key] = value
    return pairs


def parse_listen(
    query: MultiMapping[str], default_language: str = "en"
) -> tuple[StreamParams, ListenOptions]:
    """The stream's parameters and the Deepgram options; BadRequest for what cannot be done."""
    _refuse_unsupported(query)
    model = resolve_model(query.get("model", "").strip())
    language, detect = _language(query, default_language)
    if model == "tiny.en" and language not in ("en", ""):
        raise BadRequest(
            "unsupported_language", f"model tiny.en speaks English only, not {language!r}"
        )
    if "encoding" not in query:
        # Deepgram reads a stream without `encoding` as containerised audio (WAV, WebM,
        # Ogg): decoding it as raw PCM would transcribe noise. Say so instead.
        raise BadRequest(
            "encoding_required",
            "encoding is required: /v1/listen takes raw PCM (encoding=linear16&sample_rate=N); "
            "containerised audio (WAV, WebM, Ogg) is not supported on the live endpoint",
        )
    interim = _flag(query, "interim_results")  # Deepgram's default: off
    native = {
        "sample_rate": query.get("sample_rate", "16000"),
        "encoding": query["encoding"],
        "language": language or "en",
        "interim_results": "true" if interim else "false",
    }
    params = dataclasses.replace(parse_stream_params(native), model=model)
    if not language:
        params = dataclasses.replace(params, language="")  # "": the worker detects it
    endpointing = query.get("endpointing")
    speech_final = True
    endpoint_ms = None
    if endpointing is not None and endpointing.strip().lower() in ("false", "true"):
        speech_final = endpointing.strip().lower() == "true"
    else:
        given = _ms(query, "endpointing")
        endpoint_ms = None if given is None else max(MIN_ENDPOINT_MS, given)
    keyterms = tuple(query.getall("keyterm", [])) + tuple(query.getall("keywords", []))
    return params, ListenOptions(
        model=model,
        detect=detect,
        interim_results=interim,
        endpoint_ms=endpoint_ms,
        speech_final=speech_final,
        utterance_end_ms=_ms(query, "utterance_end_ms") or 0,
        vad_events=_flag(query, "vad_events"),
        punctuate=_flag(query, "punctuate") or _flag(query, "smart_format"),
        keyterms=keyterms,
        extra=_extra(query),
    )


def negotiate(
    query: MultiMapping[str], settings: EdgeSettings
) -> tuple[StreamParams, EdgeSettings, DeepgramDialect]:
    """What `/v1/listen` opens a session with: its parameters, its settings (the
    request's endpointing) and its dialect. Raises BadRequest before the upgrade."""
    params, options = parse_listen(query, settings.default_language or "en")
    if options.endpoint_ms is not None:
        settings = msgspec.structs.replace(settings, endpoint_ms=options.endpoint_ms)
    return params, settings, DeepgramDialect(options)


# --- the dialect -------------------------------------------------------------

_EDGES = re.compile(r"^[^\w']+|[^\w']+$")


def _plain(word: str) -> str:
    """Deepgram's `word`: lower case, no punctuation around it."""
    return _EDGES.sub("", word.strip().lower())


def _attach(tokens: list[str]) -> list[str]:
    """Words of a text, a token that is only punctuation joined to the word before it."""
    out: list[str] = []
    for token in tokens:
        if out and not _plain(token):
            out[-1] += token
        elif _plain(token):
            out.append(token)
    return out


def _s(ms: int) -> float:
    return round(ms / 1000, 3)


class DeepgramDialect(Dialect):
    """Native events in, Deepgram's messages out, for one session."""

    def __init__(self, options: ListenOptions, clock: Callable[[], datetime] | None = None) -> None:
        self.options = options
        self._clock = clock or (lambda: datetime.now(UTC))
        self.request_id = ""
        self.created = ""
        self._sha256 = hashlib.sha256()
        self._engine = ""
        self._endpointed: set[int] = set()  # segments that ended at a pause
        self._finalized: set[int] = set()  # segments cut by a Finalize
        self._finalizing = False  # a Finalize's flush is running
        self._cut = False  # that flush cut an utterance
        self._in_speech = False
        self._last_word_end_ms: int | None = None
        self._utterance_open = False  # words since the last UtteranceEnd
        self._last_text = ""

    # --- events of the core ---------------------------------------------------

    def render(self, event: ev.ServerEvent, core: StreamCore) -> list[str]:
        if isinstance(event, ev.SessionStarted):
            self.request_id = event.session_id  # the session id: one name in logs and replies
            self.created = self._clock().isoformat(timespec="milliseconds").replace("+00:00", "Z")
            return []
        if isinstance(event, ev.SpeechStarted):
            self._in_speech = True
            if not self.options.vad_events:
                return []
            return [dg.encode(dg.SpeechStarted(channel=[0], timestamp=_s(event.t_ms)))]
        if isinstance(event, ev.SpeechEnded):
            self._in_speech = False
            if event.segment is not None:
                (self._finalized if self._finalizing else self._endpointed).add(event.segment)
                self._cut = self._cut or self._finalizing
            return self._utterance_end(core)
        if isinstance(event, ev.Interim):
            return [self._results(event, is_final=False)]
        if isinstance(event, ev.Final):
            return [self._results(event, is_final=True), *self._utterance_end(core)]
        if isinstance(event, ev.Error):
            schema = event.code == "bad_control"
            error = dg.Error(
                variant="SchemaError" if schema else event.code,
                description=event.message,
                message=self._last_text[:500] if schema else None,
            )
            return [dg.encode(error)]
        if isinstance(event, ev.Overloaded):
            return [dg.encode(dg.Error(variant="Overloaded", description=event.message))]
        return []

    def _results(self, event: ev.Interim | ev.Final, is_final: bool) -> str:
        number = event.segment
        language = ""
        if isinstance(event, ev.Final):
            self._engine = event.engine or self._engine
            language = event.language
            if event.words or event.text.strip():
                self._last_word_end_ms = event.words[-1].end_ms if event.words else event.end_ms
                self._utterance_open = True
        multi = self.options.detect == "multi" and bool(language)
        words = self._words(event.words, language if multi else None)
        said = [w.punctuated_word for w in words] if words else _attach(event.text.split())
        transcript = " ".join(said if self.options.punctuate else [_plain(w) for w in said])
        confidence = sum(w.confidence for w in words) / len(words) if words else 0.0
        alternative = dg.Alternative(
            transcript=transcript,
            confidence=round(confidence, 4),
            words=words,
            languages=[language] if multi else None,
        )
        detected = language if self.options.detect == "detect_language" and language else None
        speech_final = is_final and self.options.speech_final and number in self._endpointed
        from_finalize = is_final and number in self._finalized
        if is_final:
            self._endpointed.discard(number)
            self._finalized.discard(number)
        return dg.encode(
            dg.Results(
                channel_index=CHANNEL,
                duration=_s(event.end_ms - event.start_ms),
                start=_s(event.start_ms),
                is_final=is_final,
                speech_final=speech_final,
                from_finalize=from_finalize,
                channel=dg.Channel(alternatives=[alternative], detected_language=detected),
                metadata=self._metadata(),
            )
        )

    @staticmethod
    def _words(words: list[Word], language: str | None) -> list[dg.Word]:
        """Deepgram's words; a token that is only punctuation goes with the word before it."""
        out: list[dg.Word] = []
        for word in words:
            plain, text = _plain(word.word), word.word.strip()
            if not plain:
                if out:
                    out[-1].punctuated_word += text
                continue
            out.append(
                dg.Word(
                    word=plain,
                    start=_s(word.start_ms),
                    end=_s(word.end_ms),
                    confidence=round(word.probability, 4),
                    punctuated_word=text,
                    language=language,
                )
            )
        return out

    def _metadata(self) -> dg.ResultsMetadata:
        engine = self._engine or "escapement"
        arch, _, _name = engine.partition(":")
        return dg.ResultsMetadata(
            request_id=self.request_id,
            model_info=dg.ModelInfo(name=engine, version="", arch=arch),
            model_uuid=str(uuid.uuid5(uuid.NAMESPACE_URL, f"escapement:{engine}")),
            extra=self.options.extra or None,
        )

    def _utterance_end(self, core: StreamCore) -> list[str]:
        """`UtteranceEnd` once the stream has gone `utterance_end_ms` past the last word
        of the finals, nobody speaks and no final is owed."""
        gap = self.options.utterance_end_ms
        last = self._last_word_end_ms
        if not gap or not self._utterance_open or last is None:
            return []
        if self._in_speech or core.outstanding or core.position_ms - last < gap:
            return []
        self._utterance_open = False
        return [dg.encode(dg.UtteranceEnd(channel=CHANNEL, last_word_end=_s(last)))]

    # --- the client -------------------------------------------------------------

    def audio(self, data: bytes, core: StreamCore) -> list[str]:
        self._sha256.update(data)
        return self._utterance_end(core)

    def control(self, text: str) -> ev.ControlMessage | list[str]:
        self._last_text = text
        try:
            message = ev.decode_control(text)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            try:
                configure = dg.decode_configure(text)
            except (msgspec.DecodeError, msgspec.ValidationError):
                raise exc from None
            return [self._configure_failure(configure)]
        if isinstance(message, ev.Finalize):
            self._finalizing, self._cut = True, False
        return message

    def _configure_failure(self, configure: dg.Configure) -> str:
        if configure.keyterms is not None:
            code, why = "CONFIGURE_KEYTERMS_NOT_SUPPORTED", "keyterms cannot change mid-stream"
        else:
            code, why = "CONFIGURE_NOT_SUPPORTED", "features cannot change mid-stream"
        return dg.encode(
            dg.ConfigureFailure(request_id=self.request_id, code=code, description=why)
        )

    def finalized(self, core: StreamCore) -> list[str]:
        """A Finalize's flush is done. If it cut nothing, the final still owed last (or,
        with none owed, an empty final now) answers it with `from_finalize`."""
        self._finalizing = False
        if self._cut:
            return []
        if core.outstanding:
            self._finalized.add(max(core.outstanding))
            return []
        at = core.position_ms
        empty = ev.Final(segment=-1, text="", start_ms=at, end_ms=at)
        self._finalized.add(-1)
        return [self._results(empty, is_final=True)]

    def closing(self, code: int, reason: str, core: StreamCore) -> tuple[int, str, list[str]]:
        if code == CLOSE_IDLE:
            return 1011, f"NET-0001 {reason}", []
        if code == 1007:
            return 1008, f"DATA-0000 {reason}", []
        if code != 1000:
            return code, reason, []
        metadata = dg.Metadata(
            transaction_key="deprecated",
            request_id=self.request_id,
            sha256=self._sha256.hexdigest(),
            created=self.created,
            duration=_s(core.position_ms),
            channels=1,
        )
        return code, reason, [dg.encode(metadata)]
