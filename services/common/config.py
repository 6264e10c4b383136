"""Settings from the environment: one frozen Struct per service, read once in __main__.

`ESCAPEMENT_<FIELD>` sets a field (e.g. `ESCAPEMENT_ENDPOINT_MS=400`); the
standard `NATS_URL` sets `nats_url`. Values are converted and validated by
msgspec, so a typo'd number fails at start with the variable named.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, TypeVar

import msgspec

PREFIX = "ESCAPEMENT_"

S = TypeVar("S", bound=msgspec.Struct)


class SettingsError(ValueError):
    pass


def from_env(cls: type[S], env: Mapping[str, str] | None = None, **overrides: Any) -> S:
    env = os.environ if env is None else env
    fields = {f.name for f in msgspec.structs.fields(cls)}
    raw: dict[str, Any] = {}
    if "nats_url" in fields and env.get("NATS_URL"):
        raw["nats_url"] = env["NATS_URL"]
    for key, value in env.items():
        if key.startswith(PREFIX):
            name = key[len(PREFIX) :].lower()
            if name in fields:
                raw[name] = value
    raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return msgspec.convert(raw, cls, strict=False)
    except msgspec.ValidationError as exc:
        raise SettingsError(f"bad setting: {exc} (environment variables {PREFIX}<FIELD>)") from exc


def nats_servers(url: str) -> list[str]:
    """`NATS_URL` may list several servers of a cluster, comma-separated."""
    return [u.strip() for u in url.split(",") if u.strip()]
