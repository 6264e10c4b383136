from __future__ import annotations

import msgspec

from services.edge.params import StreamParams
from services.edge.stream import StreamConfig
from services.edge.vad import VadConfig


class EdgeSettings(msgspec.Struct, frozen=True, kw_only=True):
    nats_url: str = "nats://127.0.0.1:4222"
    host: str = "127.0.0.1"
    port: int = 8080
    edge_id: str = ""  # generated when empty; [A-Za-z0-9_-]
    nats_creds: str = ""  # a .creds file (JWT + nkey) for NATS, if the server wants one
    stream_replicas: int = 0  # 0: as in jetstream/streams/*.json; 3 for an R3 cluster
    # a session that names no language: "" detects it per utterance where the workers'
    # model is multilingual (English-only models: en)
    default_language: str = ""
    # The deployment's default model (the workers' default_model too): sessions that
    # name no model (or this one) go to the workers that run it; a session asking for
    # another model by name (`model=`) goes to the workers of that model only.
    default_model: str = "tiny.en"
    # VAD / utterance cutting
    vad_mode: int = 3
    preroll_ms: int = 300
    endpoint_ms: int = 500
    trailing_pad_ms: int = 120
    min_speech_ms: int = 150
    max_utterance_ms: int = 15000
    max_segment_bytes: int = 900_000  # audio per segment: under NATS's 1 MiB message limit
    # numbered chunks (framing=msgpack): a missing one is waited for until audio this far
    # past its place has arrived, then filled with silence (per session: ?jitter_ms=)
    jitter_ms: int = 200
    # decoding context (services/edge/stream.py): committed text of earlier finals as
    # the prompt, and audio before a segment (from an earlier utterance's start)
    prompt_chars: int = 0  # committed text before the context, as a prompt (measured: off)
    # earlier utterances' audio (and text) sent as left context, and context + segment
    # at most (measured: 25 s of context closes most of the gap to whole-file decoding)
    context_ms: int = 25000
    window_ms: int = 28000
    prompt_wait_s: float = 3.0  # hold a segment this long for the results before it
    early_finals: bool = True  # decode at the pause, before the endpoint is confirmed
    interims: bool = True  # off here: off for every session; else per session (interim_results)
    interim_first_ms: int = 400  # speech before the first interim look
    interim_every_ms: int = 1000  # speech between interim looks
    # admission (new sessions only)
    backlog_high_per_worker: int = 8  # queued + in-flight segments per live worker
    backlog_low_per_worker: int = 4
    require_workers: bool = True  # refuse new sessions while no worker is alive
    # Sessions are admitted while their expected load fits the workers' measured decode
    # rate (services/edge/admission.py): session_load audio seconds of segments per
    # second each (0.6 measured on recorded conversation-like speech, pre-roll and pad
    # included; 0: no measured admission), within decode_utilisation of the summed
    # rate (0.45: 8-10 sessions on 2 CPU cores with tiny.en, the measured capacity of
    # loadtest.capacity). fallback_sessions_per_worker holds until a worker has a rate;
    # max_sessions_per_worker is an optional fixed cap per worker (0: none).
    session_load: float = 0.6
    decode_utilisation: float = 0.45
    fallback_sessions_per_worker: float = 4.0
    max_sessions_per_worker: float = 0.0
    admission_refresh_s: float = 0.25
    retry_after_s: float = 5.0
    # auth
    auth_enabled: bool = True  # may be off only on a loopback host
    auth_secret: str = ""  # HMAC key for tokens; generated per process when empty
    api_keys_file: str = ""  # lines of tenant:sha256(key)
    api_keys: str = ""  # the same, comma-separated
    resume_window_s: float = 300.0
    # limits
    max_connections: int = 2000
    listen_backlog: int = 2048  # pending TCP connects the kernel holds (a reconnect storm)
    max_connections_per_tenant: int = 500
    handshake_timeout_s: float = 10.0
    max_session_s: float = 4 * 3600.0
    max_audio_rate: float = 1.5  # times real time; more is throttled (0: no limit)
    audio_burst_s: float = 5.0  # audio a device may send ahead of real time (after a stall)
    max_frame_bytes: int = 256 * 1024
    idle_timeout_s: float = 10.0  # no audio and no KeepAlive
    heartbeat_s: float = 20.0  # WebSocket ping
    close_wait_s: float = 30.0  # CloseStream: how long to wait for outstanding finals
    publish_timeout_s: float = 5.0
    # keep retrying a segment's publish through a NATS outage this long (a cluster
    # electing a new stream leader after a node dies takes ~7 s idle, more under load)
    outage_buffer_s: float = 30.0
    publish_buffer_bytes: int = 8 * 1024 * 1024  # per session, audio waiting to be queued
    recheck_after_s: float = 20.0  # a result owed this long is looked up in ASR_TRANSCRIPTS
    drain_s: float = 10.0  # edge shutdown: time given to deliver owed finals before 1001
    log_level: str = "INFO"
    # fairness between tenants (services/edge/admission.py; README "Fairness and limits").
    # While more than one tenant is known, one may hold at most this share of the edge's
    # session capacity and of its queued-audio budget (queued_audio_per_worker_s per worker)
    tenant_share: float = 0.5
    queued_audio_per_worker_s: float = 30.0  # final segments published, not yet answered
    tenant_active_s: float = 600.0  # a tenant seen this recently is known
    # per tenant, ';'-separated: "acme:share=0.8,sessions=200,queued_s=300;trial:sessions=2"
    tenant_quotas: str = ""
    # Finalize is ignored (one Error finalize_rate_limited) this soon after the previous
    # cut, in audio time, or with less speech than this in the utterance
    min_finalize_interval_ms: int = 1000
    min_finalize_speech_ms: int = 300
    # a client that leaves this much unread is closed 4009 (it may resume: finals are stored)
    outbox_max_frames: int = 2000
    outbox_max_bytes: int = 2 * 1024 * 1024
    # browsers: Origins allowed, comma-separated ("*", "https://app.example.com",
    # "http://localhost:*"); empty: the edge's own origin, http://localhost:*, http://127.0.0.1:*
    allowed_origins: str = ""
    # Tenants allowed `pace=fast` (audio faster than real time: file uploads by trusted
    # clients), comma-separated; "*": every tenant. With auth off (loopback) always allowed.
    fast_pace_tenants: str = ""

    def may_go_fast(self, principal_method: str, tenant: str) -> bool:
        if principal_method == "none":
            return True
        allowed = {t.strip() for t in self.fast_pace_tenants.split(",") if t.strip()}
        return "*" in allowed or tenant in allowed

    def window_ms_at(self, sample_rate: int) -> int:
        """Context + segment at most for audio at `sample_rate`: `window_ms`, unless a
        segment with its context would not fit a NATS message (at 48 kHz ~9 s, not 28)."""
        return min(self.window_ms, self.max_segment_bytes * 1000 // (2 * sample_rate))

    def stream_config(self, params: StreamParams) -> StreamConfig:
        """What the streaming core of a session with these parameters works with."""
        settings = self
        window_ms = settings.window_ms_at(params.sample_rate)
        return StreamConfig(
            vad=VadConfig(
                mode=settings.vad_mode,
                preroll_ms=settings.preroll_ms,
                endpoint_ms=settings.endpoint_ms,
                trailing_pad_ms=settings.trailing_pad_ms,
                min_speech_ms=settings.min_speech_ms,
                max_utterance_ms=min(settings.max_utterance_ms, window_ms),
                announce_pauses=settings.early_finals,
            ),
            jitter_ms=settings.jitter_ms if params.jitter_ms is None else params.jitter_ms,
            prompt_chars=settings.prompt_chars,
            context_ms=settings.context_ms,
            window_ms=window_ms,
            prompt_wait_s=settings.prompt_wait_s,
            early_finals=settings.early_finals,
            interims=params.interim_results and settings.interims,
            interim_first_ms=settings.interim_first_ms,
            interim_every_ms=settings.interim_every_ms,
            min_finalize_interval_ms=settings.min_finalize_interval_ms,
            min_finalize_speech_ms=settings.min_finalize_speech_ms,
        )
