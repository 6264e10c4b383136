"""Apply the stream and consumer definitions idempotently at start-up.

The definitions are JSON files beside this module, in the format that
`nats stream add --config FILE` and `nats consumer add STREAM --config FILE`
accept (durations in nanoseconds), so operators can apply them by hand too.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import APIError, NotFoundError, ServiceUnavailableError

from jetstream import subjects

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
STREAMS_DIR = HERE / "streams"
CONSUMERS_DIR = HERE / "consumers"

# Fields the server will not change on an existing stream / consumer.
_STREAM_FIXED = ("retention", "storage")
_CONSUMER_FIXED = ("deliver_policy", "ack_policy")


class IncompatibleDefinition(RuntimeError):
    """An existing stream or consumer differs in a field that cannot be updated."""

    def __init__(self, kind: str, name: str, field: str, existing: Any, wanted: Any) -> None:
        self.kind, self.name, self.field = kind, name, field
        super().__init__(
            f"{kind} {name!r} exists with {field}={existing!r} but the definition asks for "
            f"{field}={wanted!r}; this cannot be changed in place. Delete it (nats {kind} rm "
            f"{name}) after draining it, or use a fresh data dir."
        )


class JetStreamUnavailable(RuntimeError):
    """The server has no JetStream (not enabled, or a cluster without a leader)."""


@dataclass(frozen=True)
class ConsumerDefinition:
    stream: str
    config: dict[str, Any]


def load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def stream_definitions() -> list[dict[str, Any]]:
    return [load_json(p) for p in sorted(STREAMS_DIR.glob("*.json"))]


def consumer_definitions() -> list[ConsumerDefinition]:
    """Consumer files are named `<STREAM>.<consumer>.json`."""
    out = []
    for path in sorted(CONSUMERS_DIR.glob("*.json")):
        stream = path.name.split(".", 1)[0]
        out.append(ConsumerDefinition(stream=stream, config=load_json(path)))
    return out


_LANE_KIND = {"asr.segments.>": "segments", "asr.files.>": "files", "asr.interims.>": "interims"}


def lane_consumer_definitions(lane: str) -> list[ConsumerDefinition]:
    """The consumers of a model's lane (jetstream/subjects.py): each default consumer's
    definition under its lane name, filtered to the lane's subjects. The default lane
    ("") has the definitions as they are."""
    if not lane:
        return consumer_definitions()
    out = []
    for d in consumer_definitions():
        config = copy.deepcopy(d.config)
        kind = _LANE_KIND[config["filter_subject"]]
        config["durable_name"] = subjects.lane_consumer(config["durable_name"], lane)
        config["filter_subject"] = subjects.lane_filter(kind, lane)
        config["description"] = f"{config.get('description', '')} (lane {lane})".strip()
        out.append(ConsumerDefinition(stream=d.stream, config=config))
    return out


def _value(v: Any) -> Any:
    return getattr(v, "value", v)


async def apply_stream(
    js: JetStreamContext, definition: dict[str, Any], replicas: int | None = None
) -> js_api.StreamInfo:
    raw = copy.deepcopy(definition)
    if replicas is not None:
        raw["num_replicas"] = replicas
    config = js_api.StreamConfig.from_response(raw)
    name = config.name or ""
    try:
        info = await js.stream_info(name)
    except NotFoundError:
        log.info("creating stream %s", name)
        return await js.add_stream(config)
    if replicas is None:
        # Replication is the deployment's choice (ESCAPEMENT_STREAM_REPLICAS, or an
        # operator's `nats stream edit`): a service starting up never scales it down.
        config.num_replicas = info.config.num_replicas
    for field in _STREAM_FIXED:
        have, want = _value(getattr(info.config, field)), _value(getattr(config, field))
        if want is not None and have != want:
            raise IncompatibleDefinition("stream", name, field, have, want)
    if _unchanged(config, info.config):
        return info  # no request: a NATS user without stream rights (a worker) starts too
    try:
        return await js.update_stream(config)
    except APIError as exc:
        raise IncompatibleDefinition(
            "stream", name, "config", "existing", exc.description or str(exc)
        ) from exc


async def apply_consumer(
    js: JetStreamContext, definition: ConsumerDefinition
) -> js_api.ConsumerInfo:
    raw = copy.deepcopy(definition.config)
    config = js_api.ConsumerConfig.from_response(raw)
    name = config.durable_name or config.name or ""
    config.name = name
    try:
        info = await js.consumer_info(definition.stream, name)
    except NotFoundError:
        log.info("creating consumer %s on %s", name, definition.stream)
        return await js.add_consumer(definition.stream, config)
    for field in _CONSUMER_FIXED:
        have, want = _value(getattr(info.config, field)), _value(getattr(config, field))
        if want is not None and have != want:
            raise IncompatibleDefinition("consumer", name, field, have, want)
    if _unchanged(config, info.config):
        return info
    try:
        return await js.add_consumer(definition.stream, config)
    except APIError as exc:
        raise IncompatibleDefinition(
            "consumer", name, "config", "existing", exc.description or str(exc)
        ) from exc


def _unchanged(wanted: js_api.StreamConfig | js_api.ConsumerConfig, have: Any) -> bool:
    """Whether every field the definition sets already has that value on the server."""
    current = have.as_dict()
    return all(current.get(k) == v for k, v in wanted.as_dict().items())


async def apply_all(
    js: JetStreamContext, replicas: int | None = None, wait_s: float = 30.0
) -> None:
    """Create or update every stream, then every consumer.

    A cluster that is still electing its JetStream leader answers "unavailable"
    for a few seconds: that is waited out for up to `wait_s`.
    """
    deadline = asyncio.get_running_loop().time() + wait_s
    while True:
        try:
            for definition in stream_definitions():
                await apply_stream(js, definition, replicas=replicas or None)
            for consumer in consumer_definitions():
                await apply_consumer(js, consumer)
            return
        except (ServiceUnavailableError, NoRespondersError, NatsTimeoutError) as exc:
            if asyncio.get_running_loop().time() >= deadline:
                raise JetStreamUnavailable(
                    f"JetStream not available after {wait_s:g} s: {exc!r}"
                ) from exc
            log.info("JetStream not ready yet (%s); waiting", type(exc).__name__)
            await asyncio.sleep(0.5)


async def streams_exist(js: JetStreamContext) -> bool:
    try:
        for definition in stream_definitions():
            await js.stream_info(definition["name"])
    except NotFoundError:
        return False
    return True
