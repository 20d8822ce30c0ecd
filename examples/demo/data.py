"""Synthetic, non-IID clinical triage notes for the demo consortium.

Each hospital (site) gets its own department mix, postcode band and age profile, so
federated averaging faces the skew real hospitals show. Notes carry quasi-identifiers
(age, postcode, sex) on purpose: the privacy tooling needs something to find.
Everything is derived from a seed, so a demo run is reproducible end to end.
`write_site_dataset` also writes the dataset config (`dataset.json`) that declares those three
fields of each record's `meta` quasi-identifiers, which the node makes k-anonymous before a round.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privacy.minimise import DATASET_CONFIG

DEPARTMENTS: tuple[str, ...] = (
    "cardiology",
    "neurology",
    "respiratory",
    "gastroenterology",
    "orthopedics",
    "endocrinology",
)

SYSTEM_PROMPT = "You are a hospital triage assistant. Answer with one department name."
QUESTION = "Which department should see this patient?"

FINDINGS: dict[str, tuple[str, ...]] = {
    "cardiology": (
        "troponin elevated",
        "chest pain radiating to the left arm",
        "ST elevation on ECG",
        "irregular pulse with palpitations",
        "bilateral ankle oedema and orthopnoea",
    ),
    "neurology": (
        "sudden weakness of the right side",
        "slurred speech since this morning",
        "first generalised seizure",
        "worst headache of life",
        "drooping of the left face",
    ),
    "respiratory": (
        "productive cough for two weeks",
        "wheeze on expiration",
        "oxygen saturation 89% on room air",
        "crackles at the right lung base",
        "shortness of breath on minimal exertion",
    ),
    "gastroenterology": (
        "black tarry stools",
        "epigastric pain after meals",
        "jaundice with pale stools",
        "vomiting blood",
        "chronic bloody diarrhoea",
    ),
    "orthopedics": (
        "swollen ankle after a fall",
        "unable to bear weight on the left leg",
        "deformity of the right wrist",
        "acute locking of the knee",
        "shortened and externally rotated leg",
    ),
    "endocrinology": (
        "HbA1c 10.2%",
        "polyuria and polydipsia",
        "TSH suppressed with tremor",
        "unexplained weight loss and heat intolerance",
        "blood glucose 25 mmol/L",
    ),
}

NEUTRAL_PHRASES: tuple[str, ...] = (
    "no known drug allergies",
    "non-smoker",
    "lives with family",
    "vaccinations up to date",
    "takes no regular medication",
)

_OPENERS: tuple[str, ...] = (
    "Presents with",
    "Reports",
    "Seen today with",
    "Referred with",
)
_PRIMARY_WEIGHT = 6.0  # site i's own department dominates its data
_SECONDARY_WEIGHT = 3.0  # department i+3 is over-represented too
_BASE_WEIGHT = 1.0
_FIRST_POSTCODE = 1000
_LAST_POSTCODE = 9999
QUASI_IDENTIFIERS: tuple[str, ...] = ("age", "postcode", "sex")
"""The `meta` fields a person could be re-identified by in combination (privacy.minimise)."""


@dataclass(frozen=True)
class ClinicalRecord:
    """One synthetic patient note with its quasi-identifiers and gold department."""

    note: str
    age: int
    postcode: str
    sex: str
    answer: str

    def to_chat(self) -> dict[str, Any]:
        """Chat-format JSONL record that node.data.load_jsonl reads; meta feeds privacy audits."""
        return {
            "messages": [
                *question_for(self),
                {"role": "assistant", "content": self.answer},
            ],
            "meta": {"age": self.age, "postcode": self.postcode, "sex": self.sex},
        }


@dataclass(frozen=True)
class _SiteProfile:
    """The per-site distribution that makes the consortium non-IID."""

    department_weights: tuple[float, ...]
    postcode_range: tuple[int, int]
    age_mean: float
    female_share: float


def question_for(record: ClinicalRecord) -> list[dict[str, str]]:
    """System and user messages without the answer: the prompt used at evaluation."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": f"{record.note}\n{QUESTION}"},
    ]


def _check_site(*, site_index: int, n_sites: int) -> None:
    if n_sites < 1:
        raise ValueError(f"n_sites must be >= 1, got {n_sites}")
    if not 0 <= site_index < n_sites:
        raise ValueError(f"site_index must be in [0, {n_sites}), got {site_index}")


def _site_profile(*, site_index: int, n_sites: int, minority_weight: float = _BASE_WEIGHT) -> _SiteProfile:
    """Skewed departments, a disjoint postcode band and an age gradient across sites."""
    n_dept = len(DEPARTMENTS)
    weights = [minority_weight] * n_dept
    weights[(site_index + 3) % n_dept] = _SECONDARY_WEIGHT
    weights[site_index % n_dept] = _PRIMARY_WEIGHT
    band = (_LAST_POSTCODE - _FIRST_POSTCODE + 1) // n_sites
    low = _FIRST_POSTCODE + site_index * band
    position = site_index / max(n_sites - 1, 1)
    return _SiteProfile(
        department_weights=tuple(weights),
        postcode_range=(low, low + band - 1),
        age_mean=35.0 + 30.0 * position,
        female_share=0.4 + 0.2 * position,
    )


def _make_note(*, rng: random.Random, department: str, age: int, postcode: str, sex: str) -> str:
    """Two findings of the true department plus, half the time, a neutral sentence before or after."""
    findings = " and ".join(rng.sample(FINDINGS[department], 2))
    sentences = [f"{rng.choice(_OPENERS)} {findings}."]
    if rng.random() < 0.5:
        neutral = rng.choice(NEUTRAL_PHRASES)
        sentences.insert(rng.randint(0, 1), f"{neutral[0].upper()}{neutral[1:]}.")
    return f"{age}-year-old {sex}, postcode {postcode}. {' '.join(sentences)}"


def _make_record(*, rng: random.Random, profile: _SiteProfile) -> ClinicalRecord:
    department = rng.choices(DEPARTMENTS, weights=profile.department_weights)[0]
    age = min(95, max(18, round(rng.gauss(profile.age_mean, 12.0))))
    postcode = f"{rng.randint(*profile.postcode_range):04d}"
    sex = "female" if rng.random() < profile.female_share else "male"
    note = _make_note(rng=rng, department=department, age=age, postcode=postcode, sex=sex)
    return ClinicalRecord(note=note, age=age, postcode=postcode, sex=sex, answer=department)


def generate_site_records(
    *, site_index: int, n_sites: int, n: int, seed: int, minority_weight: float = _BASE_WEIGHT
) -> list[ClinicalRecord]:
    """`n` records for one site; the same arguments always give the same records.

    `minority_weight` is the relative weight of the departments that are neither the site's
    primary (6) nor its secondary (3) one: lower it to make each site see the others rarely,
    as hospitals with different specialities do (the usefulness benchmark uses 0.1).
    """
    _check_site(site_index=site_index, n_sites=n_sites)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not minority_weight >= 0:
        raise ValueError(f"minority_weight must be >= 0, got {minority_weight}")
    profile = _site_profile(site_index=site_index, n_sites=n_sites, minority_weight=minority_weight)
    # A string seed is hashed deterministically (not by PYTHONHASHSEED) and keeps sites apart.
    rng = random.Random(f"fedseek-demo:{seed}:{site_index}:{n_sites}")
    return [_make_record(rng=rng, profile=profile) for _ in range(n)]


def _write_jsonl(path: Path, records: list[ClinicalRecord]) -> None:
    lines = (json.dumps(r.to_chat(), ensure_ascii=False) + "\n" for r in records)
    path.write_text("".join(lines), encoding="utf-8")


def write_site_dataset(
    out_dir: Path,
    *,
    site_index: int,
    n_sites: int,
    n_train: int = 160,
    n_eval: int = 40,
    seed: int = 7,
) -> tuple[Path, Path]:
    """Write out_dir/train.jsonl and out_dir/eval.jsonl as consecutive draws of one site stream,
    and out_dir/dataset.json declaring the records' quasi-identifiers."""
    if n_train < 0 or n_eval < 0:
        raise ValueError(f"n_train and n_eval must be >= 0, got {n_train} and {n_eval}")
    records = generate_site_records(site_index=site_index, n_sites=n_sites, n=n_train + n_eval, seed=seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_path, eval_path = out_dir / "train.jsonl", out_dir / "eval.jsonl"
    _write_jsonl(train_path, records[:n_train])
    _write_jsonl(eval_path, records[n_train:])
    declaration = {"quasi_identifiers": list(QUASI_IDENTIFIERS), "direct_identifiers": []}
    (out_dir / DATASET_CONFIG).write_text(json.dumps(declaration, indent=2) + "\n", encoding="utf-8")
    return train_path, eval_path
