"""Tests for the synthetic non-IID demo data."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from fedseek_examples.demo.data import (
    DEPARTMENTS,
    FINDINGS,
    QUESTION,
    SYSTEM_PROMPT,
    ClinicalRecord,
    generate_site_records,
    question_for,
    write_site_dataset,
)

from node.data import load_jsonl

N_SITES = 3


def _histogram(site_index: int, *, n: int = 300, seed: int = 7) -> Counter[str]:
    records = generate_site_records(site_index=site_index, n_sites=N_SITES, n=n, seed=seed)
    return Counter(r.answer for r in records)


def test_same_seed_same_records() -> None:
    a = generate_site_records(site_index=1, n_sites=N_SITES, n=50, seed=11)
    b = generate_site_records(site_index=1, n_sites=N_SITES, n=50, seed=11)
    assert a == b


def test_other_seed_or_site_gives_other_records() -> None:
    base = generate_site_records(site_index=0, n_sites=N_SITES, n=50, seed=11)
    assert generate_site_records(site_index=0, n_sites=N_SITES, n=50, seed=12) != base
    assert generate_site_records(site_index=1, n_sites=N_SITES, n=50, seed=11) != base


def test_top_department_differs_across_sites() -> None:
    tops = [_histogram(i).most_common(1)[0][0] for i in range(N_SITES)]
    assert len(set(tops)) == N_SITES
    assert tops == [DEPARTMENTS[i] for i in range(N_SITES)]


def test_department_histograms_are_skewed() -> None:
    for i in range(N_SITES):
        hist = _histogram(i)
        assert hist[DEPARTMENTS[i]] > 2 * hist[DEPARTMENTS[(i + 1) % N_SITES]]


def test_sites_have_disjoint_postcodes_and_different_ages() -> None:
    sites = [generate_site_records(site_index=i, n_sites=N_SITES, n=200, seed=7) for i in range(3)]
    postcodes = [{r.postcode for r in records} for records in sites]
    assert not postcodes[0] & postcodes[1]
    assert not postcodes[1] & postcodes[2]
    mean_ages = [sum(r.age for r in records) / len(records) for records in sites]
    assert mean_ages[0] + 10 < mean_ages[-1]


def test_records_are_well_formed() -> None:
    for i in range(N_SITES):
        for record in generate_site_records(site_index=i, n_sites=N_SITES, n=100, seed=3):
            assert record.answer in DEPARTMENTS
            assert f"{record.age}-year-old {record.sex}" in record.note
            assert record.postcode in record.note
            assert len(record.postcode) == 4 and record.postcode.isdigit()
            assert record.sex in {"female", "male"}
            assert 18 <= record.age <= 95
            own = sum(phrase in record.note for phrase in FINDINGS[record.answer])
            assert own == 2


def test_to_chat_and_question_for() -> None:
    record = ClinicalRecord(
        note="60-year-old male, postcode 1234. Reports troponin elevated.",
        age=60,
        postcode="1234",
        sex="male",
        answer="cardiology",
    )
    chat = record.to_chat()
    assert chat["messages"] == [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": f"{record.note}\n{QUESTION}"},
        {"role": "assistant", "content": "cardiology"},
    ]
    assert chat["meta"] == {"age": 60, "postcode": "1234", "sex": "male"}
    assert question_for(record) == chat["messages"][:2]


def test_write_site_dataset_round_trips(tmp_path: Path) -> None:
    train, evaluation = write_site_dataset(
        tmp_path / "site1", site_index=1, n_sites=N_SITES, n_train=20, n_eval=5, seed=7
    )
    assert (train, evaluation) == (
        tmp_path / "site1/train.jsonl",
        tmp_path / "site1/eval.jsonl",
    )
    train_examples, eval_examples = load_jsonl(train), load_jsonl(evaluation)
    assert (len(train_examples), len(eval_examples)) == (20, 5)
    expected = generate_site_records(site_index=1, n_sites=N_SITES, n=25, seed=7)
    assert [e.answer for e in train_examples + eval_examples] == [r.answer for r in expected]
    assert train_examples[0].prompt_messages == question_for(expected[0])
    first = json.loads(train.read_text(encoding="utf-8").splitlines()[0])
    assert first["meta"]["postcode"] == expected[0].postcode


def test_write_site_dataset_is_deterministic(tmp_path: Path) -> None:
    a, _ = write_site_dataset(tmp_path / "a", site_index=2, n_sites=N_SITES)
    b, _ = write_site_dataset(tmp_path / "b", site_index=2, n_sites=N_SITES)
    assert a.read_bytes() == b.read_bytes()
    assert len(a.read_text(encoding="utf-8").splitlines()) == 160


@pytest.mark.parametrize(("site_index", "n_sites", "n"), [(3, 3, 1), (-1, 3, 1), (0, 0, 1), (0, 3, -1)])
def test_bad_arguments_raise(site_index: int, n_sites: int, n: int) -> None:
    with pytest.raises(ValueError):
        generate_site_records(site_index=site_index, n_sites=n_sites, n=n, seed=0)
