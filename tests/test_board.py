"""The decode board: workers of one host see which of the others decode a final."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from services.common.board import DecodeBoard, board_at

MARKER = """
import sys
from services.common.board import DecodeBoard
board = DecodeBoard(sys.argv[1])
with board.decoding():
    print("decoding", flush=True)
    sys.stdin.readline()
print("done", flush=True)
sys.stdin.readline()
"""


def test_another_process_decoding_shows_on_the_board_and_a_dead_ones_mark_goes(
    tmp_path: Path,
) -> None:
    mine = DecodeBoard(tmp_path)
    assert mine.others_decoding() == 0
    with subprocess.Popen(
        [sys.executable, "-c", MARKER, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as other:
        assert other.stdout is not None and other.stdin is not None
        assert other.stdout.readline().strip() == "decoding"
        assert mine.others_decoding() == 1
        with mine.decoding():  # its own mark is never counted
            assert mine.others_decoding() == 1
        other.stdin.write("\n")
        other.stdin.flush()
        assert other.stdout.readline().strip() == "done"
        assert mine.others_decoding() == 0
        other.kill()
    # a worker killed mid-decode leaves "1" behind: read as not decoding, and removed;
    # so is a dead worker's "0", so that the folder does not fill with the departed
    for mark in (b"1", b"0"):
        stale = tmp_path / str(other.pid)
        stale.write_bytes(mark)
        assert mine.others_decoding() == 0
        assert not stale.exists()
    mine.close()


def test_marks_count_concurrent_decodes_of_one_process(tmp_path: Path) -> None:
    board = DecodeBoard(tmp_path)
    own = tmp_path / str(os.getpid())
    with board.decoding():
        with board.decoding():
            assert own.read_bytes() == b"1"
        assert own.read_bytes() == b"1"  # the other executor thread still decodes
    assert own.read_bytes() == b"0"
    board.close()
    assert not own.exists()


def test_no_board_where_none_is_set_or_usable(tmp_path: Path) -> None:
    assert board_at("") is None
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert board_at(str(blocker / "board")) is None  # a file in the way: no board, no crash
