"""Connect to NATS the same way from every service."""

from __future__ import annotations

import logging
from collections.abc import Callable

import nats
from nats.aio.client import Client as NATS

from services.common.config import nats_servers

log = logging.getLogger(__name__)


async def connect(
    url: str,
    name: str,
    on_reconnect: Callable[[], None] | None = None,
    creds: str = "",
    **options: object,
) -> NATS:
    """Connect with endless reconnects; errors inside callbacks are logged, not lost.

    Credentials: user/password or a token in the URL (`nats://user:pass@host`,
    `nats://token@host`), or `creds`, a .creds file (JWT + nkey seed).
    """
    if creds:
        options["user_credentials"] = creds

    async def error_cb(exc: Exception) -> None:
        log.warning("nats (%s): %s: %s", name, type(exc).__name__, exc)

    async def disconnected_cb() -> None:
        log.warning("nats (%s): disconnected", name)

    async def reconnected_cb() -> None:
        if on_reconnect is not None:
            on_reconnect()
        log.info(
            "nats (%s): reconnected to %s",
            name,
            f"{nc.connected_url.hostname}:{nc.connected_url.port}" if nc.connected_url else "?",
        )

    nc = await nats.connect(
        servers=nats_servers(url),
        name=name,
        error_cb=error_cb,
        disconnected_cb=disconnected_cb,
        reconnected_cb=reconnected_cb,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        **options,  # type: ignore[arg-type]
    )
    return nc


def redact(url: str) -> str:
    """A NATS URL (or several) fit for logs: credentials replaced by ***."""
    out = []
    for one in url.split(","):
        scheme, sep, rest = one.partition("://")
        if sep and "@" in rest:
            rest = "***@" + rest.rsplit("@", 1)[1]
        out.append(f"{scheme}{sep}{rest}")
    return ",".join(out)
