"""Chat records minimised before training (privacy.minimise): quasi-identifiers k-anonymous in `meta` and in
the note text alike, direct identifiers redacted, a report of what changed."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from privacy.kanonymity import KAnonymityPolicy, KAnonymityRefused
from privacy.minimise import (
    WITHHELD,
    DatasetConfig,
    DatasetConfigError,
    load_dataset_config,
    minimise_records,
)

DEMO = DatasetConfig(quasi_identifiers=("age", "postcode", "sex"))


def demo_records(n: int, *, seed: int = 5) -> list[dict[str, Any]]:
    """Records shaped as the demo's (examples/demo/data.py; its own tests use the real generator)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        age, postcode, sex = rng.randint(18, 90), f"{rng.randint(1000, 4999)}", rng.choice(["female", "male"])
        text = f"{age}-year-old {sex}, postcode {postcode}. Presents with chest pain.\nWhich department?"
        out.append(
            {
                "messages": [
                    {"role": "system", "content": "You are a triage assistant."},
                    {"role": "user", "content": text},
                    {"role": "assistant", "content": "cardiology"},
                ],
                "meta": {"age": age, "postcode": postcode, "sex": sex},
            }
        )
    return out


def note(record: dict[str, Any]) -> str:
    return str(record["messages"][-2]["content"])  # the user's message: the answer comes last


def test_records_below_k_are_generalised_in_meta_and_text_with_a_report() -> None:
    records = demo_records(100)
    result = minimise_records(records, dataset=DEMO, policy=KAnonymityPolicy(k=5, max_suppression=0.1))
    report = result.report.to_json()
    assert report["k_before"] == 1 and report["k_achieved"] >= 5 and report["records_out"] == len(result.records)
    assert any(c["level"] > 0 for c in report["columns"])
    for record in result.records:
        shown = {c: WITHHELD if v == "*" else str(v) for c, v in record["meta"].items()}
        assert note(record).startswith(f"{shown['age']}-year-old {shown['sex']}, postcode {shown['postcode']}. ")


def test_a_withheld_sex_leaves_male_inside_female_alone() -> None:
    records = [
        {
            "prompt": f"{sex} patient; female relative present",
            "completion": "neurology",
            "meta": {"sex": sex},
        }
        for sex in ["male"] * 4 + ["female"]
    ]
    result = minimise_records(records, dataset=DatasetConfig(("sex",)), policy=KAnonymityPolicy(k=5, max_suppression=0))
    assert [r["prompt"] for r in result.records][:2] == [
        "[withheld] patient; female relative present",
        "[withheld] patient; female relative present",
    ]
    assert result.records[4]["prompt"] == "[withheld] patient; [withheld] relative present"  # its own value, anywhere
    assert result.report.text_rewrites == {"sex": 6}


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


def test_no_dataset_config_declares_nothing(tmp_path: Path) -> None:
    assert load_dataset_config(tmp_path) == DatasetConfig()


@pytest.mark.parametrize("body", ['{"quasi_identifier": ["age"]}', '{"quasi_identifiers": "age"}', "[", "[]"])
def test_a_malformed_dataset_config_is_refused(tmp_path: Path, body: str) -> None:
    (tmp_path / "dataset.json").write_text(body)
    with pytest.raises(DatasetConfigError):
        load_dataset_config(tmp_path)
