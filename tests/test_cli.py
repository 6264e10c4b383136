"""`escapement up` and `escapement transcribe` as a user runs them: real processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import psutil
import pytest

from services.audio import write_wav
from tests.conftest import free_port, wer

pytestmark = pytest.mark.slow

ESCAPEMENT = [sys.executable, "-m", "services.cli"]


class Up:
    def __init__(self, proc: subprocess.Popen[str], url: str, lines: list[str]) -> None:
        self.proc, self.url, self.lines = proc, url, lines

    def children(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def workers(self) -> list[psutil.Process]:
        found = []
        for p in self.children():
            try:
                if "services.worker" in " ".join(p.cmdline()):
                    found.append(p)
            except (psutil.ZombieProcess, psutil.NoSuchProcess):
                continue  # a worker that just died, not yet reaped
        return found

    def kill(self) -> None:
        """Whatever happened: the whole group (nats-server, workers) goes too."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        finally:
            if self.proc.stdout:
                self.proc.stdout.close()


def start_up(tmp_path: Path, workers: int) -> Up:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "NATS_URL"}
    proc = subprocess.Popen(
        [
            *ESCAPEMENT,
            "up",
            "--port",
            str(port),
            "--data-dir",
            str(tmp_path / "data"),
            "--workers",
            str(workers),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,  # its own process group: a failed test kills it all
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if (workers == 0 and "no workers" in line) or re.search(
            rf"{workers} worker\(s\) ready", line
        ):
            return Up(proc, f"http://127.0.0.1:{port}", lines)
    Up(proc, "", lines).kill()
    raise AssertionError("escapement up did not come up:\n" + "".join(lines))


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
    assert any("Escapement is up" in line for line in up.lines)
    # the embedded nats-server wants the generated credentials, which are never printed
    url = (tmp_path / "data" / "nats.url").read_text()
    password = url.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
    assert password and not any(password in line for line in up.lines)
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
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        fresh = [w for w in up.workers() if w.pid != worker.pid and w.is_running()]
        if fresh:
            break
        time.sleep(0.2)
    assert fresh, "worker was not restarted"

    family = up.children()
    assert up.stop() == 0
    time.sleep(0.5)
    assert not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], (
        "orphans left"
    )


def test_up_without_workers_refuses_with_a_reason(tmp_path: Path, wav: tuple[Path, str]) -> None:
    up = start_up(tmp_path, workers=0)
    try:
        done = transcribe(str(wav[0]), "--url", up.url, "--fast")
        assert done.returncode == 3
        assert "503" in done.stderr and "no_workers" in done.stderr
        assert up.stop() == 0
    finally:
        up.kill()


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
