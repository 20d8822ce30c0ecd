"""Data minimisation of a site's chat records before they are trained on.

A dataset config (`dataset.json` beside the data) declares which fields of each record's `meta`
are quasi-identifiers (age, postcode, sex in the demo data) and which are direct identifiers
(a name, a record number). `minimise_records`:

1. makes the quasi-identifiers k-anonymous under the site's policy (`privacy.kanonymity`):
   generalised levels, records in classes still below k suppressed, or a refusal (409);
2. rewrites the record's text to match: a note that says "54-year-old female, postcode 1234"
   says "50-59-year-old [withheld], postcode 12**" once age is banded, sex withheld and the
   postcode masked, since a model trained on the note would otherwise still see the originals;
3. redacts direct identifiers from every message (`privacy.redact`), the record's own declared
   direct-identifier values included.

Everything is a pure function of the records and the policy; the report says per column what it
became, how many text mentions were rewritten, how many records were dropped and k achieved.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from federation.errors import InvalidInput
from privacy.kanonymity import (
    SUPPRESSED,
    KAnonymityPolicy,
    Kind,
    KReport,
    QuasiIdentifierError,
    Value,
    anonymise,
)
from privacy.redact import redact

__all__ = [
    "DATASET_CONFIG",
    "WITHHELD",
    "DatasetConfig",
    "MinimisationReport",
    "Minimised",
    "load_dataset_config",
    "minimise_records",
]

DATASET_CONFIG = "dataset.json"
WITHHELD = "[withheld]"
"""What the text shows where a quasi-identifier is suppressed."""


class DatasetConfigError(InvalidInput, ValueError):
    """dataset.json is unreadable or malformed."""


@dataclass(frozen=True)
class DatasetConfig:
    """What the data steward declares about the records' `meta` fields."""

    quasi_identifiers: tuple[str, ...] = ()
    direct_identifiers: tuple[str, ...] = ()

    def to_json(self) -> dict[str, list[str]]:
        return {"quasi_identifiers": list(self.quasi_identifiers), "direct_identifiers": list(self.direct_identifiers)}


def load_dataset_config(data_dir: Path) -> DatasetConfig:
    """`data_dir/dataset.json`, or an empty declaration when there is none (nothing to generalise)."""
    path = Path(data_dir) / DATASET_CONFIG
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return DatasetConfig()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetConfigError(f"{path}: unreadable dataset config ({type(exc).__name__})") from exc
    if not isinstance(raw, dict) or set(raw) - {"quasi_identifiers", "direct_identifiers"}:
        raise DatasetConfigError(f"{path}: expected an object with quasi_identifiers and direct_identifiers only")
    lists = {key: raw.get(key, []) for key in ("quasi_identifiers", "direct_identifiers")}
    for key, value in lists.items():
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise DatasetConfigError(f"{path}: {key} must be a list of field names")
    return DatasetConfig(tuple(lists["quasi_identifiers"]), tuple(lists["direct_identifiers"]))


@dataclass(frozen=True)
class MinimisationReport:
    """What minimisation changed in one set of records."""

    quasi_identifiers: tuple[str, ...]
    k: KReport | None  # None: no quasi-identifiers declared
    text_rewrites: dict[str, int] = field(default_factory=dict)  # per column: mentions rewritten in the text
    redacted: dict[str, int] = field(default_factory=dict)  # per kind of direct identifier

    @property
    def changed(self) -> bool:
        return bool((self.k is not None and self.k.changed) or any(self.text_rewrites.values()) or self.redacted)

    def to_json(self) -> dict[str, Any]:
        return {
            "quasi_identifiers": list(self.quasi_identifiers),
            **(self.k.to_json() if self.k is not None else {}),
            "text_rewrites": dict(self.text_rewrites),
            "redacted": dict(self.redacted),
        }


@dataclass(frozen=True)
class Minimised:
    """The kept records, minimised, with the index each had in the input, and the report."""

    records: list[dict[str, Any]]
    kept: list[int]
    report: MinimisationReport


def _mention(column: str, kind: Kind, value: Value) -> re.Pattern[str]:
    """Where a record's text states this value: an age next to "year(s) old"/"aged"; anything else as a
    whole token. Ages need the context: "blood glucose 25 mmol/L" is no age."""
    text = re.escape(str(value))
    if kind == "numeric":
        return re.compile(
            rf"(?<![\w.])(?:(?P<pre>(?i:aged?|age:)\s*){text}(?!\w|\.\d)|{text}(?=[\s-]*(?i:years?|yrs?|y/?o)\b))"
        )
    return re.compile(rf"(?<![\w]){text}(?![\w])", re.IGNORECASE)


def _rewrite(text: str, pattern: re.Pattern[str], shown: Value) -> tuple[str, int]:
    label = WITHHELD if shown == SUPPRESSED else str(shown)
    has_prefix = "pre" in pattern.groupindex  # "aged 54": keep "aged ", replace the number
    return pattern.subn(lambda m: (m.group("pre") or "") + label if has_prefix else label, text)


def _meta(record: Mapping[str, Any], index: int) -> Mapping[str, Any]:
    meta = record.get("meta", {})
    if not isinstance(meta, Mapping):
        raise QuasiIdentifierError(f"record {index + 1}: 'meta' must be an object")
    return meta


def _texts(record: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    """(container, key) of every text a record carries: chat message contents or prompt/completion."""
    if isinstance(record.get("messages"), list):
        return [(m, "content") for m in record["messages"] if isinstance(m, dict) and isinstance(m.get("content"), str)]
    return [(record, key) for key in ("prompt", "completion") if isinstance(record.get(key), str)]


def minimise_records(
    records: Sequence[Mapping[str, Any]], *, dataset: DatasetConfig, policy: KAnonymityPolicy
) -> Minimised:
    """The records minimised as the module docstring says; KAnonymityRefused (409) if k cannot be met
    within the policy's suppression limit, QuasiIdentifierError (400) if a record lacks a declared field."""
    columns = dataset.quasi_identifiers
    metas = [_meta(r, i) for i, r in enumerate(records)]
    k_report: KReport | None = None
    shown_rows: list[dict[str, Value] | None] = [None] * len(records)
    kinds: dict[str, Kind] = {}
    if columns:
        rows = [{c: m.get(c) for c in columns} for m in metas]
        result = anonymise(rows, columns, policy=policy)  # type: ignore[arg-type]  # checked there
        k_report, shown_rows = result.report, result.rows
        kinds = {change.column: change.kind for change in result.report.columns}
    rewrites: Counter[str] = Counter()
    redacted: Counter[str] = Counter()
    out: list[dict[str, Any]] = []
    kept: list[int] = []
    for index, (record, meta) in enumerate(zip(records, metas, strict=True)):
        shown = shown_rows[index]
        if columns and shown is None:
            continue  # suppressed: in a class smaller than k at the chosen levels
        copy: dict[str, Any] = json.loads(json.dumps(record))  # never alter the caller's records
        names = [str(meta[f]) for f in dataset.direct_identifiers if meta.get(f) not in (None, "")]
        changes = [
            (column, _mention(column, kinds[column], meta[column]), value)
            for column, value in (shown or {}).items()
            if value != meta[column]
        ]
        for container, key in _texts(copy):
            text = container[key]
            for column, pattern, value in changes:
                text, n = _rewrite(text, pattern, value)
                rewrites[column] += n
            result_text = redact(text, names=names)
            container[key] = result_text.text
            redacted.update(result_text.counts)
        new_meta = {k: v for k, v in meta.items() if k not in dataset.direct_identifiers}
        if shown is not None:
            new_meta.update(shown)
        if "meta" in copy or new_meta:
            copy["meta"] = new_meta
        out.append(copy)
        kept.append(index)
    report = MinimisationReport(
        quasi_identifiers=tuple(columns),
        k=k_report,
        text_rewrites={c: rewrites[c] for c in columns},
        redacted=dict(redacted),
    )
    return Minimised(records=out, kept=kept, report=report)
