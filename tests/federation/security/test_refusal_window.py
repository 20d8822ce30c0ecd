"""RefusalWindow: the first refusal of a key at once, the rest as one count per window."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from federation.security import refusal_window
from federation.security.refusal_window import RefusalWindow


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


def _window(clock: Clock, window_s: float = 60.0) -> tuple[RefusalWindow[tuple[str, str]], list[tuple[str, int, bool]]]:
    written: list[tuple[str, int, bool]] = []

    def record(refusal: tuple[str, str], count: int, summary: dict[str, object] | None) -> None:
        written.append((refusal[1], count, summary is not None))

    return RefusalWindow(record, key=lambda r: r, window_s=window_s, clock=clock), written


def test_first_at_once_the_rest_counted_until_the_window_ends() -> None:
    clock = Clock()
    window, written = _window(clock)
    window(("10.0.0.1", "no certificate"))
    assert written == [("no certificate", 1, False)]
    for _ in range(499):
        window(("10.0.0.1", "no certificate"))
    assert len(written) == 1 and window.pending() == 499
    clock.now += 59
    assert window.flush() == 0  # the window is still open
    clock.now += 1
    assert window.flush() == 1
    assert written[-1] == ("no certificate", 499, True)
    assert sum(count for _, count, _ in written) == 500 and window.pending() == 0


def test_each_peer_and_reason_has_its_own_window() -> None:
    window, written = _window(Clock())
    for peer in ("10.0.0.1", "10.0.0.2"):
        for reason in ("plaintext", "expired"):
            window((peer, reason))
            window((peer, reason))
    assert [count for _, count, _ in written] == [1, 1, 1, 1]
    window.close()
    assert sorted(count for _, count, summary in written if summary) == [1, 1, 1, 1]


def test_a_refusal_after_the_window_writes_the_count_and_opens_a_new_one() -> None:
    clock = Clock()
    window, written = _window(clock)
    window(("p", "r"))
    window(("p", "r"))
    clock.now += 61
    window(("p", "r"))
    assert written == [("r", 1, False), ("r", 1, True), ("r", 1, False)]


def test_close_writes_pending_counts_and_nothing_twice() -> None:
    window, written = _window(Clock())
    window(("p", "r"))
    window(("p", "r"))
    window(("p", "r"))
    window.close()
    window.close()
    assert written == [("r", 1, False), ("r", 2, True)]


def test_keys_beyond_the_bound_share_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(refusal_window, "MAX_TRACKED", 3)
    window, written = _window(Clock())
    for i in range(10):
        window((f"10.0.0.{i}", "flood"))
    assert len(written) == 4  # three tracked peers, then one shared key for all the others
    window.close()
    assert sum(count for _, count, _ in written) == 10


def test_a_failing_writer_does_not_raise() -> None:
    def broken(refusal: object, count: int, summary: object) -> None:
        raise OSError("disk full")

    window: RefusalWindow[str] = RefusalWindow(broken, key=lambda r: r)
    window("x")  # logged, not raised: a refusal must never take the server down
    window.close()
