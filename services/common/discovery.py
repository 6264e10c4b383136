"""Count live services through NATS micro discovery (`$SRV.PING.<name>`).

Workers say in their discovery metadata which model they run and which
languages it speaks (`model`, `languages`, `multilingual`); the edge keeps the
latest answers (`last_seen`) to refuse a language nobody speaks up front.
"""

from __future__ import annotations

import asyncio
import json
import weakref
from dataclasses import dataclass

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
    _seen.setdefault(nc, {})[name] = replies
    return replies


def lane_of(reply: dict[str, object]) -> str:
    """The model lane a worker's ping reply says it takes ("": the default model's)."""
    meta = reply.get("metadata")
    return str(meta.get("lane") or "") if isinstance(meta, dict) else ""


def takes_finals(reply: dict[str, object]) -> bool:
    """Whether a worker's ping reply is one that decodes finals (not interim looks only)."""
    meta = reply.get("metadata")
    return not (isinstance(meta, dict) and meta.get("role") == "looks")


def decode_rate(reply: dict[str, object]) -> float | None:
    """A worker's recent decode rate from its ping reply: audio seconds per second of
    decoding (`decode_rate` in its metadata); None when it has not said yet."""
    meta = reply.get("metadata")
    raw = meta.get("decode_rate") if isinstance(meta, dict) else None
    try:
        rate = float(raw) if isinstance(raw, str) else None
    except ValueError:
        return None
    return rate if rate is not None and rate > 0 else None


# The latest answers per connection and service name: the edge's admission pings the
# workers every second, and a session's checks read what it heard, at no cost.
_seen: weakref.WeakKeyDictionary[NATS, dict[str, list[dict[str, object]]]] = (
    weakref.WeakKeyDictionary()
)


def last_seen(nc: NATS, name: str) -> list[dict[str, object]]:
    """What the latest `ping_services(nc, name)` heard ([] before the first)."""
    return list(_seen.get(nc, {}).get(name, []))


@dataclass(frozen=True, slots=True)
class WorkerLanguages:
    """What a worker's model can transcribe, from its discovery metadata."""

    model: str
    engine: str
    languages: tuple[str, ...] | None  # None: the worker does not say
    multilingual: bool
    serves: str = ""  # the model whose sessions it takes ("": it does not say)
    lane: str = ""  # that model's lane ("": the default model's)

    @classmethod
    def of(cls, reply: dict[str, object]) -> WorkerLanguages:
        meta = reply.get("metadata")
        meta = meta if isinstance(meta, dict) else {}
        listed = meta.get("languages")
        return cls(
            model=str(meta.get("model") or ""),
            engine=str(meta.get("engine") or ""),
            languages=tuple(str(listed).split(",")) if isinstance(listed, str) and listed else None,
            multilingual=meta.get("multilingual") == "true",
            serves=str(meta.get("serves") or ""),
            lane=str(meta.get("lane") or ""),
        )

    def describe(self) -> str:
        name = self.model or self.engine or "unknown model"
        if self.multilingual or self.languages is None:
            return name
        return f"{name} speaks only {', '.join(self.languages)}"


def worker_languages(replies: list[dict[str, object]]) -> list[WorkerLanguages]:
    return [WorkerLanguages.of(r) for r in replies]
