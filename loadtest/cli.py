"""`escapement loadtest SCENARIO ...` (also `python -m loadtest`).

Scenarios: concurrency, herd, slowloris, chaos, soak; and `compare A.json B.json`.
Exit status: 0 when every required check passed, 1 when one failed (lost or
duplicate finals, ...), 2 for bad arguments, 3 when the edge cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys

from services.cli import workers_option

DEFAULT_URL = "http://127.0.0.1:8080"
# What `escapement[loadtest]` installs (pyproject.toml): the scenarios cannot run without it.
EXTRA_MODULES = frozenset({"hdrh", "jiwer", "matplotlib"})
EXTRA_INSTALL = "pip install 'escapement[loadtest]'"


def duration(text: str) -> float:
    """`90`, `90s`, `30m`, `1h`, `1h30m` -> seconds."""
    text = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90, 90s, 30m, 1h)")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def pid_list(text: str) -> list[int]:
    try:
        return [int(p) for p in re.split(r"[,\s]+", text.strip()) if p]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of PIDs: {text!r}") from None


def _common() -> argparse.ArgumentParser:
    """The options every scenario takes (a fresh parser each: parents share their actions)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("target")
    g.add_argument("--url", default=DEFAULT_URL, help=f"the edge (default {DEFAULT_URL})")
    g.add_argument("--token", help="API key or token (env ESCAPEMENT_TOKEN)")
    g.add_argument("--nats-url", help="NATS, to sample the queue depth of ASR_SEGMENTS over time")
    g.add_argument(
        "--wait-ready",
        type=float,
        default=30.0,
        metavar="S",
        help="wait this long for /readyz (default 30)",
    )
    g.add_argument(
        "--spawn-up",
        action="store_true",
        help="run `escapement up` as a child on a free port and test that",
    )
    g.add_argument(
        "--up-workers",
        type=workers_option,
        default="auto",
        metavar="N",
        help="workers of the spawned up (default auto: one per core)",
    )
    g.add_argument("--up-model", help="model of the spawned up (default: its own default)")
    g = p.add_argument_group("server processes to watch (CPU, RSS) and, for chaos, to kill")
    g.add_argument(
        "--up-pid",
        type=int,
        help="an `escapement up`: it is the edge, its children the workers and NATS",
    )
    g.add_argument(
        "--edge-pid", type=pid_list, metavar="PIDS", help="edge process(es), comma-separated"
    )
    g.add_argument(
        "--worker-pids", type=pid_list, metavar="PIDS", help="worker processes, comma-separated"
    )
    g.add_argument("--nats-pid", type=pid_list, metavar="PIDS", help="nats-server process(es)")
    g = p.add_argument_group("audio")
    g.add_argument(
        "--audio",
        metavar="DIR",
        help="WAV files with .txt references (default: the built-in corpus)",
    )
    g.add_argument(
        "--sentences",
        type=int,
        default=4,
        help="sentences per session, built-in corpus (default 4)",
    )
    g.add_argument(
        "--corpus-cache",
        metavar="DIR",
        help="where the built-in corpus is cached (default: user cache dir)",
    )
    g.add_argument("--language", default="en")
    g.add_argument("--chunk-ms", type=int, default=100, help="audio per frame (default 100)")
    g = p.add_argument_group("measurement")
    g.add_argument(
        "--session-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="wait for the last finals and the close (default 60)",
    )
    g.add_argument(
        "--trailing-pad-ms",
        type=int,
        default=210,
        help="the edge's trailing pad, for audio without reference spans (default 120)",
    )
    g.add_argument(
        "--sample-every",
        type=float,
        default=1.0,
        metavar="S",
        help="CPU/RSS/queue sampling period (default 1)",
    )
    g.add_argument(
        "--window",
        type=float,
        default=10.0,
        metavar="S",
        help="latency-over-time window (default 10)",
    )
    g = p.add_argument_group("output")
    g.add_argument("--out", metavar="REPORT.json", help="write the JSON report here")
    g.add_argument("--plot", metavar="REPORT.png", help="plot latency and queue depth over time")
    g.add_argument(
        "--progress",
        action="store_true",
        help="progress lines on stderr even when it is not a terminal",
    )
    g.add_argument("-q", "--quiet", action="store_true", help="no progress, no summary")
    return p


def _devices(p: argparse.ArgumentParser, sessions: int, duration_s: str, ramp: float) -> None:
    p.add_argument(
        "--sessions", type=int, default=sessions, help=f"concurrent devices (default {sessions})"
    )
    p.add_argument(
        "--ramp",
        type=float,
        default=ramp,
        metavar="S",
        help=f"start the devices over this long (default {ramp:g})",
    )
    p.add_argument("--duration", type=duration, default=duration(duration_s), metavar="D",
                   help=f"devices start no new session after this (default {duration_s}); e.g. 90, 5m")  # fmt: skip
    p.add_argument(
        "--procs",
        type=int,
        default=1,
        metavar="K",
        help="spread the devices over K processes (default 1)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="escapement loadtest",
        description="Drive load at a running Escapement and report what it did.",
    )
    sub = p.add_subparsers(dest="scenario", required=True)

    c = sub.add_parser(
        "concurrency", parents=[_common()], help="N devices streaming speech in real time"
    )
    _devices(c, 10, "60s", 5.0)
    c.add_argument(
        "--once", action="store_true", help="each device runs one session, whatever the duration"
    )

    h = sub.add_parser(
        "herd",
        parents=[_common()],
        help="reconnect storm: connect, SessionStarted or refusal, close",
    )
    h.add_argument("--connections", type=int, default=200, help="connections (default 200)")
    h.add_argument(
        "--within", type=float, default=2.0, metavar="S", help="spread over this long (default 2)"
    )

    s = sub.add_parser(
        "slowloris",
        parents=[_common()],
        help="idle sockets and half-open handshakes, with a probe session",
    )
    s.add_argument(
        "--connections", type=int, default=100, help="attacking connections (default 100)"
    )
    s.add_argument(
        "--duration",
        type=duration,
        default=30.0,
        metavar="D",
        help="how long the probe streams (default 30s)",
    )
    s.add_argument(
        "--idle-fraction",
        type=float,
        default=0.5,
        help="share of idle WebSockets; the rest half-open (default 0.5)",
    )
    s.add_argument(
        "--drip-every",
        type=float,
        default=5.0,
        metavar="S",
        help="half-open: one more header line this often (default 5)",
    )
    s.add_argument(
        "--settle",
        type=float,
        default=1.0,
        metavar="S",
        help="attack this long before the probe starts (default 1)",
    )

    k = sub.add_parser(
        "chaos",
        parents=[_common()],
        help="devices keep talking while workers are killed / NATS restarts",
    )
    _devices(k, 4, "60s", 2.0)
    k.add_argument(
        "--kill-workers-every", type=duration, metavar="D", help="kill a known worker this often"
    )
    k.add_argument(
        "--restart-nats-every",
        type=duration,
        metavar="D",
        help="restart the known nats-server this often",
    )
    k.add_argument("--max-kills", type=int, help="stop killing workers after this many")
    k.add_argument("--max-nats-restarts", type=int, help="stop restarting NATS after this many")
    k.add_argument(
        "--signal", choices=["KILL", "TERM"], default="KILL", help="how to kill (default KILL)"
    )
    k.add_argument(
        "--nats-down",
        type=float,
        default=2.0,
        metavar="S",
        help="NATS stays down this long (default 2)",
    )

    o = sub.add_parser(
        "soak", parents=[_common()], help="hours of steady load: memory and latency drift"
    )
    _devices(o, 10, "30m", 10.0)
    o.set_defaults(sample_every=5.0, window=60.0)

    cmp_ = sub.add_parser("compare", help="print the differences between two reports")
    cmp_.add_argument("a", help="the baseline report")
    cmp_.add_argument("b", help="the report to compare with it")
    return p


def _without_extra(exc: ModuleNotFoundError) -> int:
    """Exit status 2, saying how to install the loadtest extra, when it is what is missing."""
    missing = (exc.name or "").partition(".")[0]
    if missing not in EXTRA_MODULES:
        raise exc
    print(
        f"escapement loadtest: needs the loadtest extra ({missing} is missing): {EXTRA_INSTALL}",
        file=sys.stderr,
    )
    return 2


def _compare(args: argparse.Namespace) -> int:
    try:
        from loadtest import report
    except ModuleNotFoundError as exc:
        return _without_extra(exc)

    try:
        a, b = report.load(args.a), report.load(args.b)
    except (OSError, ValueError) as exc:
        print(f"escapement loadtest compare: {exc}", file=sys.stderr)
        return 2
    try:
        report.print_compare(a, b, sys.stdout, args.a, args.b)
        sys.stdout.flush()
    except BrokenPipeError:  # `| head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.scenario == "compare":
        return _compare(args)
    for name in ("sessions", "connections", "procs"):
        if getattr(args, name, 1) < 1:
            print(f"escapement loadtest: --{name} must be at least 1", file=sys.stderr)
            return 2
    try:
        from loadtest.runner import SCENARIOS, execute

        if args.plot:
            import matplotlib  # noqa: F401  (now, not after the run)
    except ModuleNotFoundError as exc:
        return _without_extra(exc)
    try:
        return asyncio.run(execute(args, SCENARIOS[args.scenario]))
    except KeyboardInterrupt:
        return 130
