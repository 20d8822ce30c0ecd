"""Chat records minimised before training (privacy.minimise): quasi-identifiers k-anonymous in `meta` and in
the note text alike, direct identifiers redacted, a report of what changed."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from fedseek_examples.demo.data import generate_site_records, write_site_dataset

from privacy.kanonymity import KAnonymityPolicy, KAnonymityRefused
from privacy.minimise import (
    WITHHELD,
    DatasetConfig,
    DatasetConfigError,
    load_dataset_config,
    minimise_records,
)

DEMO = DatasetConfig(quasi_identifiers=("age", "postcode", "sex"))


def demo_records(n: int, *, site_index: int = 0) -> list[dict[str, Any]]:
    return [r.to_chat() for r in generate_site_records(site_index=site_index, n_sites=3, n=n, seed=7)]


def note(record: dict[str, Any]) -> str:
    return str(record["messages"][-2]["content"])  # the user's message: the answer comes last


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


def test_a_glucose_of_25_is_not_an_age_of_25() -> None:
    records = [
        {
            "messages": [
                {
                    "role": "user",
                    "content": f"{age}-year-old male, postcode 2000. Blood glucose 25 mmol/L, aged {age}.",
                },
                {"role": "assistant", "content": "endocrinology"},
            ],
            "meta": {"age": age, "postcode": "2000", "sex": "male"},
        }
        for age in [25] * 3 + [27] * 3
    ]
    result = minimise_records(records, dataset=DEMO, policy=KAnonymityPolicy(k=6, max_suppression=0.0))
    assert {r["meta"]["age"] for r in result.records} == {"25-29"}
    assert note(result.records[0]) == ("25-29-year-old male, postcode 2000. Blood glucose 25 mmol/L, aged 25-29.")


def test_direct_identifier_fields_are_dropped_from_meta_and_redacted_from_the_text() -> None:
    records = demo_records(20)
    for i, record in enumerate(records):
        record["meta"].update(name=f"Anna Nowak{i}", mrn=f"X{i:07d}")
        record["messages"][1]["content"] = f"Anna Nowak{i} (ref X{i:07d}), tel 020 7946 0958. " + note(record)
    dataset = DatasetConfig(quasi_identifiers=("age", "postcode", "sex"), direct_identifiers=("name", "mrn"))
    result = minimise_records(records, dataset=dataset, policy=KAnonymityPolicy(k=5))
    text = json.dumps(result.records)
    assert "Nowak" not in text and "X000" not in text and "7946" not in text
    assert all(set(r["meta"]) == {"age", "postcode", "sex"} for r in result.records)
    assert result.report.redacted["phone"] == 20 and result.report.redacted["name"] >= 20


def test_too_few_records_are_refused() -> None:
    with pytest.raises(KAnonymityRefused, match="cannot be made 5-anonymous"):
        minimise_records(demo_records(3), dataset=DEMO, policy=KAnonymityPolicy(k=5))


def test_no_declared_quasi_identifiers_still_redacts() -> None:
    records = [
        {"prompt": "Mr John Smith, chest pain. Department?", "completion": "cardiology", "meta": {"age": 40}},
    ]
    result = minimise_records(records, dataset=DatasetConfig(), policy=KAnonymityPolicy(k=5))
    assert result.report.k is None and result.records[0]["prompt"] == "Mr [NAME], chest pain. Department?"


def test_the_demo_writes_its_dataset_config(tmp_path: Path) -> None:
    write_site_dataset(tmp_path, site_index=0, n_sites=3, n_train=10, n_eval=2)
    assert load_dataset_config(tmp_path) == DEMO
    assert load_dataset_config(tmp_path / "elsewhere") == DatasetConfig()  # none: nothing declared


@pytest.mark.parametrize("body", ['{"quasi_identifier": ["age"]}', '{"quasi_identifiers": "age"}', "[", "[]"])
def test_a_malformed_dataset_config_is_refused(tmp_path: Path, body: str) -> None:
    (tmp_path / "dataset.json").write_text(body)
    with pytest.raises(DatasetConfigError):
        load_dataset_config(tmp_path)
