"""Messages on NATS between the edge and the workers (msgpack)."""

from __future__ import annotations

import msgspec

SCHEMA_VERSION = 1


class Segment(msgspec.Struct, tag=True, kw_only=True, frozen=True):
    """One utterance of one session: everything a worker needs to transcribe it.

    Times are milliseconds on the session timeline (0 = the first sample the
    device sent; gaps the edge filled with silence count as time).
    """

    session_id: str
    edge_id: str
    segment: int
    start_ms: int
    end_ms: int
    sample_rate: int
    pcm: bytes  # s16le mono at sample_rate
    language: str = "en"
    prompt: str = ""  # committed text of the session's earlier finals, as context
    tenant: str = "default"
    final: bool = True  # False: an interim look at speech still going on
    v: int = SCHEMA_VERSION
    # The audio just before start_ms (same rate), starting at an earlier utterance's
    # start: left context for the model. Words in it are not part of this segment.
    context_pcm: bytes = b""
    # The committed text of the finals said in context_pcm: the decoder is forced
    # through it and decodes only the new words ("" when any of them is not known).
    context_text: str = ""
    # (start_ms, end_ms) of each run of voiced frames the edge's VAD heard, on the
    # session timeline: words far outside them are noise, not speech.
    voiced: list[tuple[int, int]] = []
    # Which look at this segment number: an early final published at a pause is void
    # if speech resumed; only the revision the edge confirmed counts. For an interim,
    # the look's sequence number within its utterance.
    revision: int = 0
    # With language "" (detect): the language the session's finals were in so far
    # ("" before the first), kept unless the audio clearly says another.
    session_language: str = ""
    # The model the session asked for by name (`model=`), whose workers alone take it
    # (its lane, jetstream/subjects.py); "": the deployment's default model.
    model: str = ""


class Withdrawn(msgspec.Struct, kw_only=True, frozen=True):
    """A segment revision the edge took back out of the queue (speech resumed after an
    early final's pause): whatever a worker would say of it is ignored."""

    session_id: str
    segment: int
    revision: int


class Word(msgspec.Struct, frozen=True):
    """A recognised word with its times on the session timeline."""

    word: str
    start_ms: int
    end_ms: int
    probability: float = 1.0


class Result(msgspec.Struct, tag=True, kw_only=True, frozen=True):
    """A worker's transcript of one segment."""

    session_id: str
    segment: int
    start_ms: int
    end_ms: int
    text: str
    words: list[Word] = []
    final: bool = True
    engine: str = ""
    inference_ms: float = 0.0
    language: str = ""
    v: int = SCHEMA_VERSION
    revision: int = 0  # the segment's revision this answers


class ErrorResult(msgspec.Struct, tag=True, kw_only=True, frozen=True):
    """A segment that could not be transcribed, and why."""

    session_id: str
    segment: int
    code: str
    message: str
    retryable: bool = False
    v: int = SCHEMA_VERSION
    revision: int = 0  # the segment's revision this answers


ResultMessage = Result | ErrorResult


class SessionRecord(msgspec.Struct, kw_only=True):
    """Where a session stands (KV bucket ASR_SESSIONS), so it can resume on any edge."""

    session_id: str
    tenant: str
    edge_id: str
    sample_rate: int
    language: str
    framing: str = "raw"
    next_segment: int = 0
    position_ms: int = 0  # end of the audio received so far, on the session timeline
    state: str = "open"  # open | detached (socket lost: resumable) | closed (CloseStream)
    detached_at: float = 0.0  # unix seconds
    v: int = SCHEMA_VERSION
    failed: list[int] = []  # recent segments the edge could not queue (no result will come)
    # recent segment -> the revision that counts: a resume replays only its result
    revisions: dict[int, int] = {}
    # Ownership: each resume claims the record with a higher epoch (a compare-and-set on
    # its KV revision); a socket of an older epoch may no longer save it.
    epoch: int = 0
    resume_id: str = ""  # the id of the one resume token that may resume it now ("": any)


_segment_encoder = msgspec.msgpack.Encoder()
_segment_decoder = msgspec.msgpack.Decoder(Segment)
_result_encoder = msgspec.msgpack.Encoder()
_result_decoder = msgspec.msgpack.Decoder(ResultMessage)


_record_encoder = msgspec.msgpack.Encoder()
_record_decoder = msgspec.msgpack.Decoder(SessionRecord)


def encode_record(record: SessionRecord) -> bytes:
    return _record_encoder.encode(record)


def decode_record(data: bytes) -> SessionRecord:
    return _record_decoder.decode(data)


def encode_segment(segment: Segment) -> bytes:
    return _segment_encoder.encode(segment)


def decode_segment(data: bytes) -> Segment:
    """Raise `msgspec.DecodeError` / `msgspec.ValidationError` on bad input."""
    return _segment_decoder.decode(data)


_withdrawn_encoder = msgspec.msgpack.Encoder()
_withdrawn_decoder = msgspec.msgpack.Decoder(Withdrawn)


def encode_withdrawn(notice: Withdrawn) -> bytes:
    return _withdrawn_encoder.encode(notice)


def decode_withdrawn(data: bytes) -> Withdrawn:
    """Raise `msgspec.DecodeError` / `msgspec.ValidationError` on bad input."""
    return _withdrawn_decoder.decode(data)


def encode_result(result: ResultMessage) -> bytes:
    return _result_encoder.encode(result)


def decode_result(data: bytes) -> ResultMessage:
    return _result_decoder.decode(data)
