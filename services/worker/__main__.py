"""`python -m services.worker [--model tiny.en|base|PATH] [--concurrency N]`

With `ESCAPEMENT_METRICS_PORT` set (0: any free port) it also serves
`GET /metrics` for Prometheus on `ESCAPEMENT_METRICS_HOST` (default 127.0.0.1).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from nats.errors import Error as NatsError

from jetstream.setup import IncompatibleDefinition, JetStreamUnavailable, apply_all
from observability import telemetry
from services.common.board import board_at
from services.common.config import SettingsError, from_env
from services.common.metrics_http import MetricsEndpoint, serve_metrics
from services.common.natsconn import connect
from services.worker.chain import ChainError, EngineSpec
from services.worker.engines import WhisperEngine
from services.worker.micro import register
from services.worker.models import ModelNotFound, resolve_model
from services.worker.service import Worker
from services.worker.settings import WorkerSettings

log = logging.getLogger("services.worker")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m services.worker", description=__doc__)
    p.add_argument("--nats-url", help="NATS server(s), comma-separated (env NATS_URL)")
    p.add_argument("--model", help="tiny.en (default), base, or a CTranslate2 Whisper folder")
    p.add_argument("--concurrency", type=int, help="segments transcribed at once")
    p.add_argument("--cpu-threads", type=int, help="CTranslate2 threads per job")
    return p.parse_args(argv)


async def serve(settings: WorkerSettings, metrics: MetricsEndpoint | None = None) -> int:
    async with serve_metrics(metrics or MetricsEndpoint()):
        return await _serve(settings)


async def _serve(settings: WorkerSettings) -> int:
    try:
        model_path = await asyncio.to_thread(resolve_model, settings.model)  # may join files
    except ModelNotFound as exc:
        log.error("%s", exc)
        return 2

    def factory() -> WhisperEngine:
        return WhisperEngine(
            model_path,
            device=settings.device,
            compute_type=settings.compute_type,
            cpu_threads=settings.cpu_threads,
            encoder_threads=settings.encoder_threads,
            board=board_at(settings.decode_board),
            beam_size=settings.beam_size,
            name=EngineSpec(settings.model).name,
        )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    nc = await connect(settings.nats_url, "escapement-worker", creds=settings.nats_creds)
    try:
        await apply_all(nc.jetstream(), replicas=settings.stream_replicas)
    except (IncompatibleDefinition, JetStreamUnavailable) as exc:
        log.error("%s", exc)
        await nc.close()
        return 2
    worker = Worker(nc, factory, settings)
    try:
        await worker.load()  # the engine chain: ESCAPEMENT_ENGINES, else the model alone
    except (ChainError, ModelNotFound) as exc:
        log.error("%s", exc)
        await worker.close()
        await nc.close()
        return 2
    # Only now do edges count this worker (discovery): a session they admit has a model waiting
    service = await register(nc, worker)
    try:
        await worker.run(stop)
    finally:
        await service.stop()
        await worker.close()
        try:
            await asyncio.wait_for(nc.drain(), timeout=5)
        except (TimeoutError, NatsError):  # no server to drain to (reconnecting): just close
            await nc.close()
        log.info("worker stopped: %s", worker.stats)
    return 0


def idle_priority() -> str:
    """This process (and the threads it starts from now on) at the lowest CPU priority:
    SCHED_IDLE where the OS has it, else nice 19. Returns which one."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return "SCHED_IDLE"
    except (AttributeError, OSError):
        os.nice(19 - os.nice(0))
        return "nice 19"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = from_env(
            WorkerSettings,
            nats_url=args.nats_url,
            model=args.model,
            concurrency=args.concurrency,
            cpu_threads=args.cpu_threads,
        )
        metrics = from_env(MetricsEndpoint)
    except SettingsError as exc:
        print(f"escapement worker: {exc}", file=sys.stderr)
        return 2
    with telemetry("escapement-worker", settings.log_level):
        if settings.role == "looks":  # before the model starts its threads: they inherit it
            log.info("interim looks only, at %s CPU priority", idle_priority())
        return asyncio.run(serve(settings, metrics))


if __name__ == "__main__":
    sys.exit(main())
