"""The `escapement` command: `up`, `transcribe`, and the operator tools."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from pathlib import Path

import aiohttp
import msgspec

from schemas import device as ev
from services.common.audio import SUPPORTED_RATES, read_wav

log = logging.getLogger("escapement")


def _fmt_ms(ms: float) -> str:
    return f"{int(ms // 60000):02d}:{ms % 60000 / 1000:04.1f}"


# --- escapement transcribe ----------------------------------------------------


async def _transcribe(args: argparse.Namespace) -> int:
    from services.cli.client import Received, Refused, stream_audio

    try:
        pcm, rate = read_wav(Path(args.file))
    except (OSError, ValueError) as exc:
        print(f"escapement transcribe: {exc}", file=sys.stderr)
        return 2
    if rate not in SUPPORTED_RATES:
        rates = ", ".join(map(str, SUPPORTED_RATES))
        print(
            f"escapement transcribe: {args.file}: {rate} Hz not supported; use {rates}",
            file=sys.stderr,
        )
        return 2
    json_out = msgspec.json.Encoder()

    def on_event(r: Received) -> None:
        if args.json:
            print(json_out.encode(r.event).decode(), flush=True)
        elif isinstance(r.event, ev.Final):
            print(
                f"[{_fmt_ms(r.event.start_ms)} -> {_fmt_ms(r.event.end_ms)}] {r.event.text}",
                flush=True,
            )
        elif isinstance(r.event, ev.Error | ev.Overloaded):
            print(f"! {ev.encode_event(r.event)}", file=sys.stderr, flush=True)

    started = time.monotonic()
    async with aiohttp.ClientSession() as http:
        try:
            run = await stream_audio(
                http, args.url, pcm, rate, language=args.language, realtime=not args.fast,
                token=args.token or os.environ.get("ESCAPEMENT_TOKEN"), on_event=on_event,
            )  # fmt: skip
        except Refused as exc:
            print(f"escapement transcribe: {exc}", file=sys.stderr)
            return 3
        except (aiohttp.ClientError, OSError) as exc:
            print(f"escapement transcribe: cannot reach {args.url}: {exc}", file=sys.stderr)
            return 3
    elapsed = time.monotonic() - started
    audio_s = len(pcm) / 2 / rate
    if not args.json:
        print(
            f"-- {len(run.finals)} finals, {audio_s:.1f} s of audio in {elapsed:.1f} s "
            f"(session {run.session_id}, closed {run.close_code})"
        )
    return 0 if run.close_code == 1000 else 1


# --- escapement up --------------------------------------------------------------


def _cmd_up(args: argparse.Namespace) -> int:
    from services.common.config import SettingsError, from_env
    from services.runtime.up import UpSettings, run_up

    try:
        settings = from_env(
            UpSettings,
            host=args.host,
            port=args.port,
            data_dir=args.data_dir,
            workers=args.workers,
            model=args.model,
            nats_port=args.nats_port,
        )
    except SettingsError as exc:
        print(f"escapement up: {exc}", file=sys.stderr)
        return 2
    return run_up(settings)


# --- escapement token / key ------------------------------------------------------

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """`90`, `90s`, `30m`, `1h`, `7d` -> seconds."""
    text = text.strip().lower()
    unit = _UNITS.get(text[-1:]) if text else None
    number = text[:-1] if unit else text
    try:
        value = float(number) * (unit or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 30m, 1h)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("a duration must be positive")
    return value


def _secret(args: argparse.Namespace) -> bytes:
    from services.runtime.up import SECRET_FILE, default_data_dir

    if os.environ.get("ESCAPEMENT_AUTH_SECRET"):
        return os.environ["ESCAPEMENT_AUTH_SECRET"].encode()
    path = Path(args.secret_file) if args.secret_file else default_data_dir() / SECRET_FILE
    try:
        return path.read_text().strip().encode()
    except OSError as exc:
        raise SystemExit(
            f"escapement token: no secret: set ESCAPEMENT_AUTH_SECRET or --secret-file ({exc})"
        ) from None


def _cmd_token_mint(args: argparse.Namespace) -> int:
    from services.edge.auth import mint_token

    try:
        print(mint_token(_secret(args), args.tenant, args.ttl))
    except ValueError as exc:
        print(f"escapement token mint: {exc}", file=sys.stderr)
        return 2
    return 0


def _cmd_key_new(args: argparse.Namespace) -> int:
    from services.edge.auth import TENANT_RE, generate_key, hash_key

    if not TENANT_RE.fullmatch(args.tenant):
        print("escapement key new: tenant must be 1-64 of A-Z a-z 0-9 _ -", file=sys.stderr)
        return 2
    key = generate_key()
    print(f"key (give it to the device; it is not stored): {key}")
    print(f"line for the keys file (ESCAPEMENT_API_KEYS_FILE): {args.tenant}:{hash_key(key)}")
    return 0


def workers_option(text: str) -> int | str:
    """argparse type of a `--workers` option: a count (0: an edge without workers), or auto."""
    if text == "auto":
        return text
    try:
        count = int(text)
    except ValueError:
        count = -1
    if count < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of workers (0 or more) or auto")
    return count


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="escapement", description="Real-time speech-to-text on NATS JetStream"
    )
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run NATS, an edge and workers on this machine")
    # Defaults live in UpSettings, so ESCAPEMENT_<OPTION> applies when an option is not given.
    up.add_argument("--host", help="where the edge listens (default 127.0.0.1)")
    up.add_argument("--port", type=int, help="edge port (default 8080; 0: any free port)")
    up.add_argument("--data-dir", help="JetStream store and logs (default: the user data dir)")
    up.add_argument(
        "--workers",
        type=workers_option,
        help="worker processes, or auto: one single-threaded worker per core (the default)",
    )
    up.add_argument("--model", help="tiny.en (default), base, or a CTranslate2 folder")
    up.add_argument("--nats-port", type=int, help="embedded nats-server port (default: random)")
    up.set_defaults(func=_cmd_up)

    tr = sub.add_parser("transcribe", help="stream a WAV file like a device and print the finals")
    tr.add_argument("file", help="16-bit mono WAV at 8000, 16000, 32000 or 48000 Hz")
    tr.add_argument(
        "--url", default="http://127.0.0.1:8080", help="the edge (default http://127.0.0.1:8080)"
    )
    tr.add_argument(
        "--language", default="", help="e.g. en, de (default: detected, or en for English models)"
    )
    tr.add_argument("--token", help="API key or token (env ESCAPEMENT_TOKEN)")
    pace = tr.add_mutually_exclusive_group()
    pace.add_argument(
        "--realtime",
        action="store_true",
        default=True,
        help="send at the speed of speech (default)",
    )
    pace.add_argument("--fast", action="store_true", help="send as fast as the edge takes it")
    tr.add_argument("--json", action="store_true", help="print every server event as one JSON line")
    tr.set_defaults(func=lambda a: asyncio.run(_transcribe(a)))
    token = sub.add_parser("token", help="mint short-lived device tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    mint = token_sub.add_parser("mint", help="print a signed token for a tenant")
    mint.add_argument("--tenant", required=True)
    mint.add_argument(
        "--ttl", type=parse_duration, default=3600.0, help="lifetime, e.g. 30m, 1h (default 1h)"
    )
    mint.add_argument(
        "--secret-file",
        help="the edge secret (default: env ESCAPEMENT_AUTH_SECRET, else the up data dir)",
    )
    mint.set_defaults(func=_cmd_token_mint)

    key = sub.add_parser("key", help="make API keys")
    key_sub = key.add_subparsers(dest="key_command", required=True)
    new = key_sub.add_parser("new", help="print a new API key and its hashed keys-file line")
    new.add_argument("--tenant", required=True)
    new.set_defaults(func=_cmd_key_new)

    for name, (_, summary) in DELEGATED.items():
        sub.add_parser(name, help=f"{summary} (escapement {name} --help)", add_help=False)
    return p


# Subcommands that live in their own modules, each with `main(argv) -> int`.
DELEGATED = {
    "loadtest": ("loadtest.cli", "drive load at a running Escapement and report"),
    "dlq": ("services.cli.dlq", "list and replay dead-lettered segments"),
    "status": ("services.cli.status", "queue, workers, throughput and latency on one screen"),
    "workers": ("services.cli.workers", "read or swap the workers' engine chains, live"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in DELEGATED:
        import importlib

        module = importlib.import_module(DELEGATED[argv[0]][0])
        return int(module.main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
