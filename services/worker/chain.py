"""The engine chain: engines tried in order, each behind a circuit breaker.

A worker holds a chain such as `base,tiny.en,openai:http://asr.internal:8000/v1`
(`ESCAPEMENT_ENGINES`, a comma-separated or JSON list). A segment goes to the
first engine whose breaker is closed. An engine that raises, or takes longer
than its deadline (`max(engine_deadline_s, engine_deadline_factor x audio
seconds)`), opens its breaker and the same `Segment` (audio, context, prompt:
everything travels in it) goes to the next engine at once: no nak, no wait for
`ack_wait`. While a breaker is open the engine gets no real segments; after
`breaker_cooldown_s` a probe (the most recent segment any engine decoded, its
result thrown away) tries it in the background, half-open, and closes the
breaker on success or opens it for another cool-down on failure. When every
breaker is open the engines are tried anyway, in order: trying is better than
handing the segment back untried. The last engine left to try gets a longer
deadline (`LAST_RESORT_SCALE` times): nobody else could take the segment.

A call on a thread cannot be cancelled. A call past its deadline is abandoned
and counted as stuck on its engine; each engine has its own executor, sized for
`concurrency` live calls plus `engine_max_stuck` stuck ones, so a hang never
blocks the fallback. An engine holding `engine_max_stuck` stuck calls takes no
more (not even probes) until one returns; it says so in the log. Remote engines
are coroutines and are cancelled at their deadline.

Fault injection, for drills only, wraps chosen engines when `ESCAPEMENT_FAULTS`
names them (`parse_faults`): a seeded fraction of calls raises or hangs, within
a window of call numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import urlsplit

from observability.metrics import Metrics
from schemas.pipeline import Segment
from services.common.board import board_at
from services.worker.engines import (
    Engine,
    EngineError,
    PoisonSegment,
    RetryableEngineError,
    Transcription,
)
from services.worker.settings import WorkerSettings

log = logging.getLogger(__name__)

REMOTE_PREFIX = "openai:"
CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
# The last engine left to try gets this many deadlines: past its deadline there is
# nobody to hand the segment to, and abandoning a slow call only means a retry.
LAST_RESORT_SCALE = 4.0


class ChainError(ValueError):
    """A chain or fault setting that cannot be used; the message says why."""


class EngineDeadline(RetryableEngineError):
    code = "engine_deadline"


class EnginesStuck(RetryableEngineError):
    code = "engines_stuck"


@runtime_checkable
class AsyncEngine(Protocol):
    """An engine whose calls are coroutines (a remote server): cancelled at the deadline."""

    name: str

    async def transcribe_async(self, segment: Segment) -> Transcription: ...


AnyEngine = Engine | AsyncEngine


# --- what the chain is made of -------------------------------------------------------


@dataclass(frozen=True)
class EngineSpec:
    """One element of a chain as written: `tiny.en`, `base`, a model folder, or
    `openai:<base url>` (an OpenAI-compatible `/v1/audio/transcriptions` server)."""

    text: str

    @property
    def remote(self) -> bool:
        return self.text.startswith(REMOTE_PREFIX)

    @property
    def url(self) -> str:
        return self.text[len(REMOTE_PREFIX) :].rstrip("/")

    @property
    def name(self) -> str:
        """What results name as their engine (`Final.engine`)."""
        if self.remote:  # host, port and path only: never credentials or a query
            parts = urlsplit(self.url)
            host = parts.hostname or ""
            port = f":{parts.port}" if parts.port else ""
            return f"openai:{host}{port}{parts.path}"
        if self.text in ("tiny.en", "base"):
            return f"faster-whisper:{self.text}"
        return f"faster-whisper:{Path(self.text).name}"


def parse_chain(text: str) -> list[EngineSpec]:
    """`tiny.en,openai:http://host:8000/v1` or `["base", "tiny.en"]` -> specs."""
    text = text.strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except ValueError as exc:
            raise ChainError(f"engine chain {text!r}: not a JSON list ({exc})") from None
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ChainError(f"engine chain {text!r}: a JSON list of strings, please")
    else:
        items = text.split(",")
    specs = [EngineSpec(i.strip()) for i in items if i.strip()]
    if not specs:
        raise ChainError("engine chain is empty: name at least one engine (e.g. tiny.en)")
    for spec in specs:
        if spec.remote and not spec.url.startswith(("http://", "https://")):
            raise ChainError(f"engine {spec.text!r}: openai: needs an http(s) URL")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ChainError(f"engine chain {text!r} names an engine twice")
    return specs


# --- fault injection (drills) ----------------------------------------------------


@dataclass(frozen=True)
class FaultPlan:
    """Which calls of one engine fail: among calls numbered `after` <= n < `until`
    (0: no end), a seeded fraction `hang` hangs for `hang_s` and `error` raises."""

    error: float = 0.0
    hang: float = 0.0
    hang_s: float = 3600.0
    after: int = 0
    until: int = 0
    seed: int = 0


_FAULT_KEYS = {"error", "hang", "hang_s", "after", "until", "seed", "fail-after", "hang-after"}


def parse_faults(text: str) -> dict[str, FaultPlan]:
    """`base:hang=0.5,error=0.1;tiny.en:hang-after=3` -> {engine: plan}. Keys: `error`,
    `hang` (fractions of calls), `hang_s`, `after`, `until` (call numbers), `seed`;
    `fail-after=N` / `hang-after=N`: every call from the N-th fails / hangs."""
    plans: dict[str, FaultPlan] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        target, _, params = part.rpartition(":")
        if not target or not params:
            raise ChainError(f"faults {part!r}: write ENGINE:key=value,... (e.g. base:hang=0.5)")
        values: dict[str, float] = {}
        for pair in params.split(","):
            key, eq, value = pair.strip().partition("=")
            if not eq or key not in _FAULT_KEYS:
                keys = ", ".join(sorted(_FAULT_KEYS))
                raise ChainError(f"faults {part!r}: unknown {pair!r} (keys: {keys})")
            try:
                values[key] = float(value)
            except ValueError:
                raise ChainError(f"faults {part!r}: {key} is not a number") from None
        if "fail-after" in values:
            values.update(error=1.0, after=values.pop("fail-after"))
        if "hang-after" in values:
            values.update(hang=1.0, after=values.pop("hang-after"))
        plan = FaultPlan(
            error=values.get("error", 0.0),
            hang=values.get("hang", 0.0),
            hang_s=values.get("hang_s", FaultPlan.hang_s),
            after=int(values.get("after", 0)),
            until=int(values.get("until", 0)),
            seed=int(values.get("seed", 0)),
        )
        if not (0 <= plan.error <= 1 and 0 <= plan.hang <= 1 and plan.error + plan.hang <= 1):
            raise ChainError(f"faults {part!r}: error and hang are fractions summing to <= 1")
        plans[EngineSpec(target.strip()).name] = plan
    return plans


class FaultyEngine:
    """A drill: wraps an engine and fails or hangs the calls its `FaultPlan` picks."""

    def __init__(self, inner: Engine, plan: FaultPlan) -> None:
        self.inner = inner
        self.name = inner.name
        self.plan = plan
        self.calls = 0
        self._rng = random.Random(plan.seed)
        self._lock = threading.Lock()
        self._released = threading.Event()  # set on close: hung calls return

    def __getattr__(self, name: str) -> object:  # what the engine says of itself
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def fault(self) -> str:
        """The next call's fate, "ok", "hang" or "error" (seeded, numbered)."""
        with self._lock:
            n, self.calls = self.calls, self.calls + 1
            draw = self._rng.random()
        p = self.plan
        if n < p.after or (p.until and n >= p.until):
            return "ok"
        if draw < p.hang:
            log.warning("fault drill: call %d of %s hangs", n, self.name)
            return "hang"
        if draw < p.hang + p.error:
            log.warning("fault drill: call %d of %s fails", n, self.name)
            return "error"
        return "ok"

    def transcribe(self, segment: Segment) -> Transcription:
        what = self.fault()
        if what == "hang" and self._released.wait(self.plan.hang_s):
            raise RetryableEngineError(f"fault drill: {self.name} released (engine closed)")
        if what == "error":
            raise RetryableEngineError(f"fault drill: injected failure of {self.name}")
        return self.inner.transcribe(segment)

    def close(self) -> None:
        self._released.set()


class FaultyAsyncEngine(FaultyEngine):
    def __init__(self, inner: AsyncEngine, plan: FaultPlan) -> None:
        super().__init__(inner, plan)  # type: ignore[arg-type]
        self.async_inner = inner

    async def transcribe_async(self, segment: Segment) -> Transcription:
        what = self.fault()
        if what == "hang":
            await asyncio.sleep(self.plan.hang_s)
        if what == "error":
            raise RetryableEngineError(f"fault drill: injected failure of {self.name}")
        return await self.async_inner.transcribe_async(segment)


def with_faults(engine: AnyEngine, plan: FaultPlan | None) -> AnyEngine:
    if plan is None:
        return engine
    log.warning("fault drill armed on %s: %s", engine.name, plan)
    if isinstance(engine, AsyncEngine):
        return FaultyAsyncEngine(engine, plan)
    return FaultyEngine(engine, plan)


# --- one engine behind its breaker ---------------------------------------------------


class Slot:
    """An engine, its breaker, and its own executor."""

    def __init__(
        self, spec: EngineSpec, engine: AnyEngine, settings: WorkerSettings, metrics: Metrics
    ) -> None:
        self.spec = spec
        self.engine = engine
        self.name = engine.name
        self.settings = settings
        self.metrics = metrics
        self.state = CLOSED
        self.opened_at = 0.0
        self.opens = 0
        self.stuck = 0
        self.last_error = ""
        self.executor = ThreadPoolExecutor(
            max_workers=settings.concurrency + settings.engine_max_stuck + 1,
            thread_name_prefix=f"escapement-{spec.text[:24]}",
        )
        self._attrs = {"engine": self.name}

    @property
    def exhausted(self) -> bool:
        return self.stuck >= self.settings.engine_max_stuck

    def deadline_s(self, segment: Segment) -> float:
        audio_s = max(0, segment.end_ms - segment.start_ms) / 1000
        s = self.settings
        deadline = max(s.engine_deadline_s, s.engine_deadline_factor * audio_s)
        if segment.context_pcm:  # left context: a longer forced prefix, maybe a retry
            deadline += s.engine_deadline_s / 2
        return deadline

    async def call(
        self, segment: Segment, last: bool = False, alone: bool = False
    ) -> Transcription:
        """The engine on `segment`, bounded by its deadline (raises `EngineDeadline`);
        `last`: no engine is left after this one (`LAST_RESORT_SCALE`); `alone`: the
        chain has no other engine, so no deadline at all (the lease is kept alive
        meanwhile, and a slow but working decode is not thrown away)."""
        if alone and not isinstance(self.engine, AsyncEngine):
            return await asyncio.wrap_future(self.executor.submit(self.engine.transcribe, segment))
        deadline = self.deadline_s(segment) * (LAST_RESORT_SCALE if last else 1.0)
        if isinstance(self.engine, AsyncEngine):
            try:
                async with asyncio.timeout(deadline):
                    return await self.engine.transcribe_async(segment)
            except TimeoutError:
                raise EngineDeadline(f"{self.name} took over {deadline:g} s") from None
        loop = asyncio.get_running_loop()
        future = asyncio.wrap_future(self.executor.submit(self.engine.transcribe, segment))
        try:
            return await asyncio.wait_for(asyncio.shield(future), deadline)
        except TimeoutError:
            self._abandon(future, loop.time())
            raise EngineDeadline(f"{self.name} took over {deadline:g} s") from None
        except asyncio.CancelledError:
            self._abandon(future, loop.time())  # shutting down: the thread runs on
            raise

    @property
    def batches(self) -> bool:
        """Whether the engine decodes several segments in one call (`transcribe_batch`).
        Looked up on its class: a fault drill's wrapper does not batch, so every call
        goes through its faults."""
        return callable(getattr(type(self.engine), "transcribe_batch", None))

    async def call_batch(
        self, segments: list[Segment], last: bool = False
    ) -> list[Transcription | EngineError]:
        """`transcribe_batch` on the engine's executor, bounded by one deadline for all:
        `max(engine_deadline_s, engine_deadline_factor x their audio seconds)`."""
        audio_s = sum(max(0, s.end_ms - s.start_ms) for s in segments) / 1000
        st = self.settings
        deadline = max(st.engine_deadline_s, st.engine_deadline_factor * audio_s)
        deadline *= LAST_RESORT_SCALE if last else 1.0
        loop = asyncio.get_running_loop()
        batch = self.engine.transcribe_batch  # type: ignore[union-attr]
        future = asyncio.wrap_future(self.executor.submit(batch, segments))
        try:
            return await asyncio.wait_for(asyncio.shield(future), deadline)  # type: ignore[no-any-return]
        except TimeoutError:
            self._abandon(future, loop.time())  # type: ignore[arg-type]
            raise EngineDeadline(f"{self.name} took over {deadline:g} s") from None
        except asyncio.CancelledError:
            self._abandon(future, loop.time())  # type: ignore[arg-type]
            raise

    def _abandon(self, future: asyncio.Future[Transcription], since: float) -> None:
        if future.done():
            return
        self.stuck += 1
        self.metrics.engine_stuck.add(1, self._attrs)
        if self.exhausted:
            log.error(
                "engine %s holds %d stuck call(s): it takes no more until one returns "
                "(swap the chain, or restart this worker)", self.name, self.stuck,
            )  # fmt: skip

        def returned(f: asyncio.Future[Transcription]) -> None:
            self.stuck -= 1
            self.metrics.engine_stuck.add(-1, self._attrs)
            outcome = "was cancelled" if f.cancelled() else repr(f.exception() or "a result")
            log.info(
                "engine %s: a call abandoned at its deadline returned after %.1f s (%s, dropped)",
                self.name, asyncio.get_running_loop().time() - since, outcome,
            )  # fmt: skip

        future.add_done_callback(returned)

    def trip(self, exc: BaseException) -> bool:
        """Open the breaker (a failed call or probe); True if it was closed."""
        self.last_error = f"{type(exc).__name__}: {exc}"
        was_closed = self.state == CLOSED
        self.state, self.opened_at = OPEN, time.monotonic()
        self.opens += 1
        reason = "deadline" if isinstance(exc, EngineDeadline) else "error"
        self.metrics.engine_breaker_opens.add(1, {**self._attrs, "reason": reason})
        if was_closed:
            self.metrics.engine_breaker_open.add(1, self._attrs)
        log.warning(
            "engine %s: breaker open (%s); probing again in %g s",
            self.name, self.last_error, self.settings.breaker_cooldown_s,
        )  # fmt: skip
        return was_closed

    def reset(self) -> None:
        if self.state != CLOSED:
            self.state = CLOSED
            self.metrics.engine_breaker_open.add(-1, self._attrs)
            log.info("engine %s: breaker closed (probe succeeded)", self.name)

    def view(self) -> dict[str, object]:
        return {
            "engine": self.name,
            "spec": self.spec.text,
            "breaker": self.state,
            "opens": self.opens,
            "stuck": self.stuck,
            "last_error": self.last_error,
        }

    async def close(self) -> None:
        if self.state != CLOSED:
            self.metrics.engine_breaker_open.add(-1, self._attrs)
            self.state = CLOSED
        closer = getattr(self.engine, "close", None)
        if closer is not None:
            closer()
        aclose = getattr(self.engine, "aclose", None)
        if aclose is None and isinstance(self.engine, FaultyAsyncEngine):
            aclose = getattr(self.engine.async_inner, "aclose", None)
        if aclose is not None:
            await aclose()
        self.executor.shutdown(wait=False, cancel_futures=True)


# --- the chain -----------------------------------------------------------------------


class EngineChain:
    """Engines in order of preference; `transcribe` answers with the first that can."""

    def __init__(self, slots: Sequence[Slot], settings: WorkerSettings) -> None:
        self.slots = list(slots)
        self.settings = settings
        self.active = 0  # calls in progress on this chain
        self._idle = asyncio.Event()
        self._idle.set()
        self._probes: dict[str, asyncio.Task[None]] = {}
        self._last_good: Segment | None = None

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.slots]

    def order(self) -> list[Slot]:
        """Closed breakers first; then, as a last resort, open ones; never an exhausted one."""
        usable = [s for s in self.slots if not s.exhausted]
        return [s for s in usable if s.state == CLOSED] + [s for s in usable if s.state != CLOSED]

    async def transcribe(self, segment: Segment) -> tuple[Transcription, str]:
        """(transcription, the engine that made it). Raises the last engine's error if
        every engine failed: a `PoisonSegment` only if every one said so."""
        self.active += 1
        self._idle.clear()
        try:
            return await self._transcribe(segment)
        finally:
            self.active -= 1
            if not self.active:
                self._idle.set()

    async def _transcribe(self, segment: Segment) -> tuple[Transcription, str]:
        order = self.order()
        if not order:
            raise EnginesStuck("every engine holds stuck calls; none can take the segment")
        failure: Exception | None = None
        poison: PoisonSegment | None = None
        for i, slot in enumerate(order):
            try:
                transcription = await slot.call(
                    segment, last=i == len(order) - 1, alone=len(self.slots) == 1
                )
            except PoisonSegment as exc:  # the segment's fault, not the engine's
                poison = exc
                continue
            except Exception as exc:  # noqa: BLE001 - any engine failure moves to the next
                failure = exc
                if slot.state == CLOSED and slot.trip(exc):
                    self._probe_later(slot)
                nxt = order[i + 1].name if i + 1 < len(order) else None
                if nxt:
                    slot.metrics.engine_fallbacks.add(1, {"engine": slot.name})
                log.warning(
                    "segment %s:%d: %s failed (%s); %s",
                    segment.session_id, segment.segment, slot.name, exc,
                    f"trying {nxt}" if nxt else "no engine left",
                )  # fmt: skip
                continue
            if slot.state != CLOSED:  # a last-resort call to an open engine worked
                slot.reset()
            self._last_good = segment
            return transcription, slot.name
        if failure is not None:
            raise failure
        assert poison is not None
        raise poison

    async def transcribe_batch(
        self, segments: list[Segment]
    ) -> list[tuple[Transcription, str] | Exception]:
        """`transcribe` of each segment, in order, each an answer or the error it ended
        with. The first usable engine decodes them in one call when it can batch and its
        breaker is closed; otherwise, and for any segment the batch did not answer, each
        goes through `transcribe` on its own. A failed batch call opens the breaker as a
        failed single call does."""
        self.active += 1
        self._idle.clear()
        try:
            return await self._transcribe_batch(segments)
        finally:
            self.active -= 1
            if not self.active:
                self._idle.set()

    async def _transcribe_batch(
        self, segments: list[Segment]
    ) -> list[tuple[Transcription, str] | Exception]:
        order = self.order()
        out: list[tuple[Transcription, str] | Exception | None] = [None] * len(segments)
        if len(segments) > 1 and order and order[0].state == CLOSED and order[0].batches:
            slot = order[0]
            try:
                answers = await slot.call_batch(segments, last=len(order) == 1)
            except Exception as exc:  # noqa: BLE001 - as a failed single call: next engine
                if slot.trip(exc):
                    self._probe_later(slot)
                log.warning(
                    "a batch of %d segments: %s failed (%s); each on its own",
                    len(segments), slot.name, exc,
                )  # fmt: skip
            else:
                for k, answer in enumerate(answers):
                    if isinstance(answer, Transcription):
                        out[k] = (answer, slot.name)
                        self._last_good = segments[k]
        alone = [k for k, o in enumerate(out) if o is None]
        done = await asyncio.gather(
            *(self._transcribe(segments[k]) for k in alone), return_exceptions=True
        )
        for k, o in zip(alone, done, strict=True):
            if isinstance(o, BaseException) and not isinstance(o, Exception):
                raise o  # cancelled: shutting down
            out[k] = o
        return out  # type: ignore[return-value]

    def _probe_later(self, slot: Slot) -> None:
        running = self._probes.get(slot.name)
        if running is not None and not running.done():
            return
        task = asyncio.create_task(self._probe(slot), name=f"probe {slot.name}")
        self._probes[slot.name] = task

    async def _probe(self, slot: Slot) -> None:
        """Half-open probes until the breaker closes (or the chain is closed)."""
        while slot.state != CLOSED:
            await asyncio.sleep(self.settings.breaker_cooldown_s)
            if slot.state == CLOSED:
                return  # a last-resort call already closed it
            if slot.exhausted or self._last_good is None:
                continue  # nothing to probe with yet, or no thread to probe on
            slot.state = HALF_OPEN
            try:
                await slot.call(self._last_good)
            except EngineError as exc:
                if isinstance(exc, PoisonSegment):
                    slot.reset()  # it answered: the engine works
                    return
                slot.trip(exc)
                continue
            except Exception as exc:  # noqa: BLE001 - a failed probe reopens the breaker
                slot.trip(exc)
                continue
            slot.reset()

    def hand_over(self, slots: Iterable[Slot]) -> None:
        """`slots` moved to a new chain, which probes them from now on."""
        for slot in slots:
            task = self._probes.pop(slot.name, None)
            if task is not None:
                task.cancel()

    def resume_probes(self) -> None:
        for slot in self.slots:
            if slot.state != CLOSED:
                self._probe_later(slot)

    def view(self) -> list[dict[str, object]]:
        return [s.view() for s in self.slots]

    async def drained(self) -> None:
        await self._idle.wait()

    async def close(self, keep: Iterable[Slot] = ()) -> None:
        """Stop probing and close every slot not in `keep` (they moved to a new chain)."""
        kept = {id(s) for s in keep}
        for task in self._probes.values():
            task.cancel()
        for task in self._probes.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._probes.clear()
        for slot in self.slots:
            if id(slot) not in kept:
                await slot.close()


# --- building a chain -------------------------------------------------------------


Builder = Callable[[EngineSpec], AnyEngine]


def default_builder(settings: WorkerSettings) -> Builder:
    """Engines as `settings` configures them: local models found by `resolve_model`,
    remote ones with the `remote_*` settings. Blocking (it loads models)."""

    def build(spec: EngineSpec) -> AnyEngine:
        if spec.remote:
            from services.worker.remote import OpenAIEngine

            return OpenAIEngine(
                spec.url,
                name=spec.name,
                api_key=settings.remote_api_key,
                model=settings.remote_model,
                timeout_s=settings.remote_timeout_s,
            )
        from services.worker.engines import WhisperEngine
        from services.worker.models import resolve_model

        return WhisperEngine(
            resolve_model(spec.text),
            device=settings.device,
            compute_type=settings.compute_type,
            cpu_threads=settings.cpu_threads,
            encoder_threads=settings.encoder_threads,
            board=board_at(settings.decode_board),
            beam_size=settings.beam_size,
            name=spec.name,
        )

    return build


async def build_chain(
    specs: Sequence[EngineSpec],
    build: Builder,
    settings: WorkerSettings,
    metrics: Metrics,
    reuse: EngineChain | None = None,
) -> tuple[EngineChain, list[Slot]]:
    """A chain of `specs`, reusing `reuse`'s healthy slots of the same engine (no
    reload, breaker kept); the reused slots are returned too. Models load off the loop.
    Raises `ModelNotFound` (services.worker.models) for an unknown model."""
    faults = parse_faults(settings.faults) if settings.faults else {}
    old = {s.name: s for s in reuse.slots if not s.exhausted} if reuse else {}
    slots: list[Slot] = []
    reused: list[Slot] = []
    try:
        for spec in specs:
            if spec.name in old:
                slots.append(old[spec.name])
                reused.append(old[spec.name])
                continue
            engine = await asyncio.to_thread(build, spec)
            engine = with_faults(engine, faults.get(spec.name))
            slots.append(Slot(spec, engine, settings, metrics))
    except BaseException:
        for slot in slots:
            if slot not in reused:
                await slot.close()
        raise
    chain = EngineChain(slots, settings)
    if reuse is not None:
        reuse.hand_over(reused)
    chain.resume_probes()
    return chain, reused
