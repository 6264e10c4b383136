"""Which workers on this host are decoding a final right now.

Workers that share a host's cores say so in one folder (`ESCAPEMENT_DECODE_BOARD`,
services/worker/settings.py; `escapement up` makes one in its data dir). Each keeps
one file named after its pid, holding b"1" while it decodes a final and b"0"
otherwise. A worker reads the others' files before it picks how many threads its
encoder takes (services/worker/engines.py): two when the other core is free, one when
another worker's final holds it. Reading costs a directory scan and a one-byte read
per worker, some 20 us.

The board is advice about CPU time, never about correctness: a missing, unreadable or
stale file reads as "not decoding". A file whose process is gone is removed by the
next reader that notices.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


class DecodeBoard:
    """This process's place on the board in `folder` (one per process: `board_at`)."""

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._pid = os.getpid()
        self._own = self.folder / str(self._pid)
        self._fd = os.open(self._own, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self._fd, b"0", 0)
        self._lock = threading.Lock()
        self._decoding = 0  # finals this process decodes now (executor threads)
        self._unreadable = False  # said once

    @contextlib.contextmanager
    def decoding(self) -> Iterator[None]:
        """Marks this worker as decoding a final while the block runs."""
        self._mark(+1)
        try:
            yield
        finally:
            self._mark(-1)

    def _mark(self, step: int) -> None:
        with self._lock:
            self._decoding += step
            os.pwrite(self._fd, b"1" if self._decoding > 0 else b"0", 0)

    def others_decoding(self) -> int:
        """How many other workers on the board are decoding a final now."""
        busy = 0
        try:
            entries = list(os.scandir(self.folder))
        except OSError as exc:
            if not self._unreadable:
                self._unreadable = True
                log.warning("decode board %s unreadable (%r): read as idle", self.folder, exc)
            return 0
        for entry in entries:
            if not entry.name.isdigit() or int(entry.name) == self._pid:
                continue
            if not _alive(int(entry.name)):
                with contextlib.suppress(OSError):  # another reader may have removed it
                    os.unlink(entry.path)
                continue
            try:
                with open(entry.path, "rb") as f:
                    busy += f.read(1) == b"1"
            except OSError:  # its worker is just leaving
                continue
        return busy

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)
        with contextlib.suppress(OSError):
            os.unlink(self._own)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # PermissionError: someone else's process, alive
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


@functools.cache
def board_at(folder: str) -> DecodeBoard | None:
    """The process's one board in `folder` (every engine of a worker and its look gate
    share it); None for "" or a folder that cannot be used, said once."""
    if not folder:
        return None
    try:
        return DecodeBoard(folder)
    except OSError as exc:
        log.warning("no decode board at %s (%r): the encoder's threads stay fixed", folder, exc)
        return None
