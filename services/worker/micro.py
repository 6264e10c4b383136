"""Register a worker as a NATS micro service, so edges count live workers and
operators see it in `nats micro ls|info|stats`."""

from __future__ import annotations

import json
import logging
from typing import Any

from nats.aio.client import Client as NATS
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import Service

from jetstream import subjects
from services.worker.chain import ChainError
from services.worker.models import ModelNotFound
from services.worker.service import Worker

log = logging.getLogger(__name__)


async def engine_request(worker: Worker, worker_id: str, data: bytes) -> dict[str, Any]:
    """The engine endpoint: `{}` reads the chain; `{"chain": "tiny.en,..."}` swaps it."""
    answer: dict[str, Any] = {"worker": worker_id}
    try:
        body = json.loads(data or b"{}")
    except ValueError:
        return {**answer, "ok": False, "error": "bad_request", "message": "not JSON"}
    chain = body.get("chain") if isinstance(body, dict) else None
    if chain is not None and not isinstance(chain, str):
        return {**answer, "ok": False, "error": "bad_request", "message": "chain: a string"}
    if chain is not None:
        try:
            answer["previous"] = (await worker.set_engines(chain))["previous"]
        except ChainError as exc:
            return {**answer, "ok": False, "error": "bad_chain", "message": str(exc)}
        except ModelNotFound as exc:
            return {**answer, "ok": False, "error": "unknown_model", "message": str(exc)}
        except (RuntimeError, OSError, ValueError) as exc:  # a model that does not load
            log.warning("engine chain %r not loaded: %r", chain, exc)
            return {**answer, "ok": False, "error": "load_failed", "message": str(exc)}
    return {**answer, "ok": True, "engines": worker.chain.view() if worker.chain else []}


async def register(nc: NATS, worker: Worker) -> Service:
    async def status(req: Request) -> None:
        await req.respond(json.dumps(worker.status()).encode())

    def described() -> dict[str, str]:
        return {"engine": worker.engine.name if worker.engine else "", **worker.discovery()}

    metadata = described()
    service = await add_service(
        nc,
        name=subjects.WORKER_SERVICE,
        version="0.1.0",
        description="Escapement transcription worker",
        metadata=metadata,
    )
    await service.add_endpoint(name="status", subject=subjects.WORKER_STATUS, handler=status)

    async def engine(req: Request) -> None:
        answer = await engine_request(worker, service.id, req.data)
        # the service keeps this dict: what discovery says follows the chain
        fresh = described()
        metadata.clear()
        metadata.update(fresh)
        await req.respond(json.dumps(answer).encode())

    await service.add_endpoint(
        name="engine", subject=subjects.worker_engine(service.id), handler=engine
    )
    worker.on_discovery = lambda: metadata.update(described())  # the decode rate moves
    return service
