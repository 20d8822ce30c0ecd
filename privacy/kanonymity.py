"""k-anonymity over a table's quasi-identifiers, by full-domain generalisation and record suppression.

A table is k-anonymous when every combination of quasi-identifier values it shows (an
equivalence class) is shared by at least k records, so a person known to be in the data by
age, postcode and sex hides among k. `anonymise` searches the generalisation lattice (one level
per column: age in 5-, 10-, 20-year bands then withheld; postcode with 1, 2, ... trailing
characters masked; a category withheld) for the node that loses least, suppressing the
records still in classes smaller than k, and refuses (`KAnonymityRefused`, 409) when no node
keeps the suppressed share within the site's policy.

Why not a library: pycanon and anjana (IFCA) are the maintained Python packages for this, but
both pin numpy==2.0.2 and pandas==2.3.x exactly, which conflicts with the numpy FedSeek pins;
the lattice here is small (tens of nodes) and tests recompute k independently.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from federation.errors import Conflict, InvalidInput

__all__ = [
    "SUPPRESSED",
    "Anonymised",
    "ColumnChange",
    "KAnonymityPolicy",
    "KAnonymityRefused",
    "KReport",
    "Kind",
    "QuasiIdentifierError",
    "Value",
    "anonymise",
    "generalise",
    "k_of",
    "kind_for",
]

SUPPRESSED = "*"
"""The value a column shows at its top level: nothing left of it."""

Kind = Literal["numeric", "prefix", "categorical"]
Value = int | float | str
_BANDS: tuple[int, ...] = (5, 10, 20)  # numeric levels 1..3; level 4 withholds the value
_PREFIX_NAMES = ("postcode", "postal_code", "post_code", "zip", "zipcode", "zip_code")


class KAnonymityRefused(Conflict):
    """k cannot be met within the site's suppression limit: the data must not be trained on as it is."""

    default_code = "k_anonymity_not_met"


class QuasiIdentifierError(InvalidInput, ValueError):
    """A record lacks a declared quasi-identifier, or holds one of the wrong type."""


@dataclass(frozen=True)
class KAnonymityPolicy:
    """The site's policy: every class at least `k` records; at most `max_suppression` of them dropped."""

    k: int = 5
    max_suppression: float = 0.1

    def __post_init__(self) -> None:
        if self.k < 1:
            raise InvalidInput(f"k-anonymity k must be >= 1, got {self.k}")
        if not 0.0 <= self.max_suppression < 1.0:
            raise InvalidInput(f"max_suppression must be in [0, 1), got {self.max_suppression}")


@dataclass(frozen=True)
class ColumnChange:
    """What one column became: its level in the lattice and, in words, what that level shows."""

    column: str
    kind: Kind
    level: int
    max_level: int
    shows: str

    def to_json(self) -> dict[str, object]:
        return {"column": self.column, "kind": self.kind, "level": self.level, "shows": self.shows}


@dataclass(frozen=True)
class KReport:
    """What anonymisation changed, for the audit trail and the operator."""

    k: int
    k_before: int
    k_achieved: int
    records_in: int
    records_out: int
    suppressed: int
    max_suppression: float
    columns: tuple[ColumnChange, ...]

    @property
    def changed(self) -> bool:
        return self.suppressed > 0 or any(c.level > 0 for c in self.columns)

    def to_json(self) -> dict[str, object]:
        return {
            "k": self.k,
            "k_before": self.k_before,
            "k_achieved": self.k_achieved,
            "records_in": self.records_in,
            "records_out": self.records_out,
            "suppressed": self.suppressed,
            "max_suppression": self.max_suppression,
            "columns": [c.to_json() for c in self.columns],
        }


@dataclass(frozen=True)
class Anonymised:
    """The generalised rows (None where a record is suppressed) and the report."""

    rows: list[dict[str, Value] | None]
    report: KReport


def kind_for(column: str, values: Sequence[Value]) -> Kind:
    """Postcodes and zips are masked from the right; numbers banded; anything else withheld whole."""
    if column.lower() in _PREFIX_NAMES:
        return "prefix"
    if values and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return "numeric"
    return "categorical"


def _max_level(kind: Kind, values: Sequence[Value]) -> int:
    if kind == "numeric":
        return len(_BANDS) + 1
    if kind == "prefix":
        return max((len(str(v)) for v in values), default=1)
    return 1


def generalise(value: Value, kind: Kind, level: int, *, max_level: int) -> Value:
    """`value` at `level` of its column's hierarchy (0: as it is; `max_level`: SUPPRESSED)."""
    if level <= 0:
        return value
    if level >= max_level:
        return SUPPRESSED
    if kind == "numeric":
        width = _BANDS[level - 1]
        low = math.floor(float(value) / width) * width
        return f"{low}-{low + width - 1}"
    if kind == "prefix":
        text = str(value)
        cut = min(level, len(text))
        return text[: len(text) - cut] + SUPPRESSED * cut
    return SUPPRESSED  # categorical: level 1 is its top


def _describe(kind: Kind, level: int, max_level: int) -> str:
    if level == 0:
        return "as recorded"
    if level >= max_level:
        return "withheld"
    if kind == "numeric":
        return f"{_BANDS[level - 1]}-wide bands"
    return f"last {level} character{'s' if level > 1 else ''} masked"


def k_of(rows: Sequence[Mapping[str, Value]], columns: Sequence[str]) -> int:
    """The size of the smallest equivalence class over `columns` (0 for no rows)."""
    classes = Counter(tuple(row[c] for c in columns) for row in rows)
    return min(classes.values(), default=0)


def _check_rows(rows: Sequence[Mapping[str, object]], columns: Sequence[str]) -> None:
    for index, row in enumerate(rows):
        for column in columns:
            value = row.get(column)
            if value is None or isinstance(value, bool) or not isinstance(value, int | float | str):
                raise QuasiIdentifierError(
                    f"record {index + 1}: quasi-identifier {column!r} is missing or not a number or string"
                )


def anonymise(rows: Sequence[Mapping[str, Value]], columns: Sequence[str], *, policy: KAnonymityPolicy) -> Anonymised:
    """The least-loss generalisation of `columns` that is k-anonymous after suppressing at most the
    policy's share of records; KAnonymityRefused if there is none (e.g. fewer than k records).

    Loss is the mean, over columns, of level / top level, plus the share of records suppressed:
    one step up a column's hierarchy must buy back more than its share of suppressed records.
    Ties go to fewer suppressed records, then to lower levels, so the result is deterministic.
    """
    _check_rows(rows, columns)
    n = len(rows)
    values = {c: [row[c] for row in rows] for c in columns}
    kinds = {c: kind_for(c, values[c]) for c in columns}
    tops = {c: _max_level(kinds[c], values[c]) for c in columns}
    k_before = k_of(rows, columns)
    best: tuple[tuple[float, int, int, tuple[int, ...]], tuple[int, ...], list[tuple[Value, ...]], set[int]] | None
    best = None
    for levels in itertools.product(*(range(tops[c] + 1) for c in columns)):
        shown = [
            tuple(generalise(row[c], kinds[c], lv, max_level=tops[c]) for c, lv in zip(columns, levels, strict=True))
            for row in rows
        ]
        sizes = Counter(shown)
        dropped = {i for i, key in enumerate(shown) if sizes[key] < policy.k}
        if n - len(dropped) == 0 or len(dropped) > policy.max_suppression * n:
            continue
        loss = sum(lv / tops[c] for c, lv in zip(columns, levels, strict=True)) / max(len(columns), 1)
        rank = (loss + len(dropped) / n, len(dropped), sum(levels), levels)
        if best is None or rank < best[0]:
            best = (rank, levels, shown, dropped)
    if best is None:
        raise KAnonymityRefused(
            f"{n} records cannot be made {policy.k}-anonymous over {', '.join(columns)} without suppressing "
            f"more than {policy.max_suppression:.0%} of them (smallest class now {k_before}); "
            "add records or lower the site's k"
        )
    _, levels, shown, dropped = best
    out: list[dict[str, Value] | None] = [
        None if i in dropped else dict(zip(columns, key, strict=True)) for i, key in enumerate(shown)
    ]
    kept = [row for row in out if row is not None]
    report = KReport(
        k=policy.k,
        k_before=k_before,
        k_achieved=k_of(kept, columns),
        records_in=n,
        records_out=len(kept),
        suppressed=len(dropped),
        max_suppression=policy.max_suppression,
        columns=tuple(
            ColumnChange(column=c, kind=kinds[c], level=lv, max_level=tops[c], shows=_describe(kinds[c], lv, tops[c]))
            for c, lv in zip(columns, levels, strict=True)
        ),
    )
    return Anonymised(rows=out, report=report)
