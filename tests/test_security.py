"""Who may do what: NATS permissions per role, on a real nats-server with the
configuration `escapement up` writes (services/runtime/natsserver.py)."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import nats
import pytest
from nats.aio.client import Client as NATS

from jetstream import subjects
from jetstream.setup import apply_all
from schemas.pipeline import Result, SessionRecord, encode_record, encode_result
from services.cli.client import stream_audio
from services.common.config import from_env
from services.common.natsconn import connect, redact
from services.edge.auth import MAX_TTL_S, Authenticator, mint_token
from services.runtime.natsserver import COMPOSE_PASSWORDS, NatsServer, NatsUsers, server_config
from services.runtime.up import WorkerProcess, private_dir
from services.worker.settings import WorkerSettings
from tests.support import LIGHT_WORKER_ENV, run_edge, until, wer

COMPOSE_NATS_CONF = Path(__file__).parent.parent / "observability" / "nats" / "nats.conf"


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server with the edge, worker and admin users and their permissions."""
    server = NatsServer(tmp_path / "nats", users=NatsUsers.generate())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def admin(secured: NatsServer) -> AsyncIterator[NATS]:
    conn = await connect(secured.url, "test-admin")
    await apply_all(conn.jetstream())
    try:
        yield conn
    finally:
        await conn.close()


class Violations:
    """What the server refused one connection (its async `-ERR`s)."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def __call__(self, exc: Exception) -> None:
        self.seen.append(str(exc).lower())

    def about(self, subject: str) -> bool:
        return any("permissions violation" in s and subject.lower() in s for s in self.seen)


async def as_role(server: NatsServer, role: str, violations: Violations) -> NATS:
    """A client with `role`'s credentials, connected the way the services connect."""
    return await connect(server.url_for(role), f"test-{role}", error_cb=violations)


async def test_no_credentials_no_connection(secured: NatsServer) -> None:
    wrong = secured.url_for("edge").replace("edge:", "edge:x", 1)
    for url in (secured.public_url, wrong):
        client = NATS()
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await client.connect(url, allow_reconnect=False, connect_timeout=2)
        await client.close()  # what the failed connect left open


async def test_a_worker_cannot_read_results_or_session_records(
    secured: NatsServer, admin: NATS
) -> None:
    edge_id, session_id = "edge-1", "sess-1"
    record = SessionRecord(
        session_id=session_id, tenant="acme", edge_id=edge_id, sample_rate=16000, language="en"
    )
    await (await admin.jetstream().key_value(subjects.KV_SESSIONS)).put(
        session_id, encode_record(record)
    )
    refused = Violations()
    worker = await as_role(secured, "worker", refused)
    other_worker = await as_role(secured, "worker", Violations())
    try:
        snooped: list[bytes] = []

        async def snoop(msg) -> None:  # type: ignore[no-untyped-def]
            snooped.append(msg.data)

        await worker.subscribe("asr.results.>", cb=snoop)
        await worker.subscribe("$KV.>", cb=snoop)
        await worker.flush()
        # a real result, published by a worker: stored, but the snooper gets nothing
        result = Result(session_id=session_id, segment=0, text="hello", start_ms=0, end_ms=500)
        ack = await other_worker.jetstream().publish(
            subjects.results_subject(edge_id, session_id), encode_result(result)
        )
        assert ack.stream == subjects.STREAM_TRANSCRIPTS
        kv = await worker.jetstream(timeout=1).key_value(subjects.KV_SESSIONS)
        with pytest.raises(nats.errors.TimeoutError):  # the server drops the request
            await kv.get(session_id)
        with pytest.raises(nats.errors.TimeoutError):
            await worker.jetstream(timeout=1).get_msg(f"KV_{subjects.KV_SESSIONS}", seq=1)
        await asyncio.sleep(0.3)
        assert snooped == []
        assert refused.about("asr.results.>") and refused.about("$kv.>")
        assert refused.about(f"$js.api.direct.get.kv_{subjects.KV_SESSIONS}".lower())
    finally:
        await worker.close()
        await other_worker.close()


@pytest.mark.parametrize("role", ["edge", "admin"])
async def test_only_workers_publish_results(secured: NatsServer, admin: NATS, role: str) -> None:
    refused = Violations()
    forger = await as_role(secured, role, refused)
    try:
        subject = subjects.results_subject("edge-1", "victim")
        forged = Result(session_id="victim", segment=0, text="forged", start_ms=0, end_ms=1)
        await forger.publish(subject, encode_result(forged))
        with pytest.raises(nats.errors.TimeoutError):
            await forger.jetstream(timeout=1).publish(subject, encode_result(forged))
        await forger.flush()
        await asyncio.sleep(0.2)
        assert refused.about(subject)
        info = await admin.jetstream().stream_info(subjects.STREAM_TRANSCRIPTS)
        assert info.state.messages == 0  # nothing forged was stored
    finally:
        await forger.close()


def test_compose_nats_config_is_the_embedded_one() -> None:
    """compose's nats.conf is what `server_config` writes, passwords from the environment."""
    wanted = server_config(COMPOSE_PASSWORDS, raw=True)
    assert COMPOSE_NATS_CONF.read_text() == wanted, (
        "observability/nats/nats.conf is stale: regenerate it with "
        "python -m services.runtime.natsserver --compose-config"
    )


@pytest.mark.slow
async def test_pipeline_transcribes_on_the_secured_server_and_nobody_else_listens(
    secured: NatsServer, admin: NATS, tmp_path: Path, make_test_speech, caplog
) -> None:  # type: ignore[no-untyped-def]
    speech = make_test_speech(["please turn on the lights in the kitchen"])
    env = {**os.environ, "NATS_URL": secured.url_for("worker"), **LIGHT_WORKER_ENV}
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    refused = Violations()
    snooper = await as_role(secured, "worker", refused)
    snooped: list[bytes] = []

    async def snoop(msg) -> None:  # type: ignore[no-untyped-def]
        snooped.append(msg.data)

    try:
        await snooper.subscribe("asr.results.>", cb=snoop)
        await worker.ready(within=90)
        async with run_edge(secured.url_for("edge")) as edge, aiohttp.ClientSession() as http:
            await until(lambda: edge_admits(http, edge.url), 30, "the edge sees the worker")
            run = await stream_audio(http, edge.url, speech.pcm, speech.sample_rate)
        assert run.close_code == 1000, run.close_reason
        assert wer(speech.text, run.text) <= 0.25, run.text
        assert snooped == [] and refused.about("asr.results.>")
        # the edge and the worker had every permission they needed
        edge_refused = [r.message for r in caplog.records if "permissions violation" in r.message]
        assert not [m for m in edge_refused if "test-worker" not in m], edge_refused
        assert "permissions violation" not in worker.log().lower(), worker.log()[-2000:]
    finally:
        await snooper.close()
        await worker.stop(20)


async def edge_admits(http: aiohttp.ClientSession, url: str) -> bool:
    async with http.get(f"{url}/readyz") as r:
        return r.status == 200


async def test_credentials_from_nats_user_and_password(secured: NatsServer, admin: NATS) -> None:
    """compose gives services NATS_USER/NATS_PASSWORD beside a bare NATS_URL."""
    env = {
        "NATS_URL": secured.public_url,
        "NATS_USER": "worker",
        "NATS_PASSWORD": secured.users.passwords["worker"],  # type: ignore[union-attr]
    }
    settings = from_env(WorkerSettings, env)
    refused = Violations()
    conn = await connect(settings.nats_url, "test-env-worker", error_cb=refused)
    try:
        info = await conn.jetstream().consumer_info(
            subjects.STREAM_SEGMENTS, subjects.CONSUMER_WORKERS
        )
        assert info.name == subjects.CONSUMER_WORKERS  # a worker's request, answered
        assert secured.users.passwords["worker"] not in redact(settings.nats_url)  # type: ignore[union-attr]
    finally:
        await conn.close()


def test_secrets_on_disk_are_the_owners_alone(secured: NatsServer, tmp_path: Path) -> None:
    store = secured.store_dir
    assert stat.S_IMODE(store.stat().st_mode) == 0o700
    assert stat.S_IMODE(secured.log_path.stat().st_mode) == 0o600
    assert stat.S_IMODE((store / "auth.conf").stat().st_mode) == 0o600
    users_file = tmp_path / "data" / "nats-users.json"
    private_dir(tmp_path / "data")
    users = NatsUsers.load_or_make(users_file)
    assert NatsUsers.load_or_make(users_file) == users  # kept: the same after a restart
    assert stat.S_IMODE(users_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o700
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    assert stat.S_IMODE(private_dir(loose).stat().st_mode) == 0o700


def test_tokens_have_a_bounded_life_and_a_real_secret() -> None:
    secret = b"a-real-secret-0123456789abcdef"
    mint_token(secret, "acme", MAX_TTL_S)
    with pytest.raises(ValueError, match="24 h"):
        mint_token(secret, "acme", MAX_TTL_S + 1)
    with pytest.raises(ValueError, match="at least 16 bytes"):
        mint_token(b"a" * 64, "acme", 60)  # long, but one byte over and over
    with pytest.raises(ValueError, match="at least 16 bytes"):
        Authenticator(b"01" * 32, {}, enabled=True)
