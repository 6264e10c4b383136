"""Wire types: the only types that cross a process boundary.

`schemas.device` is what a device and the edge say to each other (JSON text
frames, msgpack audio chunks); `schemas.pipeline` is what travels on NATS
(msgpack). Every Struct carries a `v` field; evolve them by msgspec's
schema-evolution rules (add fields with defaults at the end, never reuse or
retype a field).
"""
