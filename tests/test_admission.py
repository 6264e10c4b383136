"""Admission, auth and limits at the edge: refused up front, with a reason, fast."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import pytest
from nats.aio.client import Client as NATS

from jetstream import subjects
from schemas import device as ev
from schemas.pipeline import Segment, encode_segment
from services.cli.client import Refused, stream_audio
from services.edge.app import admission_key
from services.edge.auth import hash_key, mint_resume_token, mint_token
from tests.support import RunningEdge, active_sessions, run_edge, run_worker, until

SECRET = "test-secret-0123456789abcdef"


async def refusal(
    http: aiohttp.ClientSession, url: str, **kw: object
) -> tuple[int, str, str | None, float]:
    """(status, reason, Retry-After, seconds taken) of a refused upgrade."""
    started = time.perf_counter()
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await http.ws_connect(url, **kw)  # type: ignore[arg-type]
    took = time.perf_counter() - started
    headers = caught.value.headers or {}
    return caught.value.status, headers.get(ev.REASON_HEADER, ""), headers.get("Retry-After"), took


def acme_edge(nats_url: str, key: str, **overrides: object):  # type: ignore[no-untyped-def]
    """An edge with auth on, no worker needed, and `key` as tenant acme's API key."""
    return run_edge(
        nats_url,
        require_workers=False,
        auth_enabled=True,
        auth_secret=SECRET,
        api_keys=f"acme:{hash_key(key)}",
        **overrides,
    )


async def sessions_below(http: aiohttp.ClientSession, edge: RunningEdge, n: int) -> bool:
    return await active_sessions(http, edge) < n


async def admitted(http: aiohttp.ClientSession, url: str, **kw: object) -> ev.SessionStarted:
    async with http.ws_connect(url, **kw) as ws:  # type: ignore[arg-type]
        event = ev.decode_event((await ws.receive(timeout=5)).data)
        assert isinstance(event, ev.SessionStarted)
        return event


async def test_no_workers_means_503_no_workers(nats_server, nc: NATS, http) -> None:  # type: ignore[no-untyped-def]
    async with run_edge(nats_server.url, require_workers=True) as edge:
        status, reason, retry, took = await refusal(http, f"{edge.url}/v1/stream")
    assert (status, reason) == (503, "no_workers")
    assert retry is not None and float(retry) >= 1
    assert took < 0.5


async def test_backlog_over_high_water_refuses_until_below_low_water(
    nats_server, nc: NATS, engine, http
) -> None:  # type: ignore[no-untyped-def]
    js = nc.jetstream()
    async with run_edge(
        nats_server.url,
        require_workers=False,
        backlog_high_per_worker=6,
        backlog_low_per_worker=2,
    ) as edge:
        url = f"{edge.url}/v1/stream"
        await admitted(http, url)
        # the queue fills (no worker is running): 8 queued segments >= 6
        for n in range(8):
            seg = Segment(
                session_id="filler", edge_id="nowhere", segment=n, start_ms=0, end_ms=500,
                sample_rate=16000, pcm=bytes(16000),
            )  # fmt: skip
            await js.publish(
                subjects.segments_subject("nowhere", "filler"),
                encode_segment(seg),
                headers={subjects.Header.MSG_ID: subjects.segment_msg_id("filler", n)},
            )
        admission = edge.app[admission_key]
        await until(lambda: admission.full, 5, "admission sees the backlog")
        timings = []
        for _ in range(5):
            status, reason, retry, took = await refusal(http, url)
            assert (status, reason) == (503, "queue_full")
            assert retry is not None
            timings.append(took)
        assert sorted(timings)[2] < 0.05, timings  # median refusal well under 50 ms
        # a worker drains the backlog; below the low-water mark sessions are admitted again
        async with run_worker(nats_server.url, engine):
            await until(lambda: not admission.full, 30, "backlog below the low-water mark")
            await admitted(http, url)
        async with http.get(f"{edge.url}/v1/stats") as r:
            stats = await r.json()
        assert stats["sessions"]["refused"]["queue_full"] == 5


async def test_auth_cases(nats_server, nc: NATS, http, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    key = "device-key-for-tests-0123456789"
    async with acme_edge(nats_server.url, key) as edge:
        url = f"{edge.url}/v1/stream"
        assert (await refusal(http, url))[:2] == (401, "missing_credentials")
        bad = {"Authorization": "Bearer nope"}
        assert (await refusal(http, url, headers=bad))[:2] == (401, "invalid_credentials")
        expired = mint_token(SECRET.encode(), "acme", ttl_s=60, now=time.time() - 120)
        assert (await refusal(http, f"{url}?token={expired}"))[:2] == (401, "expired_token")
        forged = mint_token(b"another-secret-0123456789", "acme", ttl_s=60)
        assert (await refusal(http, f"{url}?token={forged}"))[:2] == (401, "invalid_credentials")
        # a resume token is not a device credential
        resume = mint_resume_token(SECRET.encode(), "acme", "someSession", 60)
        assert (await refusal(http, f"{url}?token={resume}"))[:2] == (401, "invalid_credentials")

        await admitted(http, url, headers={"Authorization": f"Bearer {key}"})
        token = mint_token(SECRET.encode(), "acme", ttl_s=60)
        started = await admitted(http, f"{url}?token={token}")
        assert started.session_id
        async with http.get(f"{edge.url}/v1/stats") as r:
            stats = await r.json()
        assert stats["sessions"]["refused"] == {
            "missing_credentials": 1,
            "invalid_credentials": 3,
            "expired_token": 1,
        }
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "/v1/stream" in logged  # the access log is on ...
    assert (
        key not in logged and token not in logged and expired not in logged
    )  # ... secrets are not


@pytest.mark.parametrize("allowed", ["", "globex", "acme", "*"])
async def test_pace_fast_is_a_tenant_permission(nats_server, nc: NATS, http, allowed: str) -> None:  # type: ignore[no-untyped-def]
    """Audio faster than real time (file uploads) only for tenants the operator lists."""
    key = "device-key-for-tests-0123456789"
    async with acme_edge(nats_server.url, key, fast_pace_tenants=allowed) as edge:
        url = f"{edge.url}/v1/stream"
        auth = {"Authorization": f"Bearer {key}"}
        await admitted(http, url, headers=auth)  # real time: always
        if allowed in ("acme", "*"):
            await admitted(http, f"{url}?pace=fast", headers=auth)
        else:
            status, reason, *_ = await refusal(http, f"{url}?pace=fast", headers=auth)
            assert (status, reason) == (403, "pace_not_allowed")


async def test_connection_limits(nats_server, nc: NATS, http) -> None:  # type: ignore[no-untyped-def]
    async with run_edge(
        nats_server.url, require_workers=False, max_connections=3, max_connections_per_tenant=2
    ) as edge:
        url = f"{edge.url}/v1/stream"
        a = await http.ws_connect(url)
        b = await http.ws_connect(url)
        status, reason, retry, _ = await refusal(http, url)
        assert (status, reason) == (429, "tenant_quota") and retry  # the tenant's cap
        async with http.get(url) as r:
            assert await r.json() == {
                "reason": "tenant_quota",
                "quota": "sessions",
                "limit": 2,
                "used": 2,
                "message": "tenant default holds 2 of its 2 sessions on this edge",
                "retry_after": 5,
            }
        await a.close()
        await until(lambda: sessions_below(http, edge, 2), 5, "the edge sees the close")
        c = await http.ws_connect(url)  # a slot came free
        await b.close()
        await c.close()
    # a tenant's own quota replaces the default cap; the edge's limit stays
    async with run_edge(
        nats_server.url,
        require_workers=False,
        max_connections=3,
        max_connections_per_tenant=2,
        tenant_quotas="default:sessions=5",
    ) as edge:
        url = f"{edge.url}/v1/stream"
        held = [await http.ws_connect(url) for _ in range(3)]
        assert (await refusal(http, url))[:2] == (503, "too_many_connections")
        for ws in held:
            await ws.close()


async def test_half_open_handshakes_are_closed(nats_server, nc: NATS, http) -> None:  # type: ignore[no-untyped-def]
    async with run_edge(nats_server.url, require_workers=False, handshake_timeout_s=0.5) as edge:
        port = edge.settings.port
        conns = []
        for partial in (b"", b"GET /v1/stream HTTP/1.1\r\nHost: x\r\n"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(partial)
            await writer.drain()
            conns.append((reader, writer))
        started = time.monotonic()
        for reader, writer in conns:
            assert await asyncio.wait_for(reader.read(), timeout=5) == b""  # closed by the edge
            writer.close()
        assert time.monotonic() - started < 3
        await admitted(http, f"{edge.url}/v1/stream")  # and the edge still serves


async def test_faster_than_real_time_is_throttled_unless_fast(
    nats_server, nc: NATS, http, make_test_speech
) -> None:  # type: ignore[no-untyped-def]
    speech = make_test_speech(["please turn on the lights in the kitchen"] * 3, gap_s=1.0)
    async with run_edge(
        nats_server.url, require_workers=False, max_audio_rate=2.0, audio_burst_s=1.0
    ) as edge:

        async def last_speech_end(query: str) -> float:
            async with http.ws_connect(f"{edge.url}/v1/stream?{query}") as ws:
                started = time.monotonic()
                for i in range(0, len(speech.pcm), 32000):
                    await ws.send_bytes(speech.pcm[i : i + 32000])
                seen = 0
                while seen < 3:
                    event = ev.decode_event((await ws.receive(timeout=30)).data)
                    if isinstance(event, ev.SpeechEnded) and event.segment is not None:
                        seen += 1
                return time.monotonic() - started

        fast = await last_speech_end("pace=fast")
        paced = await last_speech_end("pace=realtime")
    # the third utterance ends ~10 s into the audio: at 2x with a 1 s burst, >= ~4.5 s
    assert paced >= 4.0 > fast, (paced, fast)


async def test_fast_upload_still_transcribes(
    nats_server, nc: NATS, engine, http, make_test_speech
) -> None:  # type: ignore[no-untyped-def]
    speech = make_test_speech(["set a timer for ten minutes"])
    async with run_worker(nats_server.url, engine), run_edge(nats_server.url) as edge:
        run = await stream_audio(http, edge.url, speech.pcm, 16000, realtime=False)
    assert run.close_code == 1000 and run.finals


async def test_refused_client_sees_reason(nats_server, nc: NATS, http) -> None:  # type: ignore[no-untyped-def]
    async with run_edge(nats_server.url, require_workers=True) as edge:
        with pytest.raises(Refused) as caught:
            await stream_audio(http, edge.url, bytes(3200), 16000)
    assert caught.value.status == 503 and caught.value.reason == "no_workers"
    assert caught.value.retry_after and caught.value.retry_after >= 1


async def test_queue_refusing_a_segment_tells_the_device_which(
    nats_server, nc: NATS, http, make_test_speech
) -> None:  # type: ignore[no-untyped-def]
    """JetStream's own limit (discard: new) refuses; the device hears Overloaded for that segment."""
    js = nc.jetstream()
    speech = make_test_speech(
        ["please turn on the lights", "set a timer", "play some music", "add milk to my list"],
        gap_s=0.8,
    )
    async with run_edge(nats_server.url, require_workers=False, close_wait_s=1.0) as edge:
        info = await js.stream_info(subjects.STREAM_SEGMENTS)  # (the edge applied the defaults)
        info.config.max_msgs = 2
        await js.update_stream(info.config)
        run = await stream_audio(http, edge.url, speech.pcm, 16000, realtime=False)
    overloaded = [r.event.segment for r in run.of_type(ev.Overloaded)]
    ended = [r.event.segment for r in run.of_type(ev.SpeechEnded) if r.event.segment is not None]
    assert len(ended) == 4
    assert overloaded == ended[2:], (overloaded, ended)
    assert run.close_code == 1000  # the session itself goes on


async def test_sessions_are_admitted_by_the_workers_measured_decode_rate(
    nats_server, nc: NATS, engine, http, make_test_speech
) -> None:  # type: ignore[no-untyped-def]
    """A worker says how fast it decodes (its discovery metadata); the edge admits
    sessions while their expected load fits that rate, and refuses the next up front."""
    speech = make_test_speech(["please turn on the lights in the kitchen"])
    async with run_worker(nats_server.url, engine) as worker:
        async with run_edge(nats_server.url) as plain:  # one decode gives the worker a rate
            run = await stream_audio(http, plain.url, speech.pcm, speech.sample_rate)
        assert run.finals and worker.decode_rate() > 0
        rate = round(worker.decode_rate(), 3)
        # each session expected to need 40 % of the worker's rate, all of which may be used
        async with run_edge(
            nats_server.url, session_load=rate / 2.5, decode_utilisation=1.0
        ) as edge:
            admission = edge.app[admission_key]
            await until(lambda: admission.decode_rates == [rate], 10, "the edge hears the rate")
            url = f"{edge.url}/v1/stream"
            held = [await http.ws_connect(url), await http.ws_connect(url)]
            status, reason, retry, _ = await refusal(http, url)
            assert (status, reason) == (503, "at_capacity") and retry
            assert admission.session_cap() == (2, f"the workers decode {rate:.1f} audio s/s")
            for ws in held:
                await ws.close()


async def test_sessions_per_worker_cap_refuses_before_a_backlog(
    nats_server, nc: NATS, engine, http
) -> None:  # type: ignore[no-untyped-def]
    async with (
        run_worker(nats_server.url, engine),
        run_edge(nats_server.url, max_sessions_per_worker=2) as edge,
    ):
        url = f"{edge.url}/v1/stream"
        held = [await http.ws_connect(url), await http.ws_connect(url)]
        status, reason, retry, took = await refusal(http, url)
        assert (status, reason) == (503, "at_capacity") and retry
        await held[0].close()
        await until(lambda: sessions_below(http, edge, 2), 5, "the edge sees the close")
        await admitted(http, url)  # room again
        await held[1].close()


async def test_the_accuracy_benchmark_waits_for_admission_instead_of_skipping_a_file(
    nats_server, nc: NATS, engine, make_test_speech
) -> None:  # type: ignore[no-untyped-def]
    """`loadtest.accuracy` streams more files at once than the edge admits (the base
    model on a slow host): the file refused `at_capacity` comes back after Retry-After,
    as a device would, and is measured like the others; with no wait it is reported
    refused, as before."""
    from loadtest import accuracy
    from loadtest.corpus import Item
    from loadtest.device import SessionOptions
    from loadtest.progress import Live
    from loadtest.workload import http_session

    speech = make_test_speech(["turn on the kitchen lights"])
    entries = [
        accuracy.Entry(Item(f"lights-{k}", speech.pcm, speech.sample_rate, speech.text), "espeak")
        for k in range(2)
    ]
    async with (
        run_worker(nats_server.url, engine),
        run_edge(nats_server.url, max_sessions_per_worker=1) as edge,
        http_session() as http,
    ):
        opts = SessionOptions(url=edge.url, interim_results=False)
        quiet = Live(enabled=False)
        runs = await accuracy.stream_all(http, entries, opts, 2, quiet, admission_wait_s=60)
        assert [r.outcome for r in runs] == ["completed", "completed"], [r.reason for r in runs]
        assert sorted(r.refusals for r in runs)[0] == 0 and max(r.refusals for r in runs) >= 1
        assert all("kitchen" in r.text.lower() for r in runs), [r.text for r in runs]
        runs = await accuracy.stream_all(http, entries, opts, 2, quiet)
        assert sorted(r.outcome for r in runs) == ["completed", "refused"]
        assert [r.reason for r in runs if r.outcome == "refused"] == ["at_capacity"]
