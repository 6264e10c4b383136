"""The wire shapes of Deepgram's live-streaming protocol, as `GET /v1/listen` speaks it.

Server -> client JSON text frames, each with a `"type"`: `Results`, `SpeechStarted`,
`UtteranceEnd`, `Metadata`, `Error`, `ConfigureFailure`. Client -> server text
frames are the native control messages (`Finalize`, `KeepAlive`, `CloseStream`,
schemas/device.py) plus `Configure`. Times are seconds on the stream timeline
(0 = the first sample the client sent). Field names and nesting follow
Deepgram's API reference, so its SDKs parse them unchanged.
"""

from __future__ import annotations

import msgspec

# --- server -> client -------------------------------------------------------


class Word(msgspec.Struct, kw_only=True, omit_defaults=True):
    word: str  # lower case, no punctuation
    start: float
    end: float
    confidence: float
    punctuated_word: str
    language: str | None = None  # language=multi only


class Alternative(msgspec.Struct, kw_only=True, omit_defaults=True):
    transcript: str
    confidence: float
    words: list[Word]  # always sent, [] when nothing was said (apps take len() of it)
    languages: list[str] | None = None  # language=multi only


class Channel(msgspec.Struct, kw_only=True, omit_defaults=True):
    alternatives: list[Alternative]
    detected_language: str | None = None  # detect_language=true only


class ModelInfo(msgspec.Struct, kw_only=True):
    name: str
    version: str
    arch: str


class ResultsMetadata(msgspec.Struct, kw_only=True, omit_defaults=True):
    request_id: str
    model_info: ModelInfo
    model_uuid: str
    extra: dict[str, str] | None = None  # the request's `extra` pairs, echoed


class Results(msgspec.Struct, tag_field="type", tag="Results", kw_only=True):
    channel_index: list[int]  # [channel, channels]
    duration: float
    start: float
    is_final: bool
    speech_final: bool
    from_finalize: bool
    channel: Channel
    metadata: ResultsMetadata


class SpeechStarted(msgspec.Struct, tag_field="type", tag="SpeechStarted", kw_only=True):
    channel: list[int]
    timestamp: float


class UtteranceEnd(msgspec.Struct, tag_field="type", tag="UtteranceEnd", kw_only=True):
    channel: list[int]
    last_word_end: float


class Metadata(msgspec.Struct, tag_field="type", tag="Metadata", kw_only=True):
    """Sent once, last, when the stream ends normally (CloseStream, or the client closed)."""

    transaction_key: str
    request_id: str
    sha256: str  # of the audio bytes received
    created: str  # ISO 8601, UTC
    duration: float  # seconds of audio received
    channels: int


class Error(msgspec.Struct, tag_field="type", tag="Error", kw_only=True, omit_defaults=True):
    variant: str  # SchemaError: a client text message that could not be parsed
    description: str
    message: str | None = None  # SchemaError: the client's message


class ConfigureFailure(msgspec.Struct, tag_field="type", tag="ConfigureFailure", kw_only=True):
    request_id: str
    code: str
    description: str


ServerMessage = Results | SpeechStarted | UtteranceEnd | Metadata | Error | ConfigureFailure

# --- client -> server (besides the native control messages) ------------------


class Configure(msgspec.Struct, tag_field="type", tag="Configure", kw_only=True):
    keyterms: list[str] | None = None
    features: dict[str, bool] | None = None


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(ServerMessage)
_configure_decoder = msgspec.json.Decoder(Configure)


def encode(message: ServerMessage) -> str:
    return _encoder.encode(message).decode()


def decode(text: str | bytes) -> ServerMessage:
    return _decoder.decode(text)


def decode_configure(text: str | bytes) -> Configure:
    """Raise `msgspec.DecodeError` (not JSON) or `msgspec.ValidationError`."""
    return _configure_decoder.decode(text)
