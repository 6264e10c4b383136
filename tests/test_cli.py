"""`escapement up` and `escapement transcribe` as a user runs them: real processes."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import nats
import psutil
import pytest

from services.cli.client import stream_audio
from services.common.audio import write_wav
from services.common.host import usable_cores
from services.runtime.procs import Child, ProcError, free_port, spawn
from tests.support import until_sync, wer

pytestmark = pytest.mark.slow

ESCAPEMENT = [sys.executable, "-m", "services.cli"]
BANNER = re.compile(r"Escapement is up: (\S+?)/?\s")


class Up:
    def __init__(self, child: Child, url: str) -> None:
        self.child, self.url = child, url

    @property
    def output(self) -> str:
        return self.child.log()

    def children(self) -> list[psutil.Process]:
        return psutil.Process(self.child.pid).children(recursive=True)

    def workers(self, role: str = "finals") -> list[psutil.Process]:
        """The worker processes that take finals, or (role "looks") the interim-look ones."""
        found = []
        for p in self.children():
            try:
                if "services.worker" not in " ".join(p.cmdline()):
                    continue
                if (p.environ().get("ESCAPEMENT_ROLE") == "looks") == (role == "looks"):
                    found.append(p)
            except (psutil.ZombieProcess, psutil.NoSuchProcess, psutil.AccessDenied):
                continue  # a worker that just died, not yet reaped
        return found

    def kill(self) -> None:
        """Whatever happened: the whole group (nats-server, workers) goes too."""
        self.child.kill(group=True)

    def stop(self) -> int:
        return self.child.stop(grace=60)


def spawn_up(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> Child:
    """`escapement up --port 0 ARGS` with its own data dir, its output in tmp_path/up.log."""
    environ = {k: v for k, v in os.environ.items() if k != "NATS_URL"} | (env or {})
    command = [*ESCAPEMENT, "up", "--port", "0", "--data-dir", str(tmp_path / "data"), *args]
    # its own process group: a failed test kills it all
    return spawn(command, tmp_path / "up.log", env=environ, new_session=True, name="escapement up")


def start_up(tmp_path: Path, workers: int | None, env: dict[str, str] | None = None) -> Up:
    """Returns at the banner: `up` prints it once a session would be admitted. Workers
    None: up's default layout."""
    child = spawn_up(tmp_path, *([] if workers is None else ["--workers", str(workers)]), env=env)
    try:
        banner = child.wait_for(BANNER, within=120)
    except ProcError:
        child.kill(group=True)
        raise
    return Up(child, banner.group(1))


def readyz(url: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture
def wav(tmp_path: Path, make_test_speech) -> tuple[Path, str]:  # type: ignore[no-untyped-def]
    speech = make_test_speech(
        ["please turn on the lights in the kitchen", "add milk and eggs to my shopping list"]
    )
    path = tmp_path / "speech.wav"
    write_wav(path, speech.pcm, speech.sample_rate)
    return path, speech.text


async def _connect_and_close(url: str) -> None:
    nc = await nats.connect(url, allow_reconnect=False)
    await nc.close()


def transcribe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ESCAPEMENT, "transcribe", *args], capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    running = start_up(tmp_path, workers=1)
    try:
        yield running
    finally:
        running.kill()


def test_up_transcribe_and_clean_stop(up: Up, wav: tuple[Path, str], tmp_path: Path) -> None:
    path, text = wav
    # the embedded nats-server wants the generated credentials, which are never printed
    url = (tmp_path / "data" / "nats.url").read_text()
    password = url.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
    assert password and password not in up.output
    assert (tmp_path / "data" / "nats.url").stat().st_mode & 0o077 == 0
    host, port = url.rsplit("@", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=5) as raw:  # no credentials
        raw.recv(4096)  # INFO
        raw.sendall(b'CONNECT {"verbose":false}\r\nPING\r\n')
        assert b"Authorization Violation" in raw.recv(4096)
    asyncio.run(_connect_and_close(url))
    done = transcribe(str(path), "--url", up.url, "--fast")
    assert done.returncode == 0, done.stderr
    finals = [line.split("] ", 1)[1] for line in done.stdout.splitlines() if line.startswith("[")]
    assert len(finals) == 2 and wer(text, " ".join(finals)) <= 0.25, done.stdout
    assert done.stdout.splitlines()[-1].startswith("-- 2 finals")

    as_json = transcribe(str(path), "--url", up.url, "--fast", "--json")
    assert as_json.returncode == 0
    kinds = [re.search(r'"type":"(\w+)"', line).group(1) for line in as_json.stdout.splitlines()]  # type: ignore[union-attr]
    assert kinds[0] == "SessionStarted" and kinds.count("Final") == 2 and "SpeechStarted" in kinds

    # a worker that dies is restarted by the supervisor
    [worker] = up.workers()
    worker.kill()
    until_sync(
        lambda: [w for w in up.workers() if w.pid != worker.pid and w.is_running()],
        30,
        "worker restarted",
    )

    family = up.children()
    assert up.stop() == 0
    until_sync(
        lambda: not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE],
        10,
        "no orphans left",
    )


def test_up_without_workers_refuses_with_a_reason(tmp_path: Path, wav: tuple[Path, str]) -> None:
    up = start_up(tmp_path, workers=0)
    try:
        status, body = readyz(up.url)
        assert (status, body["status"], body["waiting_for"]) == (503, "waiting", ["workers"])
        done = transcribe(str(wav[0]), "--url", up.url, "--fast")
        assert done.returncode == 3
        assert "503" in done.stderr and "no_workers" in done.stderr
        assert up.stop() == 0
    finally:
        up.kill()


@pytest.mark.parametrize("value", ["-1", "two", ""])
def test_up_refuses_a_bad_worker_count_clearly(value: str) -> None:
    done = subprocess.run(
        [*ESCAPEMENT, "up", "--workers", value], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "--workers" in done.stderr and "a number of workers (0 or more) or auto" in done.stderr


def test_transcribe_rejects_bad_files_clearly(tmp_path: Path) -> None:
    stereo = tmp_path / "stereo.wav"
    import wave

    with wave.open(str(stereo), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(bytes(6400))
    odd_rate = tmp_path / "odd.wav"
    write_wav(odd_rate, bytes(6400), 44100)
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"not a wav at all")
    for path, expected in (
        (stereo, "mono"),
        (odd_rate, "44100"),
        (junk, "not a PCM WAV"),
        (tmp_path / "missing.wav", "No such file"),
    ):
        done = transcribe(str(path))
        assert done.returncode == 2, (path, done.stderr)
        assert expected in done.stderr and "Traceback" not in done.stderr


def test_transcribe_reports_an_unreachable_edge(tmp_path: Path) -> None:
    path = tmp_path / "s.wav"
    write_wav(path, bytes(3200), 16000)
    done = transcribe(str(path), "--url", f"http://127.0.0.1:{free_port()}")
    assert done.returncode == 3 and "cannot reach" in done.stderr and "Traceback" not in done.stderr


def test_the_first_session_after_the_banner_is_admitted_and_transcribed(
    tmp_path: Path, make_test_speech
) -> None:  # type: ignore[no-untyped-def]
    """A cold start (a fresh process, data dir and cache, the default layout: one
    single-threaded worker per core): the banner waits for the model in every worker, so
    a session opened the moment it shows is admitted (not refused: no_workers) and
    transcribed."""
    speech = make_test_speech(["please turn on the lights in the kitchen"])
    up = start_up(tmp_path, workers=None, env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    cores = usable_cores()
    try:
        before_banner = up.output.split("Escapement is up", 1)[0]
        assert f"{cores} worker(s), 1 CPU thread(s) each;" in before_banner
        assert f"Loading the model (tiny.en) in {cores} worker(s)..." in before_banner
        # and as many interim-look workers, at idle CPU priority: a final never waits on one
        assert f"{cores} interim-look worker(s) at idle priority" in before_banner
        looks = up.workers("looks")
        assert len(looks) == cores and len(up.workers()) == cores
        assert all(os.sched_getscheduler(p.pid) == os.SCHED_IDLE for p in looks)
        assert all(os.sched_getscheduler(p.pid) == os.SCHED_OTHER for p in up.workers())

        async def first_session():  # type: ignore[no-untyped-def]
            async with aiohttp.ClientSession() as http:
                return await stream_audio(http, up.url, speech.pcm, 16000, realtime=False)

        run = asyncio.run(first_session())
        assert run.close_code == 1000, run.close_reason
        assert wer(speech.text, run.text) <= 0.25, run.text
        status, body = readyz(up.url)
        assert (status, body["status"], body["workers"]) == (200, "ready", cores)
        assert up.stop() == 0
    finally:
        up.kill()


def test_up_says_so_when_a_worker_dies_before_it_is_ready(tmp_path: Path) -> None:
    child = spawn_up(tmp_path, "--model", str(tmp_path / "no-such-model"))
    try:
        assert child.wait(within=120) == 1
    finally:
        child.kill(group=True)
    output = child.log()
    # whichever of the workers fails first is named
    assert re.search(r"worker \d+ exited with 2 before it was ready", output), output
    assert "no-such-model" in output and "Escapement is up" not in output
    assert "Traceback" not in output


# Without the loadtest extra. The test venv has it installed, so its absence is a fault
# injected here (sys.modules[name] = None makes `import name` fail as if it were not
# installed); it cannot be produced for real in this venv.
WITHOUT_EXTRA = textwrap.dedent(
    """
    import sys
    for name in ("hdrh", "jiwer", "matplotlib"):
        sys.modules[name] = None
    from services.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.parametrize(
    "argv",
    [
        ["concurrency", "--url", "http://127.0.0.1:9"],
        ["herd", "--spawn-up"],
        ["compare", "a.json", "b.json"],
    ],
)
def test_loadtest_without_its_extra_says_what_to_install(argv: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_EXTRA, "loadtest", *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "pip install 'escapement[loadtest]'" in done.stderr
    assert "Traceback" not in done.stderr
