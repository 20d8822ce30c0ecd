"""The public corpus a base model is pretrained on before any site trains: never a site's records.

Public notes come from the demo's note generator under a public seed (`PUBLIC_SEED`, not the
sites' seed), so they are other draws than any site's records. Each note becomes up to three chats,
none of which pairs its findings with their department:

* the task's own prompt, unanswered, or with `uniform_task_answers` answered by a department drawn
  independently of the note (every department equally often);
* a referral copy ("Referred by X. Which department referred this patient?" -> X), X drawn
  independently of the findings;
* with `companions`, "Which other finding often comes with these?" -> another finding of the note's
  group: what any public clinical text teaches, naming no department.

Why the options (the demo uses both; measured on the demo's 2-site, 1-round run, examples/demo/README.md):
pretrained on referral copies alone, the base's last position carried nothing of the findings (a
linear probe for the department scored 0.13-0.20, chance), it gave one constant answer, and a DP round
left exact match where it was (0.10 and 0.47 at the two sites, also with 2,000 records a site, batch
200 and clip 0.1). With the companion chats the probe scores 1.00, so the DP rounds need only name the
groups; the uniform task answers spread the base's answers over the departments and end them with the
end of turn. The demo's round then takes exact match from 0.10 to 0.45-0.55 and from 0.33 to
0.60-0.70 (five runs). Shared by the demo (`fedseek model tiny --pretrain`) and `bench/usefulness.py`
(which uses neither option).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from fedseek_examples.demo.data import (
    DEPARTMENTS,
    FINDINGS,
    SYSTEM_PROMPT,
    ClinicalRecord,
    generate_site_records,
    question_for,
)

PUBLIC_QUESTION = "Which department referred this patient?"
REFERRAL = "Referred by {department}."
COMPANION_SYSTEM = "You are a clinical documentation assistant. Answer with one finding."
COMPANION_QUESTION = "Which other finding often comes with these?"
PUBLIC_SEED = 2024
"""The demo's public seed; the sites' data use seed 7 (`write_site_dataset`)."""
GENERATOR_VERSION = 2
"""Bump when the public corpus changes: it keys the cache of pretrained models."""


def public_records(*, n: int, n_sites: int = 3, seed: int = PUBLIC_SEED) -> list[ClinicalRecord]:
    """`n` public notes spread over the sites' profiles (so every department and age band occurs)."""
    per_site = -(-n // n_sites)
    notes = [
        r for i in range(n_sites) for r in generate_site_records(site_index=i, n_sites=n_sites, n=per_site, seed=seed)
    ]
    return notes[:n]


def public_chats(
    records: Sequence[ClinicalRecord], *, seed: int, uniform_task_answers: bool = False, companions: bool = False
) -> list[list[dict[str, str]]]:
    """The public corpus: per note the task's prompt, a referral copy and (`companions`) a companion chat.

    A pretrained base model knows the words and the answer format (one department name, then
    end of turn) but not the private mapping from findings to department. By default each public
    note becomes two chats: the task's own prompt *without* an answer, and a different question whose
    answer is a department named in the text, drawn independently of the note's findings; with
    `companions` a third (`companion_chat`). None carries a findings-to-department signal.

    `uniform_task_answers` answers the task's own prompt too, with a department drawn at random
    independently of the note: every department equally often (a balanced shuffle, so no
    department's count happens to lead), another draw than the referrer's. Trained on it, the base
    answers the task's question with about equal probability for every department instead of one
    constant answer, and ends its answer; the DP rounds then need only tip near ties.
    """
    rng = random.Random(f"public-referrals:{seed}")
    task_answers = [DEPARTMENTS[i % len(DEPARTMENTS)] for i in range(len(records))]
    random.Random(f"public-task-answers:{seed}").shuffle(task_answers)
    companion_rng = random.Random(f"public-companions:{seed}")
    chats: list[list[dict[str, str]]] = []
    for r, answer in zip(records, task_answers, strict=True):
        question = question_for(r)
        if uniform_task_answers:
            question = [*question, {"role": "assistant", "content": answer}]
        chats.append(question)
        referrer = rng.choice(DEPARTMENTS)
        note = f"{r.note} {REFERRAL.format(department=referrer)}"
        chats.append(
            [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": f"{note}\n{PUBLIC_QUESTION}"},
                {"role": "assistant", "content": referrer},
            ]
        )
        if companions:
            chats.append(companion_chat(r, rng=companion_rng))
    return chats


def companion_chat(record: ClinicalRecord, *, rng: random.Random) -> list[dict[str, str]]:
    """ "Which other finding often comes with these?" -> a finding that co-occurs with the note's own.

    What public clinical text teaches anyway: which findings go together. Never which department
    sees them; the answer is a finding, and the system prompt is not the task's.
    """
    present = [f for f in FINDINGS[record.answer] if f in record.note]
    others = [f for f in FINDINGS[record.answer] if f not in present]
    return [
        {"role": "system", "content": COMPANION_SYSTEM},
        {"role": "user", "content": f"{record.note}\n{COMPANION_QUESTION}"},
        {"role": "assistant", "content": rng.choice(others)},
    ]
