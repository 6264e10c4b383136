"""Register a worker as a NATS micro service, so edges count live workers and
operators see it in `nats micro ls|info|stats`."""

from __future__ import annotations

import json

from nats.aio.client import Client as NATS
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import Service

from jetstream import subjects
from services.worker.service import Worker


async def register(nc: NATS, worker: Worker) -> Service:
    async def status(req: Request) -> None:
        await req.respond(json.dumps(worker.status()).encode())

    service = await add_service(
        nc,
        name=subjects.WORKER_SERVICE,
        version="0.1.0",
        description="Escapement transcription worker",
        metadata={"engine": worker.engine.name if worker.engine else ""},
    )
    await service.add_endpoint(name="status", subject=subjects.WORKER_STATUS, handler=status)
    return service
