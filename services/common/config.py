"""Settings from the environment: one frozen Struct per service, read once in __main__.

`ESCAPEMENT_<FIELD>` sets a field (e.g. `ESCAPEMENT_ENDPOINT_MS=400`); the
standard `NATS_URL` sets `nats_url`. NATS credentials: in the URL
(`nats://user:pass@host`), or `NATS_USER` + `NATS_PASSWORD` (put into each
server URL that has none), or a creds file, `NATS_CREDS` (or
`ESCAPEMENT_NATS_CREDS`, which wins). Values are converted and validated by
msgspec, so a typo'd number fails at start with the variable named.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

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
    if "nats_creds" in fields and env.get("NATS_CREDS"):
        raw["nats_creds"] = env["NATS_CREDS"]
    for key, value in env.items():
        if key.startswith(PREFIX):
            name = key[len(PREFIX) :].lower()
            if name in fields:
                raw[name] = value
    raw.update({k: v for k, v in overrides.items() if v is not None})
    if "nats_url" in fields and env.get("NATS_USER"):
        default = msgspec.structs.fields(cls)[_index(cls, "nats_url")].default
        url = str(raw.get("nats_url", default))
        raw["nats_url"] = with_credentials(url, env["NATS_USER"], env.get("NATS_PASSWORD", ""))
    try:
        return msgspec.convert(raw, cls, strict=False)
    except msgspec.ValidationError as exc:
        raise SettingsError(f"bad setting: {exc} (environment variables {PREFIX}<FIELD>)") from exc


def _index(cls: type[msgspec.Struct], name: str) -> int:
    return [f.name for f in msgspec.structs.fields(cls)].index(name)


def with_credentials(url: str, user: str, password: str) -> str:
    """`url` (one server or several) with `user:password@` in each server that has none."""
    auth = f"{quote(user, safe='')}:{quote(password, safe='')}@"
    out = []
    for one in nats_servers(url):
        scheme, sep, rest = one.partition("://")
        if not sep:
            scheme, sep, rest = "nats", "://", one
        if urlsplit(f"{scheme}{sep}{rest}").username is None:
            rest = auth + rest
        out.append(f"{scheme}{sep}{rest}")
    return ",".join(out)


def nats_servers(url: str) -> list[str]:
    """`NATS_URL` may list several servers of a cluster, comma-separated."""
    return [u.strip() for u in url.split(",") if u.strip()]
