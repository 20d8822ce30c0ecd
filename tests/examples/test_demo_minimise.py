"""The demo's data through data minimisation (privacy.minimise): its dataset config, its notes made
k-anonymous in `meta` and text alike, and nothing in its notes mistaken for a direct identifier."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from fedseek_examples.demo.data import (
    FINDINGS,
    NEUTRAL_PHRASES,
    QUASI_IDENTIFIERS,
    generate_site_records,
    write_site_dataset,
)

from privacy.kanonymity import KAnonymityPolicy
from privacy.minimise import WITHHELD, DatasetConfig, load_dataset_config, minimise_records
from privacy.redact import redact_text

DEMO = DatasetConfig(quasi_identifiers=QUASI_IDENTIFIERS)


def demo_records(n: int, *, site_index: int = 0) -> list[dict[str, Any]]:
    return [r.to_chat() for r in generate_site_records(site_index=site_index, n_sites=3, n=n, seed=7)]


def note(record: dict[str, Any]) -> str:
    return str(record["messages"][-2]["content"])


def test_demo_records_are_made_k_anonymous_in_meta_and_in_the_text() -> None:
    records = demo_records(160)
    before = json.dumps(records)
    result = minimise_records(records, dataset=DEMO, policy=KAnonymityPolicy(k=5, max_suppression=0.1))
    assert json.dumps(records) == before  # the caller's records are not altered
    report = result.report.to_json()
    assert report["k_before"] == 1 and report["k_achieved"] >= 5
    assert report["records_out"] == len(result.records) == 160 - report["suppressed"]
    classes = Counter(tuple(r["meta"][c] for c in DEMO.quasi_identifiers) for r in result.records)
    assert min(classes.values()) >= 5  # recounted here
    for index, record in zip(result.kept, result.records, strict=True):
        original = records[index]
        meta = original["meta"]
        text = note(record)
        for column in report["columns"]:
            name = column["column"]
            if column["level"] > 0:  # the original value is gone from the note, its generalisation is there
                shown = record["meta"][name]
                label = WITHHELD if shown == "*" else str(shown)
                assert label in text
                rest = text.split(".")[0].replace(label, "")
                assert not re.search(rf"(?<!\w){re.escape(str(meta[name]))}(?!\w)", rest)
        assert record["messages"][-1] == original["messages"][-1]  # the answer is kept
        assert text.split(". ", 1)[1] == note(original).split(". ", 1)[1]  # the clinical findings are kept
    changed = [c["column"] for c in report["columns"] if c["level"] > 0]
    assert changed and all(report["text_rewrites"][c] == len(result.records) for c in changed)
    assert report["redacted"] == {}  # the demo's notes carry no direct identifiers


def test_the_demo_writes_its_dataset_config(tmp_path: Path) -> None:
    write_site_dataset(tmp_path, site_index=0, n_sites=3, n_train=10, n_eval=2)
    assert load_dataset_config(tmp_path) == DEMO
    assert json.loads((tmp_path / "dataset.json").read_text())["quasi_identifiers"] == ["age", "postcode", "sex"]


def test_every_demo_note_is_untouched() -> None:
    """The demo's notes hold no direct identifiers: redaction must not change a word of them."""
    notes = [r.note for i in range(3) for r in generate_site_records(site_index=i, n_sites=3, n=200, seed=7)]
    phrases = [p for findings in FINDINGS.values() for p in findings] + list(NEUTRAL_PHRASES)
    for text in [*notes, *phrases]:
        assert redact_text(text) == text
