"""The worker loop: fetch segments, transcribe off the loop, publish, ack.

Ack decisions follow the failure class:
- success: result published (and stored on ASR_TRANSCRIPTS), then ack;
- undecodable payload, or an engine error that is not retryable
  (`PoisonSegment`): dead-lettered and termed at once;
- anything else: nak with a back-off delay (`nak_delay_s` times the delivery
  count), until the last delivery the consumer allows (`max_deliver`), which
  is dead-lettered and termed. Nothing is retried forever: if the consumer
  allows endless redelivery, the worker still gives up after
  `WorkerSettings.max_deliver` attempts.
Every dead letter is kept on ASR_DEAD and reported to the device as an
`ErrorResult` (`services.worker.deadletter`). A segment whose holders kept
dying is dead-lettered from the server's MAX_DELIVERIES advisory instead.

The lease rule. A delivery is this worker's to answer only while its lease
holds: `ack_wait` (read from the consumer, 10 s by default) from when the
segment was delivered, renewed by every in-progress ack (+WPI) that the
server confirmed. Once it may have lapsed, the server may have redelivered
the segment to another worker, and nats-server accepts an ack, nak, term or
+WPI on the old delivery as if it were for the new one (nats-server #4786):
a late ack would remove a segment another worker is still transcribing, a
late +WPI would keep its lease alive. So:
- the lease is counted from before the fetch that returned the segment (the
  previous fetch's start, if that one ended empty: a pull request that
  expired on our side may still bring a message, and the next fetch returns
  it) and renewed from when a confirmed +WPI was sent: both no later than
  the server starts its own timer, so the worker may think its lease shorter
  than it is, never longer;
- `lease_margin_s` before it ends, the worker stops answering for that
  delivery: no ack, nak, term, +WPI or dead letter. A transcript it has is
  still published (results are idempotent: ASR_TRANSCRIPTS dedups them by
  Nats-Msg-Id and the edge by segment number), and the delivery is left to
  whoever holds it now: the redelivery (`num_delivered` one higher), or, if
  this was the last one allowed, the MAX_DELIVERIES advisory, which finds the
  published result and keeps no dead letter.
Every answer goes through a `Delivery` (`services.worker.delivery`), which
refuses it once the lease may have lapsed: the rule needs no care at the call
sites.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import NotFoundError

from jetstream import subjects
from jetstream.setup import apply_consumer, lane_consumer_definitions
from observability.metrics import Metrics
from observability.tracing import extract_context, get_tracer
from schemas.pipeline import Result, ResultMessage, Segment, decode_segment, encode_result
from services.common.board import board_at
from services.common.host import HostLoad, others_running
from services.common.supervise import start_supervised
from services.worker.chain import (
    EngineChain,
    EngineSpec,
    Slot,
    build_chain,
    default_builder,
    parse_chain,
)
from services.worker.deadletter import MAX_DELIVERIES, DeadLetters, Queued
from services.worker.delivery import Delivery, Lease
from services.worker.engines import Engine, EngineError, Transcription, result_of
from services.worker.interims import InterimLooks
from services.worker.settings import WorkerSettings
from services.worker.sweep import Sweep
from services.worker.withdrawn import WITHDRAWN

log = logging.getLogger(__name__)
tracer = get_tracer("escapement.worker")

RATE_WINDOW = 50  # finals the reported decode rate is measured over
DEFAULT_ACK_WAIT_S = 30.0  # nats-server's, for a consumer that names none
# Segments of uploaded files are taken when no live final waits: after this long
# without live work, or, while interim looks keep the worker busy, once this long
# after the last one was asked for (so an upload moves on however busy sessions are).
FILE_IDLE_S = 0.3
FILE_SHARE_S = 2.0

P = ParamSpec("P")
T = TypeVar("T")


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
        self.chain: EngineChain | None = None  # settings.engines, or the factory's engine
        self._swapping = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()  # old chains finishing their jobs
        self.executor = ThreadPoolExecutor(
            max_workers=settings.concurrency, thread_name_prefix="escapement-engine"
        )
        self.dead = DeadLetters(self.js)
        lane = settings.lane
        self.lane = lane
        self.consumer = subjects.lane_consumer(subjects.CONSUMER_WORKERS, lane)
        self.files_consumer = subjects.lane_consumer(subjects.CONSUMER_FILES, lane)
        self.sweep = Sweep(
            self.js,
            self.dead,
            every_s=settings.sweep_every_s,
            expiry_margin_s=settings.sweep_expiry_margin_s,
            settle_s=settings.sweep_settle_s,
            max_scan=settings.sweep_max_scan,
            consumers=(self.consumer, self.files_consumer),
        )
        self.ack_wait = DEFAULT_ACK_WAIT_S
        self.max_deliver = settings.max_deliver
        self._jobs: set[asyncio.Task[None]] = set()
        self._files_empty: float | None = None  # start of the last file fetch that was empty
        self._live_seen = 0.0  # when a live final was last fetched or finished here
        self._file_asked = 0.0  # when a file segment was last asked for
        self.stats = {
            "transcribed": 0,
            "failed": 0,
            "retried": 0,
            "lapsed": 0,  # deliveries left unanswered because their lease may have lapsed
            "audio_s": 0.0,
            "inference_s": 0.0,
            "batched": 0,  # segments decoded in a batch of several (batch_max > 1)
            "looks": 0,  # interim looks taken
        }
        self.ready = asyncio.Event()
        self.metrics = Metrics()
        self.file_idle_s = FILE_IDLE_S
        self.file_share_s = FILE_SHARE_S
        self._batch = max(1, settings.batch_max)
        # (audio s, decode s) of the recent finals: the decode rate edges admit sessions by
        self._recent: deque[tuple[float, float]] = deque(maxlen=RATE_WINDOW)
        self.on_discovery: Callable[[], None] | None = None  # discovery metadata changed
        self._load = HostLoad()  # for the looks role: how busy the host is with other work

    async def run_blocking(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """`fn(*args, **kwargs)` on the engine's executor, off the event loop."""
        call = functools.partial(fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self.executor, call)

    @property
    def engine(self) -> Engine | None:
        """The chain's first engine (the one that answers while all is well)."""
        return self.chain.slots[0].engine if self.chain else None  # type: ignore[return-value]

    async def load(self) -> Engine:
        """Build the chain (`settings.engines`; else one engine from the factory).
        Raises `ChainError` or `ModelNotFound` with the reason."""
        if self.settings.engines:
            specs = parse_chain(self.settings.engines)
            self.chain, _ = await build_chain(
                specs, default_builder(self.settings), self.settings, self.metrics
            )
        else:
            factory = self._engine_factory
            self.chain, _ = await build_chain(
                [EngineSpec(self.settings.model)],
                lambda _spec: factory(),
                self.settings,
                self.metrics,
            )
        assert self.engine is not None
        return self.engine

    async def set_engines(self, text: str) -> dict[str, object]:
        """Hot swap: new jobs use the chain `text` names once its models are loaded;
        jobs already running finish on the old one, whose engines that the new chain
        does not reuse are closed after. Nothing restarts. A `ChainError` or
        `ModelNotFound` leaves the running chain as it is."""
        async with self._swapping:
            specs = parse_chain(text)
            old = self.chain
            new, reused = await build_chain(
                specs, default_builder(self.settings), self.settings, self.metrics, reuse=old
            )
            self.chain = new
            log.info(
                "engine chain now %s (was %s)",
                " -> ".join(new.names), " -> ".join(old.names) if old else "none",
            )  # fmt: skip
            if old is not None:
                task = asyncio.create_task(self._retire(old, reused))
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)
            return {"chain": new.names, "previous": old.names if old else []}

    async def _retire(self, chain: EngineChain, keep: list[Slot]) -> None:
        await chain.drained()
        await chain.close(keep=keep)
        gone = [n for n in chain.names if n not in {s.name for s in keep}]
        if gone:
            log.info("engines closed after their last jobs: %s", ", ".join(gone))

    def configure(self, consumer: js_api.ConsumerConfig) -> None:
        """Take ack_wait and max_deliver from the consumer: it is what the server enforces."""
        self.ack_wait = float(consumer.ack_wait or DEFAULT_ACK_WAIT_S)
        if consumer.max_deliver and consumer.max_deliver > 0:
            self.max_deliver = consumer.max_deliver
        else:
            log.warning(
                "consumer %s redelivers without end; giving up after %d attempts",
                consumer.durable_name or consumer.name, self.max_deliver,
            )  # fmt: skip
        if self.settings.in_progress_every_s >= self.ack_wait - self.settings.lease_margin_s:
            log.warning(
                "in_progress_every_s=%g does not renew a %g s lease in time",
                self.settings.in_progress_every_s, self.ack_wait,
            )  # fmt: skip

    async def run(self, stop: asyncio.Event) -> None:
        """Fetch and process until `stop` is set; then let in-flight jobs finish."""
        if self.settings.role == "looks":
            await self._run_looks(stop)
            return
        engine = self.engine or await self.load()
        info = await self._consumer(stop)
        if info is None:
            return
        self.configure(info.config)
        # Before the first pull: the advisory is sent when a worker pulls.
        advisories = await self._advisories()
        advisories.append(await self.nc.subscribe(subjects.WITHDRAWN_ALL, cb=WITHDRAWN.on_notice))
        sweeping = self._start_sweep(stop)
        psub = await self.js.pull_subscribe_bind(self.consumer, stream=subjects.STREAM_SEGMENTS)
        looks = await self._interim_looks()
        files = await self._file_segments()
        self.ready.set()
        log.info(
            "worker ready (engine %s, concurrency %d, ack_wait %g s, max_deliver %d)",
            engine.name, self.settings.concurrency, self.ack_wait, self.max_deliver,
        )  # fmt: skip
        ended_empty: float | None = None  # start of the previous fetch, if it brought nothing
        stopping = asyncio.create_task(stop.wait())  # wakes a worker waiting for a free slot
        try:
            while not stop.is_set():
                free = self.settings.concurrency - len(self._jobs)
                if free <= 0:
                    await asyncio.wait({*self._jobs, stopping}, return_when=asyncio.FIRST_COMPLETED)
                    continue
                asked, queued = time.monotonic(), psub.pending_msgs
                polling = looks is not None or files is not None
                wait = self.settings.interim_poll_s if polling else self.settings.fetch_timeout_s
                try:
                    msgs = await psub.fetch(free * self._batch, timeout=wait)
                except TimeoutError:  # nats' own, or the plain one a fetch raises between its pulls
                    ended_empty = asked
                    await self._use_idle_slot(looks, files)
                    continue  # nothing queued: not an error
                except NatsError as exc:  # no leader, reconnecting, ...: the cluster recovers
                    ended_empty = asked
                    if stop.is_set() or self.nc.is_closed:
                        break
                    log.warning("fetch failed (%s); retrying", type(exc).__name__)
                    await asyncio.sleep(1.0)
                    continue
                granted = self._granted(asked, ended_empty, queued)
                ended_empty = None
                if self._batch > 1:  # batching across sessions: up to batch_max per job
                    await self._start_batches(psub, msgs, granted)
                    continue
                for msg in msgs:
                    self._start_job(msg, granted, live=True)
        finally:
            stopping.cancel()
            await self._finish_jobs()
            if looks:
                await looks.stop()
            await self._unsubscribe(psub, "segments")
            if files:
                await self._unsubscribe(files, "file segments")
            await self._stop_watching_dead(advisories, sweeping)

    async def _advisories(self) -> list[Subscription]:
        """The MAX_DELIVERIES advisories of both consumers (one queue group for all workers)."""
        if not self.settings.max_deliveries_advisory:
            log.warning("fault drill: MAX_DELIVERIES advisories ignored; the sweep alone buries")
            return []
        return [
            await self.nc.subscribe(
                subject, queue=subjects.DEAD_LETTER_QUEUE, cb=self.dead.on_max_deliveries
            )
            for subject in (
                subjects.advisory_max_deliveries(self.consumer),
                subjects.advisory_max_deliveries(self.files_consumer),
            )
        ]

    async def _stop_watching_dead(
        self, advisories: list[Subscription], sweeping: asyncio.Task[None] | None
    ) -> None:
        if sweeping is not None:
            sweeping.cancel()
            await asyncio.gather(sweeping, return_exceptions=True)
        for sub in advisories:
            await self._unsubscribe(sub, "advisories and notices")

    def _start_sweep(self, stop: asyncio.Event) -> asyncio.Task[None] | None:
        """The dead-letter sweep (services/worker/sweep.py), unless `sweep_every_s` is 0."""
        if self.settings.sweep_every_s <= 0:
            return None
        return start_supervised(
            "dead-letter-sweep", lambda: self.sweep.run(stop), restarts=self.metrics.loop_restarts
        )

    def _start_job(self, msg: Msg, granted: float, live: bool = False) -> None:
        lease = Lease(granted, self.ack_wait, self.settings.lease_margin_s)
        delivery = Delivery(msg, lease, self.nc, on_lapsed=self._count_lapse)
        task = asyncio.create_task(self._job(delivery))
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)
        if live:
            self._live_seen = time.monotonic()
            task.add_done_callback(self._live_done)

    def _granted(self, asked: float, ended_empty: float | None, queued: int) -> float:
        """When the lease of what a fetch started at `asked` returns began, at the latest.

        A pull request that expired on our side may still bring a message, which the
        next fetch returns: then the lease began before that earlier fetch. Such a
        message arrives within the earlier request's life (a fetch timeout); after
        that, only one already waiting in the subscription (`queued`) can be late."""
        if ended_empty is None:
            return asked
        late_window = self.settings.fetch_timeout_s + self.settings.lease_margin_s
        if queued or asked - ended_empty < late_window:
            return min(asked, ended_empty)
        return asked

    def _live_done(self, _: asyncio.Task[None]) -> None:
        self._live_seen = time.monotonic()

    async def _use_idle_slot(
        self, looks: InterimLooks | None, files: JetStreamContext.PullSubscription | None
    ) -> None:
        """No live final waits: a segment of an uploaded file that waited `file_share_s`,
        else an interim look, else the file's after a lull in live work."""
        if files is not None and self._file_starved():
            await self._take_file_segment(files)
        elif not (looks and await self._take_look(looks)) and files is not None:
            if self._files_due():
                await self._take_file_segment(files)

    def _file_starved(self) -> bool:
        return not self._jobs and time.monotonic() - self._file_asked >= self.file_share_s

    def _files_due(self) -> bool:
        """A file segment may take the slot: no live work here for `file_idle_s`.

        Between the finals of busy live sessions the queue is empty only for
        moments; a file segment started in one would hold the slot for a whole
        decode when the next final comes. Waiting for a quiet spell leaves the
        upload the time live sessions do not use, not the gaps between their finals."""
        if self._jobs:
            return False
        return time.monotonic() - self._live_seen >= self.file_idle_s

    async def _file_segments(self) -> JetStreamContext.PullSubscription | None:
        """The uploaded files' consumer (same stream, lower priority), if it exists; none
        for a worker that takes live finals only."""
        if self.settings.role == "finals":
            return None
        try:
            return await self.js.pull_subscribe_bind(
                self.files_consumer, stream=subjects.STREAM_SEGMENTS
            )
        except (NatsError, TimeoutError) as exc:  # an older deployment without it
            log.warning("no file segments (%r): live sessions only", exc)
            return None

    async def _take_file_segment(self, files: JetStreamContext.PullSubscription) -> None:
        """One segment of an uploaded file, if one waits (at most `interim_poll_s`).

        One at a time, and only after a fetch of live finals came back empty, so a
        long upload holds a slot for one segment's decode at most, never the queue."""
        asked, queued = time.monotonic(), files.pending_msgs
        self._file_asked = asked
        try:
            msgs = await files.fetch(1, timeout=self.settings.interim_poll_s)
        except TimeoutError:  # nats' own, or the plain one a fetch raises between its pulls
            self._files_empty = asked
            return
        except NatsError as exc:
            self._files_empty = asked
            log.info("file segment fetch failed: %r", exc)
            return
        granted = self._granted(asked, self._files_empty, queued)
        self._files_empty = None
        for msg in msgs:
            self._start_job(msg, granted)

    async def _unsubscribe(
        self, sub: Subscription | JetStreamContext.PullSubscription, what: str
    ) -> None:
        if self.nc.is_closed:
            return  # nothing left to unsubscribe from
        try:
            await sub.unsubscribe()
        except NatsError as exc:
            log.warning("could not unsubscribe from %s: %r", what, exc)

    async def _run_looks(self, stop: asyncio.Event) -> None:
        """The "looks" role: the work no live final waits for, one job at a time, until
        `stop` is set: interim looks, and uploaded files' segments (`_use_idle_slot`'s
        share rule, so that busy sessions' looks do not starve an upload). The process
        runs at idle CPU priority (services/worker/__main__.py): a finals worker on the
        same core always goes first."""
        engine = self.engine or await self.load()
        if self.lane and await self._consumer(stop) is None:  # creates the lane's consumers
            return
        looks = await self._interim_looks()
        files = await self._file_segments()
        if files is not None:  # its jobs' leases are the file consumer's
            try:
                info = await self.js.consumer_info(subjects.STREAM_SEGMENTS, self.files_consumer)
                self.configure(info.config)
            except (NatsError, TimeoutError) as exc:
                log.warning("cannot read consumer %s (%r)", self.files_consumer, exc)
        self.ready.set()
        log.info("worker ready (interim looks and file segments only, engine %s)", engine.name)
        stopping = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                if self._jobs:
                    await asyncio.wait({*self._jobs, stopping}, return_when=asyncio.FIRST_COMPLETED)
                    continue
                if looks is None and files is None:
                    await asyncio.wait({stopping})
                    break
                await self._use_idle_slot(looks, files)  # each waits interim_poll_s at most
        finally:
            stopping.cancel()
            await self._finish_jobs()
            if looks:
                await looks.stop()
            if files:
                await self._unsubscribe(files, "file segments")

    async def _interim_looks(self) -> InterimLooks | None:
        if not self.settings.interims or self.settings.role == "finals":
            return None
        looks = InterimLooks(
            self.nc,
            self._decode_look,
            self.settings.interim_max_age_s,
            self.settings.interim_poll_s,
            subjects.lane_consumer(subjects.CONSUMER_INTERIMS, self.lane),
        )
        try:
            await looks.start()
        except (NatsError, TimeoutError) as exc:  # an older deployment without ASR_INTERIMS
            log.warning("no interim looks (%r): finals only", exc)
            return None
        return looks

    async def _take_look(self, looks: InterimLooks) -> bool:
        if self._host_busy():
            await asyncio.sleep(self.settings.interim_poll_s)  # the newest look waits
            return False
        msg = await looks.take()
        if msg is None:
            return False
        self.stats["looks"] += 1
        task = asyncio.create_task(looks.handle(msg))
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)
        return True

    def _host_busy(self) -> bool:
        """Whether an interim look should wait. At idle priority a look steals no CPU
        time from a final, but two decodes at once on this host still slow each other:
        at 10 sessions on 2 cores, finals p50 / p95 were 928 / 1,669 ms with looks
        running whenever a core was free, 828-844 / 1,439-1,486 with this gate and
        841 / 1,421 with no looks at all. So while other work has kept more than
        `look_busy_share` of the host's cores busy lately, a look worker starts a look
        only while finals are decoded on fewer than half the cores (none, on 2 cores):
        as the workers' decode board says (services/common/board.py), else counting
        whatever else runs (/proc/stat). On a lightly loaded host looks run whenever
        they wait. The board counts finals only, not the other look worker, the edge
        or NATS: at 10 sessions on a busy host, finals' p95 was 2,133 / 1,925 ms with
        it against 2,908 / 2,436 counting everything (interleaved runs)."""
        limit = self.settings.look_busy_share
        if self.settings.role != "looks" or limit <= 0:
            return False
        share = self._load.others_share()
        if share is None or share < limit:
            return False
        board = board_at(self.settings.decode_board)
        if board is not None:
            return board.others_decoding() >= max(1, self._load.cores // 2)
        others = others_running()
        return others is not None and others >= max(1, self._load.cores // 2)

    async def _decode_look(self, segment: Segment) -> tuple[Transcription, str]:
        assert self.chain is not None
        return await self.chain.transcribe(segment)

    def _count_lapse(self) -> None:
        self.stats["lapsed"] += 1

    async def _consumer(self, stop: asyncio.Event) -> js_api.ConsumerInfo | None:
        """The workers' consumer, once it exists (the edge or `escapement up` creates the
        default model's; a worker of another model creates its lane's itself)."""
        waiting = False
        while not stop.is_set():
            try:
                if self.lane:
                    await self._create_lane()
                return await self.js.consumer_info(subjects.STREAM_SEGMENTS, self.consumer)
            except NotFoundError:
                if not waiting:
                    log.warning(
                        "consumer %s on %s not found; waiting for it",
                        self.consumer, subjects.STREAM_SEGMENTS,
                    )  # fmt: skip
                    waiting = True
            except (NatsError, TimeoutError) as exc:
                log.warning("cannot read consumer %s (%r); retrying", self.consumer, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1.0)
        return None

    async def _create_lane(self) -> None:
        """The consumers of this worker's model lane, if missing (an operator may have
        made them; a NATS user without the right to waits for them)."""
        for definition in lane_consumer_definitions(self.lane):
            name = definition.config["durable_name"]
            try:
                await self.js.consumer_info(definition.stream, name)
            except NotFoundError:
                log.info("creating consumer %s for model %s", name, self.settings.model)
                await apply_consumer(self.js, definition)

    async def _finish_jobs(self) -> None:
        """Shutting down: give in-flight jobs `shutdown_grace_s`, then cancel them (they nak)."""
        if not self._jobs:
            return
        log.info(
            "waiting up to %g s for %d job(s)", self.settings.shutdown_grace_s, len(self._jobs)
        )
        done, pending = await asyncio.wait(self._jobs, timeout=self.settings.shutdown_grace_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _job(self, delivery: Delivery) -> None:
        try:
            await self.handle(delivery)
        except Exception:
            log.exception("segment on %s: unexpected failure; handing it back", delivery.subject)
            await self._hand_back(delivery, self.settings.nak_delay_s)

    async def handle(self, delivery: Delivery) -> None:
        segment = await self._accept(delivery)
        if segment is not None:
            await self._handle_accepted(delivery, segment)

    async def _accept(self, delivery: Delivery) -> Segment | None:
        """The delivery's segment; None when it was given up on (too many deliveries,
        undecodable)."""
        attempts = delivery.num_delivered
        if attempts > self.max_deliver:  # only where the consumer itself sets no bound
            await self._give_up(delivery, MAX_DELIVERIES, f"delivered {attempts} times; giving up")
            return None
        try:
            segment = decode_segment(delivery.data)
            subjects.check_token(segment.edge_id)  # they become subjects of the result
            subjects.check_token(segment.session_id)
        except (msgspec.DecodeError, msgspec.ValidationError, subjects.InvalidToken) as exc:
            log.warning("poison message on %s: %s", delivery.subject, exc)
            await self._give_up(delivery, "bad_segment", f"undecodable segment: {exc}")
            return None
        return segment

    @staticmethod
    def _span_attributes(delivery: Delivery, segment: Segment) -> dict[str, str | int]:
        return {
            "escapement.session": segment.session_id,
            "escapement.segment": segment.segment,
            "escapement.tenant": segment.tenant,
            "escapement.delivery": delivery.num_delivered,
        }

    # --- batching across sessions (settings.batch_max > 1) ---------------------------

    async def _start_batches(
        self, psub: JetStreamContext.PullSubscription, msgs: list[Msg], granted: float
    ) -> None:
        """Fetched live finals in jobs of up to `batch_max`. A fetch short of a full
        batch waits up to `batch_wait_ms` for more, so a lone segment is held back no
        longer than that. The lease of each counts from `granted`, the first fetch's
        start (earlier than the server's timer for those fetched after)."""
        until = time.monotonic() + self.settings.batch_wait_ms / 1000
        while len(msgs) % self._batch and (left := until - time.monotonic()) > 0:
            try:
                msgs += await psub.fetch(self._batch - len(msgs) % self._batch, timeout=left)
            except TimeoutError:  # nats' own, or the plain one a fetch raises between its pulls
                break
            except NatsError as exc:
                log.info("batch top-up fetch failed: %r", exc)
                break
        for i in range(0, len(msgs), self._batch):
            self._start_batch(msgs[i : i + self._batch], granted)

    def _start_batch(self, msgs: list[Msg], granted: float) -> None:
        if len(msgs) == 1:
            self._start_job(msgs[0], granted, live=True)
            return
        deliveries = [
            Delivery(m, Lease(granted, self.ack_wait, self.settings.lease_margin_s), self.nc,
                     on_lapsed=self._count_lapse)
            for m in msgs
        ]  # fmt: skip
        task = asyncio.create_task(self._batch_job(deliveries))
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)
        self._live_seen = time.monotonic()
        task.add_done_callback(self._live_done)

    async def _batch_job(self, deliveries: list[Delivery]) -> None:
        try:
            await self._handle_batch(deliveries)
        except Exception:
            log.exception(
                "a batch of %d segments: unexpected failure; handing back", len(deliveries)
            )
            for delivery in deliveries:
                if not delivery.answered:
                    await self._hand_back(delivery, self.settings.nak_delay_s)

    async def _handle_batch(self, deliveries: list[Delivery]) -> None:
        """As `handle`, for several deliveries decoded in one engine call: each keeps its
        lease meanwhile, and each result is published and acked (or its failure handled)
        as if it had been decoded alone."""
        accepted = [(d, s) for d in deliveries if (s := await self._accept(d)) is not None]
        if len(accepted) == 1:
            await self._handle_accepted(*accepted[0])
            return
        if not accepted:
            return
        spans = [
            tracer.start_span(
                "segment.transcribe",
                context=extract_context(d.headers),
                attributes={**self._span_attributes(d, s), "escapement.batch": len(accepted)},
            )
            for d, s in accepted
        ]
        self.stats["batched"] += len(accepted)
        every = self.settings.in_progress_every_s
        try:
            try:
                async with contextlib.AsyncExitStack() as leases:
                    for d, _ in accepted:
                        await leases.enter_async_context(d.kept_alive(every))
                    chain = self.chain  # a hot swap from here on: this batch ends on this chain
                    assert chain is not None
                    outcomes = await chain.transcribe_batch([s for _, s in accepted])
            except asyncio.CancelledError:
                for d, _ in accepted:
                    await self._hand_back(d, None)  # shutting down
                raise
            await asyncio.gather(
                *(self._conclude(d, s, o) for (d, s), o in zip(accepted, outcomes, strict=True))
            )
        finally:
            for span in spans:
                span.end()

    async def _handle_accepted(self, delivery: Delivery, segment: Segment) -> None:
        with tracer.start_as_current_span(
            "segment.transcribe",
            context=extract_context(delivery.headers),
            attributes=self._span_attributes(delivery, segment),
        ):
            await self._transcribe(delivery, segment)

    async def _conclude(
        self, delivery: Delivery, segment: Segment, outcome: tuple[Transcription, str] | Exception
    ) -> None:
        """One segment of a batch: its result published and acked, or its failure handled
        as `_transcribe` handles it."""
        if isinstance(outcome, tuple):
            await self._answer(delivery, segment, *outcome)
        elif isinstance(outcome, EngineError) and not outcome.retryable:
            await self._give_up(delivery, outcome.code, str(outcome))
        else:
            await self._retry_or_give_up(delivery, segment, outcome)

    async def _transcribe(self, delivery: Delivery, segment: Segment) -> None:
        every = self.settings.in_progress_every_s
        try:
            async with delivery.kept_alive(every):
                chain = self.chain  # a hot swap from here on: this job finishes on this chain
                assert chain is not None
                transcription, engine = await chain.transcribe(segment)
        except EngineError as exc:
            if exc.retryable:
                await self._retry_or_give_up(delivery, segment, exc)
            else:  # PoisonSegment and its kind: the same every time
                await self._give_up(delivery, exc.code, str(exc))
            return
        except asyncio.CancelledError:
            await self._hand_back(delivery, None)  # shutting down
            raise
        except Exception as exc:  # noqa: BLE001 - any engine failure is retried, bounded
            await self._retry_or_give_up(delivery, segment, exc)
            return
        if transcription.withdrawn:  # already deleted from the queue; the ack is a formality
            WITHDRAWN.stopped += 1
            await delivery.ack()
            return
        await self._answer(delivery, segment, transcription, engine)

    async def _answer(
        self, delivery: Delivery, segment: Segment, transcription: Transcription, engine: str
    ) -> None:
        """Publish the result (through NATS outages, keeping the lease), then ack."""
        every = self.settings.in_progress_every_s
        result = result_of(segment, transcription, engine)
        # A NATS outage (a cluster electing a leader) must not use up deliveries:
        # keep the lease and retry the publish for a while before handing it back.
        async with delivery.kept_alive(every):
            published = await self._publish_patiently(segment, result, delivery.replay)
        if not published:
            await self._hand_back(delivery, self.settings.nak_delay_s)
            return
        audio_s = (segment.end_ms - segment.start_ms) / 1000
        self.stats["transcribed"] += 1
        self.stats["audio_s"] += audio_s
        self.stats["inference_s"] += result.inference_ms / 1000
        attrs = {"tenant": segment.tenant, "engine": result.engine}
        self.metrics.inference_ms.record(result.inference_ms, attrs)
        if audio_s > 0:
            self.metrics.rtf.record(result.inference_ms / 1000 / audio_s, attrs)
        await delivery.ack()  # refused once the lease may have lapsed: the result stands
        if audio_s > 0 and result.inference_ms > 0:
            self._recent.append((audio_s, result.inference_ms / 1000))
            if self.on_discovery is not None:
                self.on_discovery()

    async def _publish_patiently(self, segment: Segment, result: Result, replay: str) -> bool:
        deadline = time.monotonic() + self.settings.publish_retry_s
        pause = 0.25
        while True:
            try:
                await self._publish(segment.edge_id, result, replay)
                return True
            except (NatsError, TimeoutError) as exc:
                if time.monotonic() + pause > deadline:
                    log.warning(
                        "segment %s:%d: result not published for %.0f s (%r); handing it back",
                        segment.session_id, segment.segment, self.settings.publish_retry_s, exc,
                    )  # fmt: skip
                    return False
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)

    async def _hand_back(self, delivery: Delivery, delay: float | None) -> None:
        """Nak it; if that fails, it comes back anyway once its lease runs out."""
        try:
            await delivery.nak(delay)
        except NatsError as exc:
            log.warning(
                "seq %d: nak failed (%r); it is redelivered when its lease runs out",
                delivery.seq, exc,
            )  # fmt: skip

    async def _retry_or_give_up(self, delivery: Delivery, segment: Segment, exc: Exception) -> None:
        delivered = delivery.num_delivered
        code = exc.code if isinstance(exc, EngineError) else "engine_error"
        if delivered >= self.max_deliver:
            await self._give_up(delivery, code, f"{exc} (after {delivered} attempts)")
            return
        log.warning(
            "segment %s:%d failed (attempt %d), retrying: %s",
            segment.session_id,
            segment.segment,
            delivered,
            exc,
        )
        self.stats["retried"] += 1
        await self._hand_back(delivery, self.settings.nak_delay_s * delivered)

    async def _give_up(self, delivery: Delivery, code: str, message: str) -> None:
        """Dead-letter (ASR_DEAD + ErrorResult to the device), then term."""
        if not delivery.answerable(f"dead letter ({code})"):
            return
        try:
            await self.dead.bury(Queued.of(delivery), code, message)
        except (NatsError, TimeoutError) as exc:
            log.warning("seq %d: not dead-lettered (%r); handing it back", delivery.seq, exc)
            await self._hand_back(delivery, self.settings.nak_delay_s)
            return
        self.stats["failed"] += 1
        await delivery.term()

    async def _publish(self, edge_id: str, result: ResultMessage, replay: str = "") -> None:
        """Results go to the session's subject; ASR_TRANSCRIPTS stores them (deduped by id)."""
        subject = subjects.results_subject(edge_id, result.session_id)
        msg_id = subjects.result_msg_id(result.session_id, result.segment, replay, result.revision)
        await self.js.publish(
            subject, encode_result(result), headers={subjects.Header.MSG_ID: msg_id}
        )

    def status(self) -> dict[str, object]:
        return {
            "engine": self.engine.name if self.engine else None,
            "engines": self.chain.view() if self.chain else [],
            "concurrency": self.settings.concurrency,
            "in_flight": len(self._jobs),
            "dead_lettered": self.dead.buried,
            "swept": {"exhausted": self.sweep.stats.exhausted, "expired": self.sweep.stats.expired},
            # void early finals: notices heard, decodes stopped after the encoder (per process)
            "withdrawn": {"heard": WITHDRAWN.heard, "stopped": WITHDRAWN.stopped},
            "languages": list(getattr(self.engine, "languages", None) or []),
            **self.stats,
            "time": time.time(),
        }

    def discovery(self) -> dict[str, str]:
        """Discovery metadata: the model, and the languages it speaks (comma-separated;
        absent when the engine does not say), so edges refuse others up front."""
        first = self.chain.slots[0].spec if self.chain else None
        # a remote engine by its public name: never its URL's credentials
        meta = {
            "model": (first.name if first.remote else first.text) if first else self.settings.model,
            "role": self.settings.role,
            "serves": self.settings.model,  # the model whose sessions it takes (its lane)
            "lane": self.lane,
        }
        if self._recent:  # audio seconds decoded per second of decoding, recently
            meta["decode_rate"] = f"{self.decode_rate():.3f}"
        languages = getattr(self.engine, "languages", None)
        if languages:
            meta["languages"] = ",".join(languages)
            multilingual = getattr(self.engine, "multilingual", len(languages) > 1)
            meta["multilingual"] = "true" if multilingual else "false"
        return meta

    def decode_rate(self) -> float:
        """Audio seconds per second of decoding over the last RATE_WINDOW finals (0: none)."""
        decoding = sum(d for _, d in self._recent)
        return sum(a for a, _ in self._recent) / decoding if decoding > 0 else 0.0

    async def close(self) -> None:
        for task in self._retiring:
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        if self.chain is not None:
            await self.chain.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
