"""The talk page and the dashboard in a real browser against `escapement up`.

Debian's chromium (scripts/setup --test installs it), headless, driven by
Playwright with no browser download. Chromium's fake microphone plays a WAV
of espeak speech in a loop (`--use-file-for-fake-audio-capture`), so the
page's AudioWorklet, its 16 kHz resampler and the whole pipeline run as they
do for a person. Screenshots are kept under `$ESCAPEMENT_ARTEFACTS/browser`
(or a temp dir); the path is printed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.common.audio import write_wav
from tests.support import LIGHT_WORKER_ENV
from tests.test_cli import Up, start_up

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
MIC_SENTENCE = "please turn on the lights in the kitchen"
FILE_SENTENCE = "add milk and eggs to my shopping list"
PHONE = {"width": 390, "height": 844}

# What the page showed at any moment, not only at the end: interims are replaced
# by their finals, the speaking indicator goes off at each pause.
WATCH = """
window.__seen = { interim: false, speaking: false };
new MutationObserver(() => {
  if (document.querySelector("#transcript .utt.interim")) window.__seen.interim = true;
  if (document.querySelector("#speaking.on")) window.__seen.speaking = true;
}).observe(document, { subtree: true, childList: true, attributes: true, characterData: true });
"""


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Path:
    base = os.environ.get("ESCAPEMENT_ARTEFACTS")
    path = Path(base) / "browser" if base else tmp_path_factory.mktemp("browser-artefacts")
    path.mkdir(parents=True, exist_ok=True)
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    if capture is not None and reporter is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\nbrowser test screenshots: {path}")
    return path


@pytest.fixture(scope="module")
def wavs(tmp_path_factory: pytest.TempPathFactory, make_test_speech) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    """16-bit PCM WAVs: the fake microphone's (speech, then ~1 s of silence; chromium
    loops it) and the one the upload box sends."""
    folder = tmp_path_factory.mktemp("browser-wavs")
    out = {}
    for name, sentence in (("mic", MIC_SENTENCE), ("file", FILE_SENTENCE)):
        speech = make_test_speech([sentence])
        out[name] = folder / f"{name}.wav"
        write_wav(out[name], speech.pcm, speech.sample_rate)
    return out


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    # admission by a fixed count, not the measured decode rate: on a slow host that rate
    # can cap one worker at one session, and the resumed socket then waits out the old one
    fixed = {"ESCAPEMENT_SESSION_LOAD": "0", "ESCAPEMENT_MAX_SESSIONS_PER_WORKER": "8"}
    running = start_up(
        tmp_path_factory.mktemp("browser-up"), workers=1, env={**LIGHT_WORKER_ENV, **fixed}
    )
    try:
        yield running
    finally:
        running.kill()


@pytest.fixture(scope="module")
def browser(wavs: dict[str, Path]) -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (scripts/setup --test installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        launched = pw.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",  # root in CI
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={wavs['mic']}",
                "--autoplay-policy=no-user-gesture-required",
            ],
        )
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def context(browser: Any) -> Iterator[Any]:
    ctx = browser.new_context(viewport=PHONE, device_scale_factor=1)
    ctx.set_default_timeout(30_000)
    ctx.add_init_script(WATCH)
    try:
        yield ctx
    finally:
        ctx.close()


def _finals(page: Any) -> str:
    return " ".join(page.locator("#transcript .utt.final .text").all_inner_texts()).lower()


def _wait_text(page: Any, selector: str, pattern: str, timeout_ms: int = 30_000) -> None:
    page.wait_for_function(
        "([sel, re]) => [...document.querySelectorAll(sel)].some(e => new RegExp(re, 'i').test(e.textContent))",
        arg=[selector, pattern],
        timeout=timeout_ms,
    )


def _poll(predicate: Any, within: float, message: str) -> None:
    """Wait for `predicate()` without an event loop of our own (Playwright's runs here)."""
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, f"{message}: not within {within:g} s"
        time.sleep(0.2)


def _readyz(url: str) -> int:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_talk_page_transcribes_the_microphone_resumes_and_the_dashboard_counts_it(
    up: Up, context: Any, artefacts: Path
) -> None:
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    sockets: list[Any] = []  # every socket the page opens, through a route we can cut

    def route(ws: Any) -> None:
        ws.connect_to_server()
        sockets.append(ws)

    page.route_web_socket(re.compile(r"/v1/stream"), route)
    page.goto(f"{up.url}/")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    page.get_by_role("button", name="Start").click()
    _wait_text(page, "#transcript .utt.final .text", "kitchen")
    assert "lights" in _finals(page)
    assert page.locator("#speaking").inner_text() in ("Speaking", "Listening")
    assert re.search(r"\d+ ms", page.locator("#transcript .utt.final .lat").first.inner_text())

    dashboard = context.new_page()
    dashboard.goto(f"{up.url}/dashboard")
    dashboard.wait_for_function(
        "() => Number(document.querySelector('[data-k=\"sessions\"]').textContent) >= 1"
    )
    dashboard.wait_for_function(
        "() => document.querySelector('[data-k=\"workers\"]').textContent.startsWith('1 /')"
    )
    dashboard.screenshot(path=artefacts / "dashboard.png", full_page=True)
    dashboard.close()

    page.wait_for_function("() => window.__seen.interim && window.__seen.speaking")

    # The socket drops (as on a network change): the page resumes the same session.
    finals_before = page.locator("#transcript .utt.final").count()
    session = page.locator("#status").inner_text()
    (first,) = sockets
    first.close(code=1011, reason="cut by the test")
    _wait_text(page, "#notice", "Reconnected")
    assert len(sockets) == 2 and "resume=" in sockets[1].url and "last_segment=" in sockets[1].url
    page.wait_for_function(
        f"() => document.querySelectorAll('#transcript .utt.final').length > {finals_before}"
    )
    assert page.locator("#status").inner_text() == session  # the same session id
    page.screenshot(path=artefacts / "talk-page.png", full_page=True)

    page.get_by_role("button", name="Stop").click()
    _wait_text(page, "#status", "^Stopped")
    assert page.get_by_role("button", name="Start").is_enabled()
    assert not errors, errors


def test_upload_transcribes_a_wav(up: Up, context: Any, wavs: dict[str, Path], artefacts: Path):
    page = context.new_page()
    page.goto(f"{up.url}/")
    page.get_by_label("WAV file").set_input_files(wavs["file"])
    _wait_text(page, "#status", "File done: 1 final")
    assert "milk" in _finals(page) and "shopping" in _finals(page)
    assert page.get_by_label("WAV file").is_enabled()
    page.screenshot(path=artefacts / "upload.png", full_page=True)


def test_refused_session_shows_its_reason(up: Up, context: Any, artefacts: Path) -> None:
    workers = up.workers()
    assert workers
    for worker in workers:
        worker.suspend()  # it stops answering discovery: the edge refuses no_workers
    try:
        _poll(lambda: _readyz(up.url) == 503, within=15, message="the edge sees no worker")
        page = context.new_page()
        page.goto(f"{up.url}/")
        page.get_by_role("button", name="Start").focus()
        page.keyboard.press("Enter")  # keyboard operable
        _wait_text(page, "#notice", "refused the session: no_workers")
        notice = page.locator("#notice").inner_text()
        assert "No transcription worker is running" in notice
        assert page.get_by_role("button", name="Start").is_enabled()
        page.screenshot(path=artefacts / "refused.png", full_page=True)
        with urllib.request.urlopen(f"{up.url}/v1/stats", timeout=5) as r:
            assert json.loads(r.read())["sessions"]["refused"]["no_workers"] >= 1
    finally:
        for worker in workers:
            worker.resume()
    _poll(lambda: _readyz(up.url) == 200, within=15, message="the worker is back")


def test_denied_microphone_says_what_to_do(up: Up, context: Any) -> None:
    page = context.new_page()
    page.add_init_script(
        "navigator.mediaDevices.getUserMedia = () =>"
        " Promise.reject(new DOMException('Permission denied', 'NotAllowedError'));"
    )
    page.goto(f"{up.url}/")
    page.get_by_role("button", name="Start").click()
    _wait_text(page, "#notice", "Microphone access was denied")
    assert "Allow the microphone" in page.locator("#notice").inner_text()
    assert page.get_by_role("button", name="Start").is_enabled()
