"""Count live services through NATS micro discovery (`$SRV.PING.<name>`)."""

from __future__ import annotations

import asyncio
import json

from nats.aio.client import Client as NATS

from jetstream import subjects


async def ping_services(nc: NATS, name: str, wait: float = 0.25) -> list[dict[str, object]]:
    """Every instance of service `name` that answers a ping within `wait` seconds."""
    inbox = nc.new_inbox()
    replies: list[dict[str, object]] = []

    async def collect(msg) -> None:  # type: ignore[no-untyped-def]
        try:
            replies.append(json.loads(msg.data))
        except ValueError:
            pass

    sub = await nc.subscribe(inbox, cb=collect)
    try:
        await nc.publish(subjects.service_ping(name), b"", reply=inbox)
        await nc.flush()
        await asyncio.sleep(wait)
    finally:
        await sub.unsubscribe()
    return replies
