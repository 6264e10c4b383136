"""Browsers: pages of an Origin not allowed are refused (403) before the upgrade or upload;
devices and SDKs, which send no Origin, are unaffected."""

from __future__ import annotations

import aiohttp
import pytest

from schemas import device as ev
from services.edge.app import EdgeConfigError, create_app
from services.edge.origins import OriginPolicy
from services.edge.settings import EdgeSettings
from tests.support import run_edge

EVIL = "https://evil.example"


def test_origin_patterns() -> None:
    default = OriginPolicy()
    assert default.allows(None, "edge:8080")  # no Origin: not a browser
    assert default.allows("http://edge:8080", "edge:8080")  # the edge's own page
    assert default.allows("https://edge", "edge")  # ... behind a TLS proxy
    assert default.allows("http://localhost:5173", "edge:8080")
    assert default.allows("http://127.0.0.1:3000", "edge:8080")
    for refused in (EVIL, "http://localhost.evil.example", "http://edge:9999", "null", "garbage"):
        assert not default.allows(refused, "edge:8080"), refused
    listed = OriginPolicy("https://*.example.com, https://app.io:8443")
    assert listed.allows("https://a.example.com", "edge")
    assert listed.allows("https://app.io:8443", "edge")
    assert listed.allows("http://edge", "edge")  # its own origin, always
    for refused in ("https://example.com", "http://a.example.com", "https://app.io",
                    "https://xexample.com", "http://localhost:5173"):  # fmt: skip
        assert not listed.allows(refused, "edge"), refused
    assert OriginPolicy("*").allows(EVIL, "edge")
    assert OriginPolicy("null").allows("null", "edge")
    with pytest.raises(EdgeConfigError, match="ALLOWED_ORIGINS"):
        create_app(EdgeSettings(auth_enabled=False, allowed_origins="ftp://files.example"))


async def _status(http: aiohttp.ClientSession, url: str, origin: str | None) -> tuple[int, str]:
    """(HTTP status, reason) of an upgrade with this Origin; 101 if it was upgraded."""
    try:
        async with http.ws_connect(url, origin=origin) as ws:
            event = ev.decode_event((await ws.receive(timeout=5)).data)
            assert isinstance(event, ev.SessionStarted)
            return 101, ""
    except aiohttp.WSServerHandshakeError as exc:
        return exc.status, (exc.headers or {}).get(ev.REASON_HEADER, "")


async def test_a_page_of_another_origin_cannot_stream(nats_server, nc, http) -> None:  # type: ignore[no-untyped-def]
    async with run_edge(nats_server.url, require_workers=False) as edge:
        stream = f"{edge.url}/v1/stream"
        assert await _status(http, stream, EVIL) == (403, "origin_not_allowed")
        assert await _status(http, stream, None) == (101, "")  # devices, SDKs
        assert await _status(http, stream, edge.url) == (101, "")  # the talk page
        assert await _status(http, stream, "http://localhost:5173") == (101, "")
        # the same for Deepgram's protocol and the file API, with a reason in the body
        listen = f"{edge.url}/v1/listen?encoding=linear16&sample_rate=16000"
        assert await _status(http, listen, EVIL) == (403, "origin_not_allowed")
        form = aiohttp.FormData()
        form.add_field("file", b"RIFF....", filename="a.wav")
        form.add_field("model", "whisper-1")
        async with http.post(
            f"{edge.url}/v1/audio/transcriptions", data=form, headers={"Origin": EVIL}
        ) as r:
            assert r.status == 403
            body = await r.json()
        assert body["reason"] == "origin_not_allowed" and EVIL in body["message"]
        async with http.get(f"{edge.url}/v1/stats") as r:
            assert (await r.json())["sessions"]["refused"]["origin_not_allowed"] == 3


async def test_the_allow_list_replaces_the_local_defaults(nats_server, nc, http) -> None:  # type: ignore[no-untyped-def]
    async with run_edge(
        nats_server.url, require_workers=False, allowed_origins="https://app.example.com"
    ) as edge:
        stream = f"{edge.url}/v1/stream"
        assert await _status(http, stream, "https://app.example.com") == (101, "")
        assert await _status(http, stream, "http://localhost:5173") == (403, "origin_not_allowed")
        assert await _status(http, stream, edge.url) == (101, "")
