"""k-anonymity by generalisation and suppression (privacy.kanonymity), held to an independent count."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence

import pytest

from federation.errors import InvalidInput
from privacy.kanonymity import (
    SUPPRESSED,
    KAnonymityPolicy,
    KAnonymityRefused,
    QuasiIdentifierError,
    Value,
    anonymise,
    generalise,
)

COLUMNS = ("age", "postcode", "sex")


def smallest_class(rows: Sequence[Mapping[str, object] | None], columns: Sequence[str]) -> int:
    """k recomputed here, not by the module: the size of the rarest combination of shown values."""
    counts = Counter(tuple(row[c] for c in columns) for row in rows if row is not None)
    return min(counts.values())


def people(n: int, *, seed: int = 3) -> list[dict[str, Value]]:
    rng = random.Random(seed)
    return [
        {"age": rng.randint(20, 80), "postcode": f"{rng.randint(1000, 4999)}", "sex": rng.choice(["female", "male"])}
        for _ in range(n)
    ]


def test_generalisation_hierarchies() -> None:
    assert [generalise(54, "numeric", lv, max_level=4) for lv in range(5)] == [54, "50-54", "50-59", "40-59", "*"]
    assert [generalise("1234", "prefix", lv, max_level=4) for lv in range(5)] == [
        "1234",
        "123*",
        "12**",
        "1***",
        "*",  # the top of every hierarchy is the one value SUPPRESSED, whatever the length
    ]
    assert generalise("female", "categorical", 1, max_level=1) == SUPPRESSED


def test_a_dataset_below_k_is_generalised_to_k_with_a_report() -> None:
    rows = people(200)
    assert smallest_class(rows, COLUMNS) < 5  # unique people: k = 1 as collected
    result = anonymise(rows, COLUMNS, policy=KAnonymityPolicy(k=5, max_suppression=0.1))
    report = result.report
    assert report.k_before == smallest_class(rows, COLUMNS)
    assert report.changed and any(c.level > 0 for c in report.columns)
    kept = [row for row in result.rows if row is not None]
    assert smallest_class(kept, COLUMNS) >= 5 == report.k  # independently: every class has at least k
    assert report.k_achieved == smallest_class(kept, COLUMNS)
    assert report.records_in == 200 and report.records_out == len(kept) == 200 - report.suppressed
    assert report.suppressed <= 0.1 * 200
    # each kept row shows its original values at the reported level of each column
    levels = {c.column: (c.kind, c.level, c.max_level) for c in report.columns}
    for original, shown in zip(rows, result.rows, strict=True):
        if shown is not None:
            for column, (kind, level, top) in levels.items():
                assert shown[column] == generalise(original[column], kind, level, max_level=top)  # type: ignore[arg-type]
    as_json = report.to_json()
    assert {c["column"] for c in report.to_json()["columns"]} == set(COLUMNS)  # type: ignore[attr-defined]
    assert as_json["suppressed"] == report.suppressed and as_json["k_achieved"] == report.k_achieved


def test_a_k_anonymous_dataset_is_left_as_it_is() -> None:
    rows: list[dict[str, Value]] = [{"age": 40, "postcode": "1000", "sex": "female"}] * 5
    rows += [{"age": 41, "postcode": "1001", "sex": "male"}] * 6
    report = anonymise(rows, COLUMNS, policy=KAnonymityPolicy(k=5)).report
    assert not report.changed and report.k_achieved == report.k_before == 5


def test_suppression_is_preferred_to_generalising_everyone_for_a_few_outliers() -> None:
    common: list[dict[str, Value]] = [{"age": 40, "postcode": "1000", "sex": "female"}] * 60
    outliers: list[dict[str, Value]] = [{"age": 90, "postcode": "9999", "sex": "male"}]
    result = anonymise(common + outliers, COLUMNS, policy=KAnonymityPolicy(k=5, max_suppression=0.05))
    assert result.report.suppressed == 1 and result.rows[-1] is None
    assert all(c.level == 0 for c in result.report.columns)


def test_no_suppression_allowed_forces_generalisation() -> None:
    rows = people(60)
    report = anonymise(rows, COLUMNS, policy=KAnonymityPolicy(k=5, max_suppression=0.0)).report
    assert report.suppressed == 0 and report.k_achieved >= 5


def test_fewer_records_than_k_is_refused() -> None:
    with pytest.raises(KAnonymityRefused, match=r"4 records cannot be made 5-anonymous") as caught:
        anonymise(people(4), COLUMNS, policy=KAnonymityPolicy(k=5, max_suppression=0.1))
    assert caught.value.http_status == 409


def test_a_missing_quasi_identifier_is_an_input_error() -> None:
    rows: list[dict[str, Value]] = [*people(9), {"age": 30, "postcode": "1000"}]
    with pytest.raises(QuasiIdentifierError, match="record 10: quasi-identifier 'sex'"):
        anonymise(rows, COLUMNS, policy=KAnonymityPolicy())


@pytest.mark.parametrize("bad", [{"k": 0}, {"max_suppression": 1.0}, {"max_suppression": -0.1}])
def test_policy_bounds(bad: dict[str, float]) -> None:
    with pytest.raises(InvalidInput):
        KAnonymityPolicy(**bad)  # type: ignore[arg-type]
