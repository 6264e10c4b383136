"""The device protocol of `GET /v1/stream`.

Client -> server: binary frames of raw PCM s16le mono, or msgpack `AudioChunk`s
when the session was opened with `framing=msgpack`; text frames of JSON control
messages. Server -> client: JSON text frames, each with a `"type"` naming it.
"""

from __future__ import annotations

import msgspec

from schemas.pipeline import SCHEMA_VERSION, Word

# A refused upgrade (HTTP 4xx/503) names its reason here as well as in the JSON
# body, for clients (browsers, WebSocket libraries) that cannot read the body.
REASON_HEADER = "X-Escapement-Reason"

# --- client -> server -------------------------------------------------------


class AudioChunk(msgspec.Struct, frozen=True):
    """A numbered chunk of PCM; lets the edge repair loss and reordering."""

    seq: int
    pcm: bytes
    capture_ms: int | None = None


class Finalize(msgspec.Struct, tag=True, frozen=True):
    """Cut the current utterance now and transcribe it."""


class KeepAlive(msgspec.Struct, tag=True, frozen=True):
    """Keep an idle socket open."""


class CloseStream(msgspec.Struct, tag=True, frozen=True):
    """Flush, deliver every outstanding final, then close normally (1000)."""


class Interrupt(msgspec.Struct, tag=True, frozen=True):
    """Barge-in: drop interim work that has not been sent yet."""


ControlMessage = Finalize | KeepAlive | CloseStream | Interrupt

# --- server -> client -------------------------------------------------------


class SessionStarted(msgspec.Struct, tag=True, kw_only=True):
    session_id: str
    resume_token: str
    sample_rate: int
    language: str
    v: int = SCHEMA_VERSION


class SpeechStarted(msgspec.Struct, tag=True, kw_only=True):
    t_ms: int  # speech onset on the session timeline


class Interim(msgspec.Struct, tag=True, kw_only=True):
    """What has been said so far in the utterance that will become `segment`'s Final.

    The first `stable_prefix` words were agreed by two consecutive looks and are
    not taken back by later interims; the rest may still change. The Final replaces it.
    """

    segment: int
    text: str
    start_ms: int
    end_ms: int
    words: list[Word] = []
    stable_prefix: int = 0


class Final(msgspec.Struct, tag=True, kw_only=True):
    segment: int
    text: str
    start_ms: int
    end_ms: int
    words: list[Word] = []
    engine: str = ""
    inference_ms: float = 0.0
    language: str = ""


class SpeechEnded(msgspec.Struct, tag=True, kw_only=True):
    t_ms: int  # end of the utterance (incl. trailing pad) on the timeline
    segment: int | None = None  # None: the sound was too short to be speech


class Error(msgspec.Struct, tag=True, kw_only=True):
    code: str
    message: str
    segment: int | None = None


class Overloaded(msgspec.Struct, tag=True, kw_only=True):
    message: str
    segment: int | None = None


class Gap(msgspec.Struct, tag=True, kw_only=True):
    """Numbered chunks given up as lost (framing=msgpack): from `t_ms` on the session
    timeline, `lost_ms` of silence stands for chunks `first_seq` .. `first_seq + lost_chunks - 1`."""

    t_ms: int
    lost_ms: int
    lost_chunks: int
    first_seq: int


class ChunkStats(msgspec.Struct, tag=True, kw_only=True):
    """How the numbered chunks of this session arrived so far (framing=msgpack): sent
    after late or duplicate chunks (at most once a second) and on Finalize / CloseStream.
    `late`: arrived after their place was filled with silence (dropped, never spliced in)."""

    chunks: int
    reordered: int
    late: int
    duplicates: int
    lost_chunks: int
    lost_ms: int


ServerEvent = (
    SessionStarted
    | SpeechStarted
    | Interim
    | Final
    | SpeechEnded
    | Error
    | Overloaded
    | Gap
    | ChunkStats
)

_json_encoder = msgspec.json.Encoder()
_control_decoder = msgspec.json.Decoder(ControlMessage)
_event_decoder = msgspec.json.Decoder(ServerEvent)
_chunk_encoder = msgspec.msgpack.Encoder()
_chunk_decoder = msgspec.msgpack.Decoder(AudioChunk)


def encode_event(event: ServerEvent) -> str:
    return _json_encoder.encode(event).decode()


def decode_event(text: str | bytes) -> ServerEvent:
    return _event_decoder.decode(text)


def encode_control(message: ControlMessage) -> str:
    return _json_encoder.encode(message).decode()


def decode_control(text: str | bytes) -> ControlMessage:
    """Raise `msgspec.DecodeError` (not JSON) or `msgspec.ValidationError`."""
    return _control_decoder.decode(text)


def encode_chunk(chunk: AudioChunk) -> bytes:
    return _chunk_encoder.encode(chunk)


def decode_chunk(data: bytes) -> AudioChunk:
    return _chunk_decoder.decode(data)
