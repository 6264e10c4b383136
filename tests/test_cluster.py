"""A 3-node JetStream cluster with R3 streams: a node dies under load, nothing is lost."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import pytest

from jetstream import subjects
from jetstream.setup import apply_all
from schemas import device as ev
from services.cli.client import stream_audio
from services.edge.app import nats_key
from services.runtime.natsserver import NatsCluster
from tests.support import first_segment_queued, run_edge, run_worker, until, wer

pytestmark = pytest.mark.slow

SENTENCES = [
    "please turn on the lights in the kitchen",
    "add milk and eggs to my shopping list",
    "how far is it from london to paris",
]


@pytest.fixture
def cluster(tmp_path: Path):  # type: ignore[no-untyped-def]
    with NatsCluster(tmp_path / "cluster") as running:
        yield running


async def test_node_killed_under_load_loses_nothing(
    cluster: NatsCluster, engine, http, make_test_speech
) -> None:  # type: ignore[no-untyped-def]
    nc = await nats.connect(servers=cluster.url.split(","))
    await apply_all(nc.jetstream(), replicas=3)
    info = await nc.jetstream().stream_info(subjects.STREAM_SEGMENTS)
    assert info.config.num_replicas == 3
    await nc.close()

    speeches = [make_test_speech(SENTENCES[i:] + SENTENCES[:i], gap_s=0.8) for i in range(3)]
    # a new stream leader takes seconds to elect (more on a loaded machine): be patient
    async with run_worker(cluster.url, engine), run_edge(cluster.url, close_wait_s=90) as edge:
        runs = [
            asyncio.create_task(
                stream_audio(http, edge.url, s.pcm, s.sample_rate, realtime=True, close_timeout=150)
            )
            for s in speeches
        ]
        edge_js = edge.app[nats_key].jetstream()
        for stream in (subjects.STREAM_SEGMENTS, subjects.STREAM_TRANSCRIPTS):
            # services apply the definitions at start; that must not scale R3 down
            assert (await edge_js.stream_info(stream)).config.num_replicas == 3
        await until(lambda: first_segment_queued(edge.app[nats_key]), 60, "the devices talking")
        port = edge.app[nats_key].connected_url.port
        victim = next(s for s in cluster.servers if s.port == port)
        victim.kill()  # SIGKILL the node the edge talks to
        results = await asyncio.gather(*runs)

    for speech, run in zip(speeches, results, strict=True):
        assert run.close_code == 1000, run.close_reason
        ended = [
            r.event.segment for r in run.of_type(ev.SpeechEnded) if r.event.segment is not None
        ]
        finals = [f.segment for f in run.finals]
        assert sorted(finals) == sorted(ended), f"lost: {set(ended) - set(finals)}"
        assert len(finals) == len(set(finals)), f"duplicate finals: {finals}"
        assert wer(speech.text, run.text) <= 0.3, run.text
