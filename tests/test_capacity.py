"""The capacity benchmark at CI size: a sweep over session counts on recorded speech, the
one-process ceiling, and an overload that is refused up front (loadtest/capacity.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(400)


def test_capacity_sweep_ceiling_and_overload(tmp_path: Path) -> None:
    out = tmp_path / "capacity.json"
    # one session per worker pair: at 2x that, one device is admitted and one refused
    env = {**os.environ, "ESCAPEMENT_MAX_SESSIONS_PER_WORKER": "0.5", "ESCAPEMENT_WORKERS": "2"}
    done = subprocess.run(
        [
            sys.executable, "-m", "loadtest.capacity", "--sessions", "1,2", "--session-s", "12",
            "--workers", "2", "--ceiling-windows", "2", "--overload", "2", "--capacity", "1",
            "--json", str(out),
        ],
        capture_output=True, text=True, timeout=380, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {r["sessions"]: r for r in report["rows"]}
    assert set(rows) == {1, 2}
    for n, row in rows.items():
        # the sweep lifts the cap: every device of every step is admitted and finishes
        assert row["completed"] == n and row["finals"] >= n, row
        assert row["final_p50_ms"] is not None and row["decoded_audio_s_per_s"] > 0
    assert report["ceiling"]["ceiling"] > 0 and report["ceiling"]["windows"] == 2
    [overload] = report["overload"]
    assert overload["devices"] == 2 and overload["admitted"] == 1
    assert overload["refused"] == {"at_capacity": 1}
    assert overload["timed_out"] == 0 and overload["failed"] == 0
    assert overload["final_p95_ms"] is not None
    assert "capacity (p95 <= 1,500 ms)" in done.stdout and "of the ceiling" in done.stdout
