"""`escapement dlq`: list, replay and remove dead-lettered segments (stream ASR_DEAD).

    escapement dlq ls [--json]
    escapement dlq replay (--segment SESSION:N | --all)
    escapement dlq rm (--segment SESSION:N | --all)

A replay queues the original segment again on ASR_SEGMENTS with a fresh
replay tag in its `Escapement-Replay` header, and under a fresh Nats-Msg-Id
(`<session>:<n>:replay-<tag>`) so the stream's dedup window does not swallow
it, then removes the dead letter. The worker gives its result an id of its
own (`subjects.result_msg_id` with the tag), so it is not taken for the
`ErrorResult` the device got before. The result goes to the session's results
subject as usual: to the device if it is still connected, and onto
ASR_TRANSCRIPTS for a device that resumes.

Exit status: 0 done; 1 nothing matched, or some could not be replayed;
2 usage; 3 NATS unreachable or without the Escapement streams.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
from dataclasses import dataclass
from datetime import UTC

import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg
from nats.js.errors import NotFoundError

from jetstream import subjects
from services.common.config import nats_servers
from services.common.natsconn import redact

H = subjects.Header
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


class Unreachable(Exception):
    """NATS cannot be reached, or holds no ASR_DEAD stream."""


class DeadLetter(msgspec.Struct, kw_only=True):
    """One dead letter, as `dlq ls --json` prints it."""

    seq: int  # on ASR_DEAD
    segment_id: str  # "<session>:<n>", '' when the message named none
    session: str
    edge: str
    segment: int | None
    reason: str
    message: str
    attempts: int
    subject: str  # where it was queued
    when: str  # when it was dead-lettered, ISO 8601 UTC
    bytes: int


@dataclass(frozen=True)
class Stored:
    letter: DeadLetter
    raw: RawStreamMsg


def describe(raw: RawStreamMsg) -> DeadLetter:
    headers = raw.headers or {}
    subject = headers.get(H.DEAD_SUBJECT, "")
    ids = subjects.ids_from_segments_subject(subject)
    edge, session = ids if ids else ("", headers.get(H.SESSION, ""))
    parsed = subjects.parse_segment_msg_id(headers.get(H.DEAD_SEGMENT, ""))
    number: int | None = None
    segment_id = ""
    if parsed:
        session, number = parsed
        segment_id = subjects.segment_msg_id(session, number)
    try:
        attempts = int(headers.get(H.DEAD_ATTEMPTS, "0"))
    except ValueError:
        attempts = 0
    when = raw.time.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if raw.time else ""
    return DeadLetter(
        seq=raw.seq or 0,
        segment_id=segment_id,
        session=session,
        edge=edge,
        segment=number,
        reason=headers.get(H.DEAD_REASON, ""),
        message=headers.get(H.DEAD_MESSAGE, ""),
        attempts=attempts,
        subject=subject,
        when=when,
        bytes=len(raw.data or b""),
    )


async def read_all(js: JetStreamContext) -> list[Stored]:
    """Every dead letter, oldest first."""
    out: list[Stored] = []
    seq = 1
    while True:
        try:
            raw = await js.get_msg(subjects.STREAM_DEAD, seq, subject=subjects.DEAD_ALL, next=True)
        except NotFoundError:
            return out
        out.append(Stored(describe(raw), raw))
        seq = (raw.seq or seq) + 1


def select(stored: list[Stored], segment: str | None) -> list[Stored]:
    if segment is None:
        return stored
    return [s for s in stored if s.letter.segment_id == segment]


def replay_headers(raw: RawStreamMsg, letter: DeadLetter) -> dict[str, str]:
    """The original headers, with a fresh replay tag and Nats-Msg-Id."""
    dead_only = {h.value for h in (H.DEAD_REASON, H.DEAD_MESSAGE, H.DEAD_ATTEMPTS, H.DEAD_SUBJECT)}
    dead_only |= {H.DEAD_SEQUENCE.value, H.DEAD_SEGMENT.value}
    headers = {
        k: v
        for k, v in (raw.headers or {}).items()
        if k not in dead_only and not k.startswith("Nats-")
    }
    tag = subjects.replay_tag(secrets.token_hex(4))
    headers[H.REPLAY] = tag
    if letter.segment is not None:
        headers[H.MSG_ID] = subjects.replay_msg_id(letter.session, letter.segment, tag)
    return headers


async def replay(js: JetStreamContext, item: Stored) -> str:
    """Queue one dead letter again, then remove it; returns a line for the operator."""
    letter = item.letter
    ids = subjects.ids_from_segments_subject(letter.subject)
    if ids is None:
        raise ValueError(f"queued on {letter.subject!r}, not a session's segments subject")
    ack = await js.publish(
        subjects.segments_subject(*ids, lane=subjects.lane_of_subject(letter.subject)),
        item.raw.data or b"",
        headers=replay_headers(item.raw, letter),
        stream=subjects.STREAM_SEGMENTS,
    )
    await js.delete_msg(subjects.STREAM_DEAD, letter.seq)
    name = letter.segment_id or f"dead letter {letter.seq}"
    return f"replayed {name}: queued as {subjects.STREAM_SEGMENTS} seq {ack.seq}"


def table(letters: list[DeadLetter]) -> str:
    rows = [("SEGMENT", "SESSION", "REASON", "ATTEMPTS", "WHEN")]
    rows += [
        (d.segment_id or f"? (seq {d.seq})", d.session or "?", d.reason, str(d.attempts), d.when)
        for d in letters
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


async def connect(url: str) -> NATS:
    """Connect once, failing fast with the reason (an operator tool: no endless reconnects)."""
    last: list[BaseException] = []

    async def error_cb(exc: Exception) -> None:
        last.append(exc)

    try:
        nc = await nats.connect(
            servers=nats_servers(url),
            name="escapement-dlq",
            connect_timeout=3,
            max_reconnect_attempts=1,
            reconnect_time_wait=0.2,
            error_cb=error_cb,
        )
    except (OSError, NatsError, TimeoutError) as exc:
        why = last[-1] if last else exc
        raise Unreachable(
            f"cannot reach NATS at {redact(url)}: {why or type(why).__name__}"
        ) from None
    try:
        await nc.jetstream().stream_info(subjects.STREAM_DEAD)
    except NotFoundError:
        await nc.close()
        raise Unreachable(
            f"NATS at {redact(url)} has no {subjects.STREAM_DEAD} stream: is this Escapement's NATS? "
            "(the edge or `escapement up` creates it)"
        ) from None
    except (NatsError, TimeoutError) as exc:
        await nc.close()
        raise Unreachable(
            f"NATS at {redact(url)} does not answer JetStream requests: {exc!r}"
        ) from None
    return nc


async def run(args: argparse.Namespace) -> int:
    nc = await connect(args.nats_url)
    try:
        js = nc.jetstream()
        stored = await read_all(js)
        if args.command == "ls":
            letters = [s.letter for s in stored]
            if args.json:
                print(msgspec.json.encode(letters).decode())
            elif letters:
                print(table(letters))
                print(f"-- {len(letters)} dead letter(s)")
            else:
                print("no dead letters")
            return 0
        chosen = select(stored, args.segment)
        if not chosen:
            what = f"segment {args.segment}" if args.segment else "anything"
            print(f"escapement dlq {args.command}: no dead letter for {what}", file=sys.stderr)
            return 1
        failed = 0
        for item in chosen:
            if args.command == "rm":
                await js.delete_msg(subjects.STREAM_DEAD, item.letter.seq)
                print(f"removed {item.letter.segment_id or f'dead letter {item.letter.seq}'}")
                continue
            try:
                print(await replay(js, item))
            except (ValueError, NatsError, TimeoutError) as exc:
                failed += 1
                name = item.letter.segment_id or f"dead letter {item.letter.seq}"
                print(f"escapement dlq replay: {name} not replayed: {exc}", file=sys.stderr)
        return 1 if failed else 0
    finally:
        await nc.close()


def segment_id(value: str) -> str:
    parsed = subjects.parse_segment_msg_id(value)
    if parsed is None or value.count(":") != 1:  # not a replay's id
        raise argparse.ArgumentTypeError(f"expected SESSION:N, got {value!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="escapement dlq",
        description="List, replay and remove dead-lettered segments (stream ASR_DEAD).",
        epilog="Exit status: 0 done, 1 nothing matched or not all replayed, 2 usage, "
        "3 NATS unreachable or without the Escapement streams.",
    )
    p.add_argument(
        "--nats-url",
        default=None,
        help=f"NATS server(s), comma-separated (env NATS_URL, default {DEFAULT_NATS_URL})",
    )
    sub = p.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("ls", help="list dead letters")
    ls.add_argument("--json", action="store_true", help="print a JSON array")
    for name, summary in (
        ("replay", "queue dead letters for transcription again"),
        ("rm", "delete dead letters"),
    ):
        cmd = sub.add_parser(name, help=summary)
        which = cmd.add_mutually_exclusive_group(required=True)
        which.add_argument("--segment", type=segment_id, help="one segment, SESSION:N")
        which.add_argument("--all", action="store_true", help="every dead letter")
    for cmd in sub.choices.values():
        cmd.add_argument("--nats-url", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    args.nats_url = args.nats_url or os.environ.get("NATS_URL") or DEFAULT_NATS_URL
    try:
        return asyncio.run(run(args))
    except Unreachable as exc:
        print(f"escapement dlq: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
