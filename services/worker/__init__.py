"""The worker: pulls segments from JetStream and transcribes them."""
