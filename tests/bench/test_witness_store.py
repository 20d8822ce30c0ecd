"""The witness-store benchmark runs both arms on a real store and says what each read."""

from __future__ import annotations

from bench.witness_store import run


def test_both_arms_check_real_pushes_and_report_their_spread() -> None:
    (row,) = run([200], repeats=3)["rows"]
    assert row["stored"] == 200
    for arm in ("incremental", "whole_file"):
        values = row[arm]["values_ms"]
        assert len(values) == 3 and row[arm]["min_ms"] <= row[arm]["median_ms"] <= row[arm]["max_ms"]
    # the incremental arm reads one stored line a push; the other, the whole file (200 lines and more)
    assert row["whole_file"]["reads_bytes"] >= 200 * row["incremental"]["reads_bytes"]
    assert row["ratio_whole_to_incremental"] > 0
