"""`Delivery` against a real nats-server: a lapsed lease answers nothing, a kept-alive
one outlives ack_wait.

Each test queues on a stream and consumer of its own, with a 1 s ack_wait, and
watches the acknowledgement subjects to see what actually reached the server.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, StorageType

from services.worker.delivery import Delivery, Lease

STREAM = "DELIVERY_TEST"
SUBJECT = "delivery.test"
CONSUMER = "holders"
ACK_WAIT_S = 1.0
MARGIN_S = 0.3
ACK = b""  # what nats-py sends for an ack (the server reads it as +ACK)


async def queue(js: JetStreamContext) -> None:
    await js.add_stream(name=STREAM, subjects=[SUBJECT], storage=StorageType.MEMORY)
    await js.add_consumer(
        STREAM,
        ConsumerConfig(
            durable_name=CONSUMER,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ACK_WAIT_S,
            max_deliver=5,
        ),
    )


async def holder(js: JetStreamContext) -> JetStreamContext.PullSubscription:
    """One worker's pull subscription on the shared consumer."""
    return await js.pull_subscribe_bind(CONSUMER, stream=STREAM)


class AckSpy:
    """Every ack, nak, term and +WPI any holder sends for the consumer (an ack is b"")."""

    def __init__(self, nc: NATS, sub: Subscription) -> None:
        self.nc = nc
        self.sub = sub
        self.sent: list[bytes] = []

    @classmethod
    async def on(cls, nc: NATS) -> AckSpy:
        sub = await nc.subscribe(f"$JS.ACK.{STREAM}.{CONSUMER}.>")
        await nc.flush()
        return cls(nc, sub)

    async def seen(self) -> list[bytes]:
        """All sent so far: after the flush, they wait in the subscription's queue."""
        await self.nc.flush()
        while True:
            try:
                msg = await self.sub.next_msg(timeout=0.05)
            except NatsTimeoutError:
                return self.sent
            self.sent.append(msg.data)


async def fetch_one(
    nc: NATS,
    psub: JetStreamContext.PullSubscription,
    lapses: list[int] | None = None,
    within: float = 5.0,
) -> Delivery:
    asked = time.monotonic()  # as the worker counts it: from before the fetch
    [msg] = await psub.fetch(1, timeout=within)
    on_lapsed = (lambda: lapses.append(1)) if lapses is not None else None
    return Delivery(msg, Lease(asked, ACK_WAIT_S, MARGIN_S), nc, on_lapsed=on_lapsed)


async def test_a_lapsed_delivery_answers_nothing_and_goes_to_the_next_holder(
    nc: NATS, caplog: pytest.LogCaptureFixture
) -> None:
    js = nc.jetstream()
    await queue(js)
    spy = await AckSpy.on(nc)
    await js.publish(SUBJECT, b"segment")
    lapses: list[int] = []
    first = await fetch_one(nc, await holder(js), lapses)
    assert (first.num_delivered, first.subject, first.data) == (1, SUBJECT, b"segment")
    assert first.held()

    # ACK_WAIT_S - MARGIN_S after the fetch began; the server waits a little longer
    await asyncio.sleep(first.lease.expires - MARGIN_S - time.monotonic() + 0.05)
    assert not first.held()
    with caplog.at_level(logging.WARNING, logger="services.worker.delivery"):
        assert await first.in_progress() is False
        assert await first.ack() is False
        assert await first.nak(0.1) is False
        assert await first.term() is False
    seen = await spy.seen()
    assert seen == [], "a refused answer reached the server"
    assert lapses == [1], "one lapse per delivery, however often it is refused"
    assert caplog.text.count("lease may have lapsed") == 4

    # Nothing answered it, so once ack_wait is up the server hands it to another holder.
    second = await fetch_one(nc, await holder(js), within=5.0)
    assert (second.seq, second.num_delivered) == (first.seq, 2)
    assert await second.ack() is True
    seen = await spy.seen()
    assert seen == [ACK]
    info = await js.consumer_info(STREAM, CONSUMER)
    assert (info.num_ack_pending, info.num_pending) == (0, 0)


async def test_kept_alive_holds_the_lease_past_ack_wait(nc: NATS) -> None:
    js = nc.jetstream()
    await queue(js)
    spy = await AckSpy.on(nc)
    await js.publish(SUBJECT, b"segment")
    lapses: list[int] = []
    delivery = await fetch_one(nc, await holder(js), lapses)
    other = await holder(js)

    async with delivery.kept_alive(every=0.25):
        # 2.5 times ack_wait: without the keep-alive it would be redelivered here
        with pytest.raises(NatsTimeoutError):
            await other.fetch(1, timeout=2.5 * ACK_WAIT_S)
        assert delivery.held()
    assert delivery.lease.expires > time.monotonic() + MARGIN_S
    assert await delivery.ack() is True

    seen = await spy.seen()
    assert seen[-1] == ACK
    assert len(seen) >= 4 and set(seen[:-1]) == {b"+WPI"}, seen
    assert lapses == []
    info = await js.consumer_info(STREAM, CONSUMER)
    assert (info.num_ack_pending, info.num_redelivered) == (0, 0)


async def test_no_in_progress_ack_once_handed_back(nc: NATS) -> None:
    """After a nak the next delivery may be another holder's: a +WPI would renew theirs."""
    js = nc.jetstream()
    await queue(js)
    spy = await AckSpy.on(nc)
    await js.publish(SUBJECT, b"segment")
    delivery = await fetch_one(nc, await holder(js))
    assert await delivery.nak() is True
    assert await delivery.in_progress() is False
    async with delivery.kept_alive(every=0.05):
        await asyncio.sleep(0.3)
    seen = await spy.seen()
    assert seen == [b"-NAK"]
