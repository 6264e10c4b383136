"""`escapement workers`: the workers' engine chains, read and swapped at run time.

    escapement workers ls [--json]
    escapement workers set-engine CHAIN [--worker ID] [--json]

`ls` lists every worker answering NATS micro discovery with its engine chain:
each engine's breaker (closed, open, half_open), how often it opened, calls
stuck past their deadline. `set-engine` gives every worker (or the one with
micro service id `ID`, as `ls` and `nats micro ls` show it) a new chain, e.g.
`tiny.en`, `base,tiny.en` or `tiny.en,openai:http://asr.internal:8000/v1`.
Each worker loads what it lacks, then new segments use the new chain while
jobs already running finish on the old one; nothing restarts. A chain a worker
cannot load (an unknown model, a bad spec) is refused and its old chain stays.

NATS: `--nats-url`, else `NATS_URL`, else the URL `escapement up` keeps in its
data dir. Exit status: 0 done; 1 a worker refused, or no worker answered;
2 usage; 3 NATS unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError

from jetstream import subjects
from services.cli.status import default_nats_url
from services.common.config import nats_servers
from services.common.discovery import ping_services
from services.common.natsconn import redact


class Failed(Exception):
    """Said to the operator as is; exit status in `code`."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


async def _connect(url: str) -> NATS:
    async def quiet(exc: Exception) -> None:  # the failure is reported once, below
        pass

    try:
        return await nats.connect(
            servers=nats_servers(url),
            name="escapement-workers",
            allow_reconnect=False,
            max_reconnect_attempts=1,
            connect_timeout=3,
            error_cb=quiet,
        )
    except (NatsError, OSError, TimeoutError) as exc:
        raise Failed(f"cannot reach NATS at {redact(url)}: {exc}", 3) from None


async def _ask(nc: NATS, worker_id: str, body: dict[str, Any], wait_s: float) -> dict[str, Any]:
    try:
        msg = await nc.request(
            subjects.worker_engine(worker_id), json.dumps(body).encode(), timeout=wait_s
        )
        answer = json.loads(msg.data)
    except (NatsError, TimeoutError) as exc:
        return {"worker": worker_id, "ok": False, "error": "no_reply", "message": repr(exc)}
    except ValueError:
        return {"worker": worker_id, "ok": False, "error": "bad_reply", "message": "not JSON"}
    return answer if isinstance(answer, dict) else {"worker": worker_id, "ok": False}


async def _workers(nc: NATS, only: str | None) -> list[str]:
    ids: list[str] = []
    for wait in (0.5, 2.0):  # a busy machine answers late; ask twice before saying none
        replies = await ping_services(nc, subjects.WORKER_SERVICE, wait=wait)
        ids = sorted(str(r.get("id", "")) for r in replies)
        if ids:
            break
    if not ids:
        raise Failed("no worker answers NATS micro discovery")
    if only is None:
        return ids
    if only not in ids:
        raise Failed(f"no worker {only!r} (live workers: {', '.join(ids)})")
    return [only]


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    body = {"chain": args.chain} if args.action == "set-engine" else {}
    nc = await _connect(args.nats_url or default_nats_url())
    try:
        ids = await _workers(nc, args.worker)
        return list(await asyncio.gather(*(_ask(nc, i, body, args.timeout) for i in ids)))
    finally:
        await nc.close()


def _print(answers: list[dict[str, Any]], swapped: bool) -> None:
    for a in answers:
        if not a.get("ok"):
            print(f"{a.get('worker')}: refused ({a.get('error')}): {a.get('message')}")
            continue
        engines = a.get("engines", [])
        chain = " -> ".join(str(e.get("engine")) for e in engines)
        before = " -> ".join(a.get("previous", []))
        print(f"{a['worker']}: {chain}" + (f"  (was {before})" if swapped else ""))
        for e in engines:
            extra = f", last error: {e['last_error']}" if e.get("last_error") else ""
            print(
                f"    {e['engine']}: breaker {e['breaker']}, opened {e['opens']}x, "
                f"{e['stuck']} stuck{extra}"
            )


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="escapement workers", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="action", required=True)
    ls = sub.add_parser("ls", help="every worker's engine chain and breakers")
    ls.add_argument("--json", action="store_true")
    se = sub.add_parser("set-engine", help="give the workers a new engine chain, live")
    se.add_argument("chain", help="e.g. tiny.en, base,tiny.en, tiny.en,openai:http://host/v1")
    se.add_argument("--json", action="store_true")
    for s in (ls, se):
        s.add_argument("--worker", help="only this worker (its micro service id)")
        s.add_argument("--nats-url", help="NATS server(s) (default NATS_URL, or escapement up's)")
        s.add_argument("--timeout", type=float, default=120.0, help="seconds per worker")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        answers = asyncio.run(run(args))
    except Failed as exc:
        print(f"escapement workers: {exc}", file=sys.stderr)
        return exc.code
    if args.json:
        print(json.dumps(answers, indent=2))
    else:
        _print(answers, args.action == "set-engine")
    refused = [a for a in answers if not a.get("ok")]
    for a in refused:
        print(f"escapement workers: {a.get('worker')} refused: {a.get('message')}", file=sys.stderr)
    return 1 if refused else 0
