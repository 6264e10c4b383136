"""Pieces both services share: NATS connections, settings, audio helpers, discovery, /metrics."""
