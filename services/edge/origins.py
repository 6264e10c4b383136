"""Which web pages may talk to the edge: an `Origin` allow-list for browser requests.

A browser sends `Origin` with every WebSocket upgrade and cross-site POST, and
lets any page open a WebSocket to any host, a local edge included. So the
streaming and upload endpoints refuse an `Origin` that is not allowed with 403
`origin_not_allowed`, before the upgrade. Requests without `Origin` (devices,
SDKs, the CLI) are not browsers and are unaffected.

Allowed: the edge's own origin (the request's `Host`), always, and the
patterns of `ESCAPEMENT_ALLOWED_ORIGINS` (comma-separated): `*` (any),
`https://app.example.com`, `http://localhost:*` (any port),
`https://*.example.com` (any subdomain). Unset: `http://localhost:*` and
`http://127.0.0.1:*`, for pages a developer serves locally.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_ORIGINS = "http://localhost:*,http://127.0.0.1:*"
GUARDED_PATHS = frozenset({"/v1/stream", "/v1/listen", "/v1/audio/transcriptions"})
REASON = "origin_not_allowed"


_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class _Pattern:
    scheme: str
    host: str  # "*.example.com": any subdomain
    port: int | None  # None: any

    def matches(self, scheme: str, host: str, port: int) -> bool:
        if scheme != self.scheme:
            return False
        if self.host.startswith("*."):
            if not host.endswith(self.host[1:]):
                return False
        elif host != self.host:
            return False
        return self.port is None or port == self.port


def _split(origin: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of a serialized origin, lower case; None if it is not one."""
    try:
        parts = urlsplit(origin.strip())
        scheme = parts.scheme.lower()
        port = parts.port
    except ValueError:
        return None
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
        return None
    return scheme, parts.hostname, _DEFAULT_PORTS[scheme] if port is None else port


class OriginPolicy:
    def __init__(self, allowed: str = "") -> None:
        patterns = [p.strip() for p in (allowed or DEFAULT_ORIGINS).split(",") if p.strip()]
        self.any = "*" in patterns
        self.null = "null" in patterns  # sandboxed frames and file:// pages send "null"
        self._patterns: list[_Pattern] = []
        for pattern in patterns:
            if pattern in ("*", "null"):
                continue
            any_port = pattern.endswith(":*")
            split = _split(pattern[:-2] if any_port else pattern)
            if split is None:
                raise ValueError(
                    f"allowed origin {pattern!r}: expected scheme://host[:port], "
                    "with :* for any port or *. for any subdomain"
                )
            scheme, host, port = split
            self._patterns.append(_Pattern(scheme, host, None if any_port else port))

    def allows(self, origin: str | None, host: str | None) -> bool:
        """Whether a request with this `Origin` (None: no header) and `Host` may go on."""
        if origin is None or self.any:
            return True
        if origin.strip() == "null":
            return self.null
        split = _split(origin)
        if split is None:
            return False
        scheme, o_host, o_port = split
        own = _split(f"{scheme}://{host}") if host else None  # behind a TLS proxy: any scheme
        if own is not None and own[1:] == (o_host, o_port):
            return True  # a page the edge itself served
        return any(p.matches(scheme, o_host, o_port) for p in self._patterns)
