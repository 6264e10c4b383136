"""`python -m services.edge [--host H] [--port P]`: the WebSocket edge.

Port 0 listens on any free port; the first line on stdout says which
(`edge listening on http://HOST:PORT`).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from observability import telemetry
from services.common.config import SettingsError, from_env
from services.edge.app import EdgeConfigError, create_app
from services.edge.server import serve
from services.edge.settings import EdgeSettings


async def run(settings: EdgeSettings) -> int:
    try:
        app = create_app(settings)
    except EdgeConfigError as exc:
        print(f"escapement edge: {exc}", file=sys.stderr)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with serve(app) as port:
            print(f"edge listening on http://{settings.host}:{port}", flush=True)
            await stop.wait()
    except OSError as exc:
        print(
            f"escapement edge: cannot listen on {settings.host}:{settings.port}: {exc}",
            file=sys.stderr,
        )
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.edge", description=__doc__)
    p.add_argument("--nats-url", help="NATS server(s), comma-separated (env NATS_URL)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    args = p.parse_args(argv)
    try:
        settings = from_env(EdgeSettings, nats_url=args.nats_url, host=args.host, port=args.port)
    except SettingsError as exc:
        print(f"escapement edge: {exc}", file=sys.stderr)
        return 2
    with telemetry("escapement-edge", settings.log_level):
        return asyncio.run(run(settings))


if __name__ == "__main__":
    sys.exit(main())
