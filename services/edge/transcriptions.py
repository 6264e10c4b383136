"""`POST /v1/audio/transcriptions`: OpenAI's file transcription API, on the live pipeline.

An app that uses the official `openai` SDK (`client.audio.transcriptions.create`)
switches by pointing `base_url` at the edge (`http://edge:8080/v1`). The form
fields are OpenAI's: `file`, `model`, `language`, `prompt`, `response_format`
(`json`, `text`, `verbose_json`, `srt`, `vtt`), `timestamp_granularities[]`
(`word`, `segment`), `temperature`, `stream`. Answers and errors are in
OpenAI's shapes (`{"error": {"message", "type", "param", "code"}}`).

Credentials and admission are those of `/v1/stream`: the same `Authorization:
Bearer <key>` (what the SDK sends), and an upload counts as one open session
while it runs, so it is refused with 503/429 and `Retry-After` exactly when a
device would be. The file itself becomes one `FileJob` (`services.edge.filejob`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import BodyPartReader, web
from nats.aio.client import Client as NATS

from jetstream import subjects
from observability.metrics import ATTR_REASON, Metrics
from schemas.device import REASON_HEADER
from schemas.pipeline import Result
from services.common.discovery import last_seen, worker_languages
from services.common.languages import is_language_tag
from services.edge.admission import Admission
from services.edge.auth import Authenticator, AuthError
from services.edge.filejob import (
    RATE,
    AudioError,
    FileJob,
    JobConfig,
    JobFailed,
    TooLong,
    cut_file,
    decode_file,
)
from services.edge.params import BadRequest, ModelUnavailable, route
from services.edge.router import ResultRouter
from services.edge.settings import EdgeSettings
from services.edge.vad import Utterance, VadConfig

log = logging.getLogger(__name__)

PATH = "/v1/audio/transcriptions"

# OpenAI's transcription models: all mean the pipeline's own (default) model.
OPENAI_MODELS = frozenset(
    {
        "whisper-1",
        "gpt-4o-transcribe",
        "gpt-4o-mini-transcribe",
        "gpt-4o-mini-transcribe-2025-12-15",
        "gpt-4o-transcribe-diarize",
        "gpt-transcribe",
    }
)
# Our own names (`escapement up --model`): the workers decode with the model they run.
OWN_MODELS = frozenset({"escapement", "tiny.en", "base"})
FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
GRANULARITIES = ("word", "segment")
_FIELD_BYTES = 64 * 1024  # any form field but the file
# verbose_json names the language as OpenAI does; codes not listed are given as they are
LANGUAGE_NAMES = {
    "en": "english", "de": "german", "fr": "french", "es": "spanish", "it": "italian",
    "pt": "portuguese", "nl": "dutch", "pl": "polish", "ru": "russian", "uk": "ukrainian",
    "sv": "swedish", "da": "danish", "no": "norwegian", "fi": "finnish", "cs": "czech",
    "tr": "turkish", "ar": "arabic", "he": "hebrew", "hi": "hindi", "ja": "japanese",
    "ko": "korean", "zh": "chinese", "el": "greek", "hu": "hungarian", "ro": "romanian",
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class TranscriptionConfig:
    max_file_bytes: int = 25 * 1024 * 1024  # OpenAI's own limit
    max_duration_s: float = 3600.0  # decoded audio (1 h at 16 kHz is ~115 MB of PCM)
    decodes_at_once: int = 2  # uploads decoded and cut at the same time, per edge
    job: JobConfig = field(default_factory=JobConfig)


class Transcriptions:
    """The endpoint's state on one edge: its limits, and a bound on concurrent decoding."""

    def __init__(self, config: TranscriptionConfig | None = None) -> None:
        self.config = config or TranscriptionConfig()
        self._decoding: asyncio.Semaphore | None = None
        self.jobs = 0  # finished

    @property
    def decoding(self) -> asyncio.Semaphore:
        if self._decoding is None:  # made on the running loop
            self._decoding = asyncio.Semaphore(self.config.decodes_at_once)
        return self._decoding


@dataclass(frozen=True)
class Keys:
    """Where the edge's app keeps what the endpoint uses."""

    settings: web.AppKey[EdgeSettings]
    nats: web.AppKey[NATS]
    router: web.AppKey[ResultRouter]
    edge_id: web.AppKey[str]
    auth: web.AppKey[Authenticator]
    admission: web.AppKey[Admission]
    metrics: web.AppKey[Metrics]
    state: web.AppKey[Transcriptions]


class ApiError(Exception):
    """An answer in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after = retry_after

    @property
    def type(self) -> str:
        if self.status == 429:
            return "requests"
        return "server_error" if self.status >= 500 else "invalid_request_error"

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> web.Response:
        headers = {REASON_HEADER: self.code or self.type}
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, round(self.retry_after)))
        return web.json_response(self.body(), status=self.status, headers=headers)


@dataclass(frozen=True, slots=True)
class Options:
    file: bytes
    filename: str
    model: str
    language: str = ""  # "" : the model detects it
    prompt: str = ""
    response_format: str = "json"
    granularities: tuple[str, ...] = ()
    temperature: float = 0.0
    stream: bool = False


# --- reading the form ----------------------------------------------------------------


async def read_form(request: web.Request, max_file_bytes: int) -> tuple[dict[str, list[str]], Any]:
    """The form's text fields (each name may repeat) and the file part as (bytes, filename)."""
    if not request.content_type.startswith("multipart/"):
        raise ApiError(
            400,
            f"the body must be multipart/form-data, not {request.content_type[:64]!r}",
            code="invalid_content_type",
        )
    if request.content_length and request.content_length > max_file_bytes + _FIELD_BYTES * 16:
        raise _too_big(max_file_bytes)
    fields: dict[str, list[str]] = {}
    upload: tuple[bytes, str] | None = None
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise ApiError(400, "nested multipart bodies are not accepted", code="bad_form")
            if part.name == "file":
                upload = (await _read_bounded(part, max_file_bytes), part.filename or "")
            elif part.name:
                raw = await _read_bounded(part, _FIELD_BYTES, param=part.name)
                fields.setdefault(part.name, []).append(raw.decode("utf-8", "replace"))
    except (ValueError, AssertionError) as exc:  # aiohttp's parser on a malformed body
        raise ApiError(400, f"the multipart body is malformed: {exc}", code="bad_form") from exc
    return fields, upload


async def _read_bounded(part: BodyPartReader, limit: int, param: str = "file") -> bytes:
    chunks, size = [], 0
    while chunk := await part.read_chunk(256 * 1024):
        size += len(chunk)
        if size > limit:
            if param == "file":
                raise _too_big(limit)
            raise ApiError(400, f"{param} is longer than {limit} bytes", param=param)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_big(limit: int) -> ApiError:
    return ApiError(
        413,
        f"the file is larger than {limit / 1024 / 1024:.0f} MB",
        param="file",
        code="file_too_large",
    )


def _one(fields: Mapping[str, list[str]], name: str, default: str = "") -> str:
    values = fields.get(name)
    return values[-1].strip() if values else default


def parse_options(fields: Mapping[str, list[str]], upload: tuple[bytes, str] | None) -> Options:
    if upload is None:
        raise ApiError(
            400, "the form has no 'file' part: send the audio file as 'file'", param="file"
        )
    data, filename = upload
    if not data:
        raise ApiError(400, "the file is empty", param="file", code="invalid_file")
    model = _one(fields, "model")
    if not model:
        raise ApiError(400, "'model' is required (e.g. whisper-1)", param="model")
    if model not in OPENAI_MODELS and model not in OWN_MODELS:
        known = ", ".join(sorted(OPENAI_MODELS | OWN_MODELS))
        raise ApiError(
            400,
            f"the model {model[:64]!r} does not exist here; use one of {known}",
            param="model",
            code="model_not_found",
        )
    language = _one(fields, "language")
    if language and not is_language_tag(language):
        raise ApiError(
            400,
            f"language {language[:32]!r} is not an ISO-639-1 code like 'en' or 'de'",
            param="language",
        )
    response_format = _one(fields, "response_format", "json")
    if response_format not in FORMATS:
        raise ApiError(
            400,
            f"response_format {response_format[:32]!r} is not supported; use one of "
            + ", ".join(FORMATS),
            param="response_format",
        )
    granularities = fields.get("timestamp_granularities[]", []) + fields.get(
        "timestamp_granularities", []
    )
    for g in granularities:
        if g not in GRANULARITIES:
            raise ApiError(
                400,
                f"timestamp_granularities: {g[:32]!r} is not 'word' or 'segment'",
                param="timestamp_granularities",
            )
    raw_t = _one(fields, "temperature", "0")
    try:
        temperature = float(raw_t)
    except ValueError:
        temperature = math.nan
    if not 0.0 <= temperature <= 1.0:
        raise ApiError(
            400, f"temperature {raw_t[:32]!r}: a number from 0 to 1", param="temperature"
        )
    stream = _one(fields, "stream", "false").lower()
    if stream not in ("true", "false"):
        raise ApiError(400, f"stream {stream[:16]!r}: use true or false", param="stream")
    return Options(
        file=data,
        filename=filename,
        model=model,
        language=language,
        prompt=_one(fields, "prompt"),
        response_format=response_format,
        granularities=tuple(dict.fromkeys(granularities)),
        temperature=temperature,
        stream=stream == "true",
    )


# --- answers ---------------------------------------------------------------------------


@dataclass(slots=True)
class Transcript:
    """What the job gave, in file order: the cuts that said something, with their results."""

    duration_s: float
    pieces: list[tuple[Utterance, Result]] = field(default_factory=list)

    @property
    def text(self) -> str:
        return " ".join(r.text.strip() for _, r in self.pieces)

    @property
    def language(self) -> str:
        code = next((r.language for _, r in self.pieces if r.language), "en")
        return LANGUAGE_NAMES.get(code, code)


def _span_s(cut: Utterance, result: Result) -> tuple[float, float]:
    """A piece's time on the file: its words' span, else the cut's."""
    if result.words:
        return result.words[0].start_ms / 1000, result.words[-1].end_ms / 1000
    return cut.start_ms / 1000, cut.end_ms / 1000


def _segment_json(i: int, cut: Utterance, result: Result) -> dict[str, Any]:
    start, end = _span_s(cut, result)
    text = result.text.strip()
    probs = [w.probability for w in result.words if w.probability > 0]
    raw = text.encode()
    return {
        "id": i,
        "seek": cut.start_ms // 10,  # centiseconds, as Whisper's mel frames
        "start": start,
        "end": end,
        "text": " " + text,
        "tokens": [],
        "temperature": 0.0,
        # from the words' probabilities (no token log-probabilities leave the worker)
        "avg_logprob": sum(math.log(p) for p in probs) / len(probs) if probs else 0.0,
        "compression_ratio": len(raw) / len(zlib.compress(raw)) if raw else 0.0,
        "no_speech_prob": 0.0,  # segments the decoder thought silent gave no text
    }


def verbose_json(t: Transcript, granularities: tuple[str, ...]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "task": "transcribe",
        "language": t.language,
        "duration": round(t.duration_s, 3),
        "text": t.text,
    }
    if not granularities or "segment" in granularities:
        body["segments"] = [_segment_json(i, c, r) for i, (c, r) in enumerate(t.pieces)]
    if "word" in granularities:
        body["words"] = [
            {"word": w.word, "start": w.start_ms / 1000, "end": w.end_ms / 1000}
            for _, r in t.pieces
            for w in r.words
        ]
    body["usage"] = {"type": "duration", "seconds": math.ceil(t.duration_s)}
    return body


def _clock(seconds: float, sep: str) -> str:
    ms = round(seconds * 1000)
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def subtitles(t: Transcript, vtt: bool) -> str:
    sep = "." if vtt else ","
    cues = []
    for i, (cut, result) in enumerate(t.pieces, 1):
        start, end = _span_s(cut, result)
        times = f"{_clock(start, sep)} --> {_clock(end, sep)}"
        cues.append(
            f"{times}\n{result.text.strip()}\n" if vtt else f"{i}\n{times}\n{result.text.strip()}\n"
        )
    return ("WEBVTT\n\n" if vtt else "") + "\n".join(cues)


def answer(t: Transcript, opts: Options) -> web.Response:
    fmt = opts.response_format
    if fmt == "text":
        return web.Response(text=t.text + "\n", content_type="text/plain")
    if fmt in ("srt", "vtt"):
        return web.Response(
            text=subtitles(t, fmt == "vtt"),
            content_type=f"text/{'vtt' if fmt == 'vtt' else 'plain'}",
        )
    if fmt == "verbose_json":
        return web.json_response(verbose_json(t, opts.granularities))
    return web.json_response(
        {"text": t.text, "usage": {"type": "duration", "seconds": math.ceil(t.duration_s)}}
    )


def _sse(event: Mapping[str, Any]) -> bytes:
    return f"data: {json.dumps(event, separators=(',', ':'))}\n\n".encode()


async def stream_answer(request: web.Request, job: FileJob) -> web.StreamResponse:
    """Server-sent events as the cuts finish: `transcript.text.delta` each, then
    `transcript.text.done` with the whole text (an `error` event if the job fails)."""
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    texts: list[str] = []
    try:
        try:
            async for _, result in job.results():
                text = result.text.strip()
                if not text:
                    continue
                delta = (" " if texts else "") + text
                texts.append(text)
                await response.write(_sse({"type": "transcript.text.delta", "delta": delta}))
            await response.write(_sse({"type": "transcript.text.done", "text": " ".join(texts)}))
        except JobFailed as exc:
            err = ApiError(exc.status, exc.message, code=exc.code)
            await response.write(_sse(err.body()))
        await response.write_eof()
    except ConnectionResetError:
        log.info("transcription %s: the client left mid-stream", job.id)
    return response


# --- the handler ---------------------------------------------------------------------


def routes(keys: Keys) -> list[web.RouteDef]:
    async def transcriptions(request: web.Request) -> web.StreamResponse:
        try:
            return await _transcribe(request, keys)
        except ApiError as exc:
            if exc.status in (401, 413, 429, 503):
                request.app[keys.metrics].sessions_refused.add(1, {ATTR_REASON: exc.code or ""})
            return exc.response()
        except Exception:  # a fault of ours: said in OpenAI's shape, and logged whole
            log.exception("transcription failed")
            return ApiError(
                500, "the transcription failed on the server", code="server_error"
            ).response()

    return [web.post(PATH, transcriptions)]


async def _transcribe(request: web.Request, keys: Keys) -> web.StreamResponse:
    app = request.app
    try:
        principal = app[keys.auth].authenticate(request.headers, request.query)
    except AuthError as exc:
        raise ApiError(exc.status, exc.message, code=exc.reason) from None
    admission = app.get(keys.admission)
    if admission is None:
        raise ApiError(503, "the edge is still starting", code="nats_unavailable", retry_after=2)
    refusal = admission.check(principal.tenant)
    if refusal is not None:
        raise ApiError(
            refusal.status, refusal.message, code=refusal.reason, retry_after=refusal.retry_after
        )
    state = app[keys.state]
    fields, upload = await read_form(request, state.config.max_file_bytes)
    opts = parse_options(fields, upload)
    model = _route(app, keys, opts.model)
    lane = subjects.lane_of_model(model)
    if lane and (refusal := admission.check(principal.tenant, lane)) is not None:
        raise ApiError(
            refusal.status, refusal.message, code=refusal.reason, retry_after=refusal.retry_after
        )
    admission.opened(principal.tenant, lane)  # an upload holds a place like a session
    try:
        pcm, cuts = await _prepare(app, keys, state, opts)
        job = FileJob(
            app[keys.nats].jetstream(),
            state.config.job,
            edge_id=app[keys.edge_id],
            tenant=principal.tenant,
            pcm=pcm,
            cuts=cuts,
            language=opts.language,
            prompt=opts.prompt,
            model=model,
        )
        log.info(
            "transcription %s: %s, %.1f s of audio in %d cut(s) (tenant %s, model %s)",
            job.id, opts.filename or "file", len(pcm) / 2 / RATE, len(cuts),
            principal.tenant, opts.model,
        )  # fmt: skip
        router = app[keys.router]
        router.register(job)
        try:
            if opts.stream:
                return await stream_answer(request, job)
            transcript = Transcript(duration_s=len(pcm) / 2 / RATE)
            async for cut, result in job.results():
                if request.transport is None or request.transport.is_closing():
                    log.info("transcription %s: the client left; stopped", job.id)
                    return web.Response(status=499)  # nobody reads it
                if result.text.strip():
                    transcript.pieces.append((cut, result))
            return answer(transcript, opts)
        except JobFailed as exc:
            raise ApiError(
                exc.status, exc.message, code=exc.code, retry_after=exc.retry_after
            ) from exc
        finally:
            router.unregister(job)
            state.jobs += 1
    finally:
        admission.closed(principal.tenant, lane)


def _route(app: web.Application, keys: Keys, name: str) -> str:
    """The model an upload's segments go to ("": the default model's workers). OpenAI's
    names mean the default; ours are routed like a session's `model=`."""
    if name in OPENAI_MODELS or name == "escapement":
        return ""
    workers = worker_languages(last_seen(app[keys.nats], subjects.WORKER_SERVICE))
    try:
        return route(name, workers, app[keys.settings].default_model)[0]
    except ModelUnavailable as exc:
        raise ApiError(503, exc.message, code="no_workers", retry_after=5) from None
    except BadRequest as exc:
        raise ApiError(400, exc.message, param="model", code="model_not_found") from None


async def _prepare(
    app: web.Application, keys: Keys, state: Transcriptions, opts: Options
) -> tuple[bytes, list[Utterance]]:
    """Decode and cut the file in an executor (both grow with the file)."""
    loop = asyncio.get_running_loop()
    s = app[keys.settings]
    vad = VadConfig(  # the cuts a live session gets (early finals aside: a file has no wait)
        mode=s.vad_mode,
        preroll_ms=s.preroll_ms,
        endpoint_ms=s.endpoint_ms,
        trailing_pad_ms=s.trailing_pad_ms,
        min_speech_ms=s.min_speech_ms,
        max_utterance_ms=min(s.max_utterance_ms, state.config.job.window_ms),
    )
    async with state.decoding:
        try:
            pcm = await loop.run_in_executor(
                None, decode_file, opts.file, state.config.max_duration_s
            )
        except AudioError as exc:
            raise ApiError(400, str(exc), param="file", code="invalid_file") from None
        except TooLong as exc:
            raise ApiError(413, str(exc), param="file", code="audio_too_long") from None
        cuts = await loop.run_in_executor(None, cut_file, pcm, vad)
    return pcm, cuts


__all__ = ["PATH", "Keys", "TranscriptionConfig", "Transcriptions", "routes"]
