"""The worker loop: fetch segments, transcribe off the loop, publish, ack.

Ack decisions follow the failure class:
- success: result published (and stored on ASR_TRANSCRIPTS), then ack;
- undecodable payload or `PoisonSegment`: term at once, `ErrorResult` to the device;
- anything else: nak with delay, until the last delivery, which is termed
  with an `ErrorResult` so the device always hears what became of a segment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext

from jetstream import subjects
from schemas.pipeline import (
    ErrorResult,
    Result,
    ResultMessage,
    Segment,
    decode_segment,
    encode_result,
)
from services.worker.engines import Engine, EngineError, PoisonSegment
from services.worker.settings import WorkerSettings

log = logging.getLogger(__name__)


class Worker:
    def __init__(
        self,
        nc: NATS,
        engine_factory: Callable[[], Engine],
        settings: WorkerSettings,
    ) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.settings = settings
        self._engine_factory = engine_factory
        self.engine: Engine | None = None
        self.executor = ThreadPoolExecutor(
            max_workers=settings.concurrency, thread_name_prefix="escapement-engine"
        )
        self._jobs: set[asyncio.Task[None]] = set()
        self.stats = {"transcribed": 0, "failed": 0, "retried": 0, "audio_s": 0.0, "inference_s": 0.0}
        self.ready = asyncio.Event()

    async def _in_executor(self, fn: Callable[..., object], *args: object) -> object:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def load(self) -> None:
        self.engine = await self._in_executor(self._engine_factory)  # type: ignore[assignment]

    async def run(self, stop: asyncio.Event) -> None:
        """Fetch and process until `stop` is set; then let in-flight jobs finish."""
        if self.engine is None:
            await self.load()
        psub = await self.js.pull_subscribe_bind(
            subjects.CONSUMER_WORKERS, stream=subjects.STREAM_SEGMENTS
        )
        self.ready.set()
        log.info("worker ready (engine %s, concurrency %d)", self.engine.name, self.settings.concurrency)  # type: ignore[union-attr]
        try:
            while not stop.is_set():
                free = self.settings.concurrency - len(self._jobs)
                if free <= 0:
                    await asyncio.wait(self._jobs, return_when=asyncio.FIRST_COMPLETED)
                    continue
                try:
                    msgs = await psub.fetch(free, timeout=self.settings.fetch_timeout_s)
                except NatsTimeoutError:
                    continue  # nothing queued: not an error
                except Exception:
                    if stop.is_set() or self.nc.is_closed:
                        break
                    log.exception("fetch failed; retrying")
                    await asyncio.sleep(1.0)
                    continue
                for msg in msgs:
                    task = asyncio.create_task(self._job(msg))
                    self._jobs.add(task)
                    task.add_done_callback(self._jobs.discard)
        finally:
            await self._finish_jobs()
            with contextlib.suppress(Exception):
                await psub.unsubscribe()

    async def _finish_jobs(self) -> None:
        if not self._jobs:
            return
        done, pending = await asyncio.wait(self._jobs, timeout=self.settings.shutdown_grace_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _job(self, msg: Msg) -> None:
        try:
            await self.handle(msg)
        except Exception:
            log.exception("segment on %s: unexpected failure; handing it back", msg.subject)
            with contextlib.suppress(Exception):
                await msg.nak(delay=self.settings.nak_delay_s)

    async def handle(self, msg: Msg) -> None:
        edge_id, session_id = _ids_from_subject(msg.subject)
        try:
            segment = decode_segment(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            number = _segment_number(msg)
            log.warning("poison message on %s: %s", msg.subject, exc)
            await self._fail(msg, edge_id, session_id, number, "bad_segment", f"undecodable segment: {exc}")
            return
        keepalive = asyncio.create_task(self._keep_lease(msg))
        try:
            assert self.engine is not None
            transcription = await self._in_executor(
                self.engine.transcribe,
                segment.pcm,
                segment.sample_rate,
                segment.language,
                segment.prompt,
                segment.start_ms,
            )
        except PoisonSegment as exc:
            await self._fail(msg, segment.edge_id, segment.session_id, segment.segment, exc.code, str(exc))
            return
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await msg.nak()  # hand it back: shutting down
            raise
        except Exception as exc:  # noqa: BLE001 - any engine failure is retried, bounded
            await self._retry_or_fail(msg, segment, exc)
            return
        finally:
            keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keepalive
        result = Result(
            session_id=segment.session_id,
            segment=segment.segment,
            start_ms=segment.start_ms,
            end_ms=segment.end_ms,
            text=transcription.text,  # type: ignore[attr-defined]
            words=transcription.words,  # type: ignore[attr-defined]
            final=segment.final,
            engine=self.engine.name,
            inference_ms=round(transcription.inference_ms, 1),  # type: ignore[attr-defined]
            language=transcription.language,  # type: ignore[attr-defined]
        )
        try:
            await self._publish(segment.edge_id, result)
        except Exception as exc:  # noqa: BLE001 - NATS trouble: hand the segment back
            log.warning("segment %s:%d: result not published (%r); retrying", segment.session_id, segment.segment, exc)
            with contextlib.suppress(Exception):
                await msg.nak(delay=self.settings.nak_delay_s)
            return
        await msg.ack()
        self.stats["transcribed"] += 1
        self.stats["audio_s"] += (segment.end_ms - segment.start_ms) / 1000
        self.stats["inference_s"] += result.inference_ms / 1000

    async def _keep_lease(self, msg: Msg) -> None:
        """In-progress acks so a long job keeps its lease past ack_wait."""
        while True:
            await asyncio.sleep(self.settings.in_progress_every_s)
            with contextlib.suppress(Exception):
                await msg.in_progress()

    async def _retry_or_fail(self, msg: Msg, segment: Segment, exc: Exception) -> None:
        delivered = msg.metadata.num_delivered if msg.metadata else 1
        code = exc.code if isinstance(exc, EngineError) else "engine_error"
        if delivered >= self.settings.max_deliver:
            log.error("segment %s:%d failed %d times: %s", segment.session_id, segment.segment, delivered, exc)
            await self._fail(msg, segment.edge_id, segment.session_id, segment.segment, code, f"{exc} (after {delivered} attempts)")
            return
        log.warning("segment %s:%d failed (attempt %d), retrying: %s", segment.session_id, segment.segment, delivered, exc)
        self.stats["retried"] += 1
        await msg.nak(delay=self.settings.nak_delay_s * delivered)

    async def _fail(self, msg: Msg, edge_id: str, session_id: str, number: int, code: str, message: str) -> None:
        self.stats["failed"] += 1
        await msg.term()
        if edge_id and session_id:
            error = ErrorResult(session_id=session_id, segment=number, code=code, message=message)
            await self._publish(edge_id, error)

    async def _publish(self, edge_id: str, result: ResultMessage) -> None:
        """Results go to the session's subject; ASR_TRANSCRIPTS stores them (deduped by id)."""
        subject = subjects.results_subject(edge_id, result.session_id)
        headers = {subjects.Header.MSG_ID: subjects.result_msg_id(result.session_id, result.segment)}
        await self.js.publish(subject, encode_result(result), headers=headers)

    def status(self) -> dict[str, object]:
        return {
            "engine": self.engine.name if self.engine else None,
            "concurrency": self.settings.concurrency,
            "in_flight": len(self._jobs),
            **self.stats,
            "time": time.time(),
        }

    async def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def _ids_from_subject(subject: str) -> tuple[str, str]:
    """`asr.segments.<edge>.<session>` -> (edge, session); ('', '') if malformed."""
    parts = subject.split(".")
    if len(parts) != 4:
        return "", ""
    try:
        return subjects.check_token(parts[2]), subjects.check_token(parts[3])
    except subjects.InvalidToken:
        return "", ""


def _segment_number(msg: Msg) -> int:
    msg_id = (msg.headers or {}).get(subjects.Header.MSG_ID, "")
    try:
        return int(msg_id.rsplit(":", 1)[-1])
    except ValueError:
        return -1

