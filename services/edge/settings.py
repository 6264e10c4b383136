from __future__ import annotations

import msgspec


class EdgeSettings(msgspec.Struct, frozen=True, kw_only=True):
    nats_url: str = "nats://127.0.0.1:4222"
    host: str = "127.0.0.1"
    port: int = 8080
    edge_id: str = ""  # generated when empty; [A-Za-z0-9_-]
    default_language: str = "en"
    # VAD / utterance cutting
    vad_mode: int = 3
    preroll_ms: int = 300
    endpoint_ms: int = 500
    trailing_pad_ms: int = 300
    min_speech_ms: int = 150
    max_utterance_ms: int = 15000
    reorder_chunks: int = 8  # numbered chunks held to repair reordering
    prompt_chars: int = 200  # recent text sent with each segment as context
    # limits
    max_frame_bytes: int = 256 * 1024
    idle_timeout_s: float = 10.0  # no audio and no KeepAlive
    heartbeat_s: float = 20.0  # WebSocket ping
    close_wait_s: float = 30.0  # CloseStream: how long to wait for outstanding finals
    publish_timeout_s: float = 5.0
    log_level: str = "INFO"
