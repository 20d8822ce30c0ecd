"""Refused connections, counted per peer and time window instead of one audit record each.

A client hammering a TLS port (a scanner, a misconfigured site, a flood) would otherwise cost one
fsynced audit record per refused handshake: a thousand in a few seconds, and an audit trail an
auditor cannot read. `RefusalWindow` writes the FIRST refusal of a (peer host, what, reason,
route) at once, so a new peer is on record immediately, and only counts the ones that follow
within `window_s`; when the window ends (or at shutdown, `close`) one more record carries that
count. The counts of a key's records therefore add up to the refusals that happened.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger("fedseek.refusals")

__all__ = ["MAX_TRACKED", "WINDOW_S", "RefusalWindow"]

WINDOW_S = 60.0
MAX_TRACKED = 1024
"""Distinct keys counted at once; refusals beyond that share one key, so memory stays bounded
however many addresses a flood comes from."""
OVERFLOW: tuple[str, ...] = ("*",)

R = TypeVar("R")


@dataclass
class _Tally(Generic[R]):
    opened: float  # monotonic time of the window's first refusal
    first_wall: float  # and its wall-clock time, for the summary record
    last: R
    more: int = 0  # refusals after the first one, not yet written


class RefusalWindow(Generic[R]):
    """Aggregates refusals of type `R`; `record(refusal, count, summary)` writes one audit record.

    `summary` is None for the prompt first record of a window (count 1), else
    `{"window_s", "first", "last"}` for the record closing a window with `count` more.
    """

    def __init__(
        self,
        record: Callable[[R, int, dict[str, object] | None], None],
        key: Callable[[R], Hashable],
        *,
        window_s: float = WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._record = record
        self._key = key
        self.window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._open: dict[Hashable, _Tally[R]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __call__(self, refusal: R) -> None:
        key = self._key(refusal)
        now = self._clock()
        with self._lock:
            if key not in self._open and len(self._open) >= MAX_TRACKED:
                key = OVERFLOW
            tally = self._open.get(key)
            if tally is not None and now - tally.opened < self.window_s:
                tally.more += 1
                tally.last = refusal
                return
            expired = self._open.pop(key, None)
            self._open[key] = _Tally(opened=now, first_wall=time.time(), last=refusal)
        if expired is not None and expired.more:
            self._write(expired)
        self._safe(refusal, 1, None)
        self._ensure_flusher()

    def flush(self, *, everything: bool = False) -> int:
        """Write the counts of windows that have ended (all open ones with `everything`); returns
        how many records that wrote."""
        now = self._clock()
        with self._lock:
            done = [k for k, t in self._open.items() if everything or now - t.opened >= self.window_s]
            closed = [self._open.pop(k) for k in done]
        written = 0
        for tally in closed:
            if tally.more:
                self._write(tally)
                written += 1
        return written

    def close(self) -> None:
        """Stop the flusher and write every pending count (the server is stopping)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self.flush(everything=True)

    def pending(self) -> int:
        """Refusals counted but not yet written."""
        with self._lock:
            return sum(t.more for t in self._open.values())

    # ---- internals ----------------------------------------------------------------------------
    def _write(self, tally: _Tally[R]) -> None:
        summary: dict[str, object] = {
            "window_s": self.window_s,
            "first": _iso(tally.first_wall),
            "last": _iso(time.time()),
        }
        self._safe(tally.last, tally.more, summary)

    def _safe(self, refusal: R, count: int, summary: dict[str, object] | None) -> None:
        try:
            self._record(refusal, count, summary)
        except Exception:  # an audit failure must not take the server down; it is logged
            log.exception("recording a refusal failed")

    def _ensure_flusher(self) -> None:
        if self._thread is not None or self._stop.is_set():
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="refusal-window", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        # Wake a few times per window so a count is written soon after its window ends.
        interval = max(0.05, min(self.window_s / 4, 5.0))
        while not self._stop.wait(interval):
            self.flush()


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
