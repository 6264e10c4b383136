"""Connect to NATS the same way from every service."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from urllib.parse import unquote, urlsplit

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
    `nats://token@host`; `NATS_USER`/`NATS_PASSWORD` are put there by
    `services.common.config.from_env`), or `creds`, a .creds file (JWT + nkey seed).
    A named user gets its replies on its own inbox prefix, `_INBOX.<user>`, which
    its NATS permissions can grant it alone (services/runtime/natsserver.py).
    """
    if creds:
        options["user_credentials"] = creds
    user, password = credentials_of(url)
    if user and "user" not in options:  # nats-py would send them still %-encoded
        options["user"], options["password"] = user, password
    if user and _INBOX_TOKEN.fullmatch(user) and "inbox_prefix" not in options:
        options["inbox_prefix"] = f"_INBOX.{user}"

    also = options.pop("error_cb", None)  # a caller's own, called after the log line

    async def error_cb(exc: Exception) -> None:
        log.warning("nats (%s): %s: %s", name, type(exc).__name__, exc)
        if callable(also):
            await also(exc)

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


_INBOX_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")


def credentials_of(url: str) -> tuple[str, str]:
    """(user, password) of the first server URL (`nats://user:pass@host`, %-escapes
    undone); ('', '') for none or a token (`nats://token@host`)."""
    first = nats_servers(url)[:1]
    if not first:
        return "", ""
    parts = urlsplit(first[0] if "://" in first[0] else f"nats://{first[0]}")
    if parts.password is None or not parts.username:
        return "", ""
    return unquote(parts.username), unquote(parts.password)


def redact(url: str) -> str:
    """A NATS URL (or several) fit for logs: credentials replaced by ***."""
    out = []
    for one in url.split(","):
        scheme, sep, rest = one.partition("://")
        if sep and "@" in rest:
            rest = "***@" + rest.rsplit("@", 1)[1]
        out.append(f"{scheme}{sep}{rest}")
    return ",".join(out)
