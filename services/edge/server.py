"""Serve the edge's app: the one way `python -m services.edge`, `escapement up`
and the tests put it on a socket."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from services.edge.app import make_runner, settings_key


@contextlib.asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[int]:
    """Listen on the app's settings' host and port (0: one the kernel picks) with
    their listen backlog, handshake timeout, access log and shutdown timeout.

    Yields the port it listens on. Starting connects to NATS (the app's
    cleanup context); leaving drains the sessions (1001) and disconnects.
    Raises OSError when the address cannot be bound.
    """
    settings = app[settings_key]
    runner = make_runner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port, backlog=settings.listen_backlog)
        await site.start()
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()
