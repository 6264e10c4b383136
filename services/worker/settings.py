from __future__ import annotations

from typing import Literal

import msgspec

from jetstream import subjects


class WorkerSettings(msgspec.Struct, frozen=True, kw_only=True):
    @property
    def lane(self) -> str:
        """The lane this worker takes segments from ("": the default model's)."""
        return "" if self.model == self.default_model else subjects.lane_of_model(self.model)

    nats_url: str = "nats://127.0.0.1:4222"
    model: str = "tiny.en"
    # The deployment's default model (the edges' default_model too). A worker whose
    # `model` is another one takes only the segments of sessions that ask for it by
    # name (its model's lane, jetstream/subjects.py), never the default model's.
    default_model: str = "tiny.en"
    device: str = "cpu"
    compute_type: str = "int8"
    cpu_threads: int = 0  # 0: let CTranslate2 decide
    # threads of the encoder alone (a second replica of the model), when more than
    # cpu_threads (services/worker/engines.py _whisper_model); 0: cpu_threads
    encoder_threads: int = 0
    # a folder the workers of one host share (services/common/board.py): each says there
    # when it decodes a final, and an encoder takes its encoder_threads only while no
    # other worker's final holds a core, one thread otherwise; "": always encoder_threads
    decode_board: str = ""
    # 0: the measured choice for the model (services/worker/decoding.py DecodePolicy.for_model:
    # greedy with a beam-5 retry when a word is unsure for tiny.en, greedy for base)
    beam_size: int = 0
    concurrency: int = 1  # segments transcribed at once (executor threads)
    fetch_timeout_s: float = 2.0
    in_progress_every_s: float = 3.0  # well under the consumer's ack_wait (10 s)
    lease_margin_s: float = 1.0  # stop answering for a delivery this long before its lease ends
    nak_delay_s: float = 1.0  # times the delivery count
    publish_retry_s: float = 30.0  # retry a result's publish through a NATS outage this long
    nats_creds: str = ""  # a .creds file (JWT + nkey) for NATS, if the server wants one
    stream_replicas: int = 0  # 0: as in jetstream/streams/*.json
    # The consumer's own max_deliver wins; this bounds attempts where it sets none.
    max_deliver: int = 5
    shutdown_grace_s: float = 20.0
    # What this worker takes. "all": live finals and, when a fetch of those came back
    # empty, uploaded files' segments and interim looks. "finals": live finals only.
    # "looks": interim looks and uploaded files' segments only, at idle CPU priority
    # (SCHED_IDLE, else nice 19): the kernel gives the core to a finals worker the
    # moment it has a final, so no final waits behind a look or a file's segment
    # (`escapement up` runs one per finals worker).
    role: Literal["all", "finals", "looks"] = "all"
    # interim looks (ASR_INTERIMS): taken only when a fetch of finals came back empty
    interims: bool = True
    interim_poll_s: float = 0.05  # how long a fetch of finals waits before a look is taken
    interim_max_age_s: float = 1.5  # a look older than this is stale: dropped unread
    # role "looks": once other work has kept this share of the host's cores busy over
    # the last 3 s, a look starts only while fewer than half the cores run anything else
    # (Worker._host_busy has the measurement); 0: whenever a look waits
    look_busy_share: float = 0.3
    log_level: str = "INFO"
    # The engine chain (services/worker/chain.py), tried in order, e.g.
    # "base,tiny.en,openai:http://asr.internal:8000/v1" or a JSON list; "": just `model`.
    engines: str = ""
    # An engine call may take max(engine_deadline_s, engine_deadline_factor x the
    # segment's audio seconds); past that its breaker opens and the next engine decodes.
    engine_deadline_s: float = 3.0
    engine_deadline_factor: float = 1.0
    breaker_cooldown_s: float = 10.0  # an open breaker is probed this long after it opened
    engine_max_stuck: int = 3  # calls past their deadline (threads run on) one engine may hold
    remote_api_key: str = ""  # bearer token for openai: engines (never logged)
    remote_model: str = "whisper-1"  # the model openai: engines ask their server for
    remote_timeout_s: float = 30.0
    faults: str = ""  # fault drills only (chain.parse_faults), e.g. "base:hang=0.5,error=0.1"
    # Batching across sessions (services/worker/batching.py): up to batch_max queued live
    # finals decoded in one engine call; a fetch short of that waits at most
    # batch_wait_ms for more. 1: each segment alone. Measured on 2 CPU cores (tiny.en,
    # loadtest/README.md "Batching"): 0.6-1.1x the throughput of B=1 at 2-10x the
    # latency, so off by default; meant for a GPU.
    batch_max: int = 1
    batch_wait_ms: float = 20.0
    # The dead-letter sweep (services/worker/sweep.py): segments whose deliveries ran out
    # with the MAX_DELIVERIES advisory lost, and segments near ASR_SEGMENTS' max_age, are
    # dead-lettered and their devices told within about one sweep.
    sweep_every_s: float = 10.0  # 0: no sweep
    sweep_expiry_margin_s: float = 300.0  # this long before max_age (at most half of it)
    sweep_settle_s: float = 30.0  # a segment the counts leave in doubt waits this long
    sweep_max_scan: int = 1000  # messages read per sweep, at most
    # Fault drill only: false drops the MAX_DELIVERIES advisory subscription, as if every
    # advisory were lost (the sweep alone then finds exhausted segments).
    max_deliveries_advisory: bool = True
