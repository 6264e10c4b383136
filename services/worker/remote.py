"""A remote engine: any OpenAI-compatible `POST /v1/audio/transcriptions` server.

The segment's PCM goes as a WAV file, with `response_format=verbose_json` and
word timestamps asked for; its context goes as the `prompt` (the committed
text of the earlier utterances: a remote server gets no audio context). Words
come back in seconds from the file's start and are put on the session
timeline. A coroutine (aiohttp), so the chain cancels it at its deadline.

Failures: a server that cannot answer (connection refused, 5xx, 401/403/404,
408, 429, a body that is not verbose_json) is a `RetryableEngineError`, which
opens its breaker; any other 4xx is this segment's fault (`PoisonSegment`).
"""

from __future__ import annotations

import logging
import time

import aiohttp
import msgspec

from schemas.pipeline import Segment, Word
from services.common.audio import wav_bytes
from services.worker.engines import PoisonSegment, RetryableEngineError, Transcription

log = logging.getLogger(__name__)

ENGINE_FAULTS = {401, 403, 404, 408, 429}  # the server or its configuration, not the segment


class VerboseWord(msgspec.Struct):
    word: str
    start: float
    end: float


class VerboseJson(msgspec.Struct):
    """The part of OpenAI's `verbose_json` transcription we read."""

    text: str
    language: str = ""
    words: list[VerboseWord] = []


_decoder = msgspec.json.Decoder(VerboseJson)


class OpenAIEngine:
    def __init__(
        self,
        base_url: str,
        name: str,
        api_key: str = "",
        model: str = "whisper-1",
        timeout_s: float = 30.0,
    ) -> None:
        self.url = f"{base_url.rstrip('/')}/audio/transcriptions"
        self.name = name
        self.model = model
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._http: aiohttp.ClientSession | None = None

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        return self._http

    def _form(self, segment: Segment) -> aiohttp.FormData:
        form = aiohttp.FormData()
        form.add_field(
            "file",
            wav_bytes(segment.pcm, segment.sample_rate),
            filename=f"{segment.session_id}-{segment.segment}.wav",
            content_type="audio/wav",
        )
        form.add_field("model", self.model)
        form.add_field("response_format", "verbose_json")
        form.add_field("timestamp_granularities[]", "word")
        if segment.language:
            form.add_field("language", segment.language)
        prompt = segment.context_text or segment.prompt
        if prompt:
            form.add_field("prompt", prompt)
        return form

    async def transcribe_async(self, segment: Segment) -> Transcription:
        if len(segment.pcm) % 2:
            raise PoisonSegment(f"PCM of odd length {len(segment.pcm)}")
        started = time.perf_counter()
        try:
            async with self._session().post(self.url, data=self._form(segment)) as r:
                body = await r.read()
                status = r.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RetryableEngineError(f"{self.name}: {type(exc).__name__}: {exc}") from exc
        if status >= 500 or status in ENGINE_FAULTS:
            raise RetryableEngineError(f"{self.name}: HTTP {status}: {body[:200]!r}")
        if status >= 400:
            raise PoisonSegment(f"{self.name} refused the segment: HTTP {status}: {body[:200]!r}")
        try:
            answer = _decoder.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise RetryableEngineError(f"{self.name}: not verbose_json: {exc}") from exc
        lo, hi = segment.start_ms, segment.end_ms
        words = []
        for w in answer.words:
            start = min(max(lo + round(w.start * 1000), lo), hi)
            words.append(Word(w.word.strip(), start, min(max(lo + round(w.end * 1000), start), hi)))
        # verbose_json names the language in full ("english"); keep the code asked for
        language = answer.language if len(answer.language) <= 3 else segment.language
        return Transcription(
            text=answer.text.strip(),
            words=words,
            language=language or segment.language,
            inference_ms=(time.perf_counter() - started) * 1000,
        )

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.close()
