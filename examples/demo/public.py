"""The public corpus a base model is pretrained on before any site trains: never a site's records.

Public notes come from the demo's note generator under a public seed (`PUBLIC_SEED`, not the
sites' seed), so they are other draws than any site's records; each becomes two chats: the task's own
prompt *without* an answer, and a referral-copy chat ("Referred by X. Which department referred
this patient?" -> X) whose answer is drawn independently of the note's findings. A model
pretrained on them knows the words and the answer's form (one department name, then end of
turn) but not the private mapping from findings to department: that is what the federation's
DP rounds must teach. Shared by the demo (`fedseek model tiny --pretrain`) and
`bench/usefulness.py`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from fedseek_examples.demo.data import DEPARTMENTS, SYSTEM_PROMPT, ClinicalRecord, generate_site_records, question_for

PUBLIC_QUESTION = "Which department referred this patient?"
REFERRAL = "Referred by {department}."
PUBLIC_SEED = 2024
"""The demo's public seed; the sites' data use seed 7 (`write_site_dataset`)."""
GENERATOR_VERSION = 1
"""Bump when the public corpus changes: it keys the cache of pretrained models."""


def public_records(*, n: int, n_sites: int = 3, seed: int = PUBLIC_SEED) -> list[ClinicalRecord]:
    """`n` public notes spread over the sites' profiles (so every department and age band occurs)."""
    per_site = -(-n // n_sites)
    notes = [
        r for i in range(n_sites) for r in generate_site_records(site_index=i, n_sites=n_sites, n=per_site, seed=seed)
    ]
    return notes[:n]


def public_chats(records: Sequence[ClinicalRecord], *, seed: int) -> list[list[dict[str, str]]]:
    """The public corpus: notes, the task's prompt, and a referral-copy task that names departments.

    A pretrained base model knows the words and the answer format (one department name, then
    end of turn) but not the private mapping from findings to department. So each public note
    becomes two chats: the task's own prompt *without* an answer, and a different question whose
    answer is a department named in the text, drawn independently of the note's findings (the
    public data carry no findings-to-department signal at all).
    """
    rng = random.Random(f"public-referrals:{seed}")
    chats: list[list[dict[str, str]]] = []
    for r in records:
        chats.append(question_for(r))
        referrer = rng.choice(DEPARTMENTS)
        note = f"{r.note} {REFERRAL.format(department=referrer)}"
        chats.append(
            [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": f"{note}\n{PUBLIC_QUESTION}"},
                {"role": "assistant", "content": referrer},
            ]
        )
    return chats
