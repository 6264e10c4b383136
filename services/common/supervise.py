"""Background loops that outlive their own bugs.

A loop a service starts at start-up (the result sweeper, admission's refresh)
runs for the life of the process. An exception it did not expect would end
its task quietly: nobody awaits it until shutdown, and whatever it kept fresh
(the worker count, owed results) freezes. `supervise` runs such a loop, logs
an unexpected exception with its traceback, counts it
(`escapement_loop_restarts_total{loop}`), and starts the loop again after a
back-off that doubles up to `max_backoff_s` (and starts over once a run lasted
`reset_after_s`). Cancellation stops it at once; a loop that returns is done.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from opentelemetry.metrics import Counter

log = logging.getLogger(__name__)

ATTR_LOOP = "loop"


async def supervise(
    name: str,
    loop: Callable[[], Awaitable[None]],
    *,
    restarts: Counter | None = None,
    backoff_s: float = 0.5,
    max_backoff_s: float = 30.0,
    reset_after_s: float = 60.0,
) -> None:
    """Run `loop()` until it returns or this is cancelled, restarting it when it raises."""
    delay = backoff_s
    while True:
        started = time.monotonic()
        try:
            await loop()
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            if time.monotonic() - started >= reset_after_s:
                delay = backoff_s  # it had been running well: not a crash loop
            log.exception("background loop %r failed; restarting it in %.1f s", name, delay)
            if restarts is not None:
                restarts.add(1, {ATTR_LOOP: name})
        await asyncio.sleep(delay)
        delay = min(delay * 2, max_backoff_s)


def start_supervised(
    name: str,
    loop: Callable[[], Awaitable[None]],
    *,
    restarts: Counter | None = None,
    backoff_s: float = 0.5,
    max_backoff_s: float = 30.0,
) -> asyncio.Task[None]:
    """`supervise` as a task named `name`; the caller owns it (cancel and await it on stop)."""
    return asyncio.create_task(
        supervise(name, loop, restarts=restarts, backoff_s=backoff_s, max_backoff_s=max_backoff_s),
        name=name,
    )
