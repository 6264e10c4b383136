"""`python -m services.edge [--host H] [--port P]`: the WebSocket edge."""

from __future__ import annotations

import argparse
import sys

from aiohttp import web

from observability.logging import setup_logging
from observability.metrics import setup_metrics, shutdown_metrics
from observability.tracing import setup_tracing, shutdown_tracing
from services.config import SettingsError, from_env
from services.edge.app import AccessLogger, EdgeConfigError, create_app
from services.edge.settings import EdgeSettings


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
    setup_logging(settings.log_level)
    setup_tracing("escapement-edge")
    setup_metrics("escapement-edge")
    try:
        try:
            app = create_app(settings)
        except EdgeConfigError as exc:
            print(f"escapement edge: {exc}", file=sys.stderr)
            return 2
        web.run_app(
            app,
            host=settings.host,
            port=settings.port,
            print=None,
            keepalive_timeout=settings.handshake_timeout_s,
            backlog=settings.listen_backlog,
            access_log_class=AccessLogger,
            shutdown_timeout=settings.drain_s + 5,
        )
    finally:
        shutdown_metrics()
        shutdown_tracing()
    return 0


if __name__ == "__main__":
    sys.exit(main())
