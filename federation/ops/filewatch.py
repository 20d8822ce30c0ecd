"""Notice files that change on disk (renewed certificates, a new CRL, added API keys).

Parties pick up PKI changes by polling a few small files: cheaper and more portable than
inotify, and the 60-second revocation bound needs only a poll interval of seconds.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger("fedseek.filewatch")

Stamp = tuple[float, int]
MISSING: Stamp = (0.0, -1)


def stamp(path: Path | None) -> Stamp:
    """(mtime, size) of `path`, or MISSING; atomic replacements always change it."""
    if path is None:
        return MISSING
    try:
        st = path.stat()
    except OSError:
        return MISSING
    return (st.st_mtime, st.st_size)


class FileWatcher:
    """Calls `on_change()` from a daemon thread whenever any of `paths` changes."""

    def __init__(self, paths: Sequence[Path | None], on_change: Callable[[], object], *, interval: float = 2.0) -> None:
        self.paths = list(paths)
        self.on_change = on_change
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last = self._stamps()

    def _stamps(self) -> tuple[Stamp, ...]:
        return tuple(stamp(p) for p in self.paths)

    def poll(self) -> bool:
        """Check once; returns whether `on_change` ran."""
        now = self._stamps()
        if now == self._last:
            return False
        self._last = now
        try:
            self.on_change()
        except Exception:  # keep watching: the next change may be the fix
            log.exception("reacting to a file change failed")
        return True

    def start(self) -> FileWatcher:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="filewatch", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()
