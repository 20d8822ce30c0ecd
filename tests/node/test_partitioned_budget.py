"""Issue 14, "years of data, epsilon <= 1 per record": 36 months of monthly batches on the real ledger and trainer.

Each month a new batch (4 records) arrives as its own data partition, registered through the ledger's
audited `add_partition` (what `fedseek budget add-partition` calls), and a one-round run trains on the
tiny model with the default run share. Every month must train, and every partition's epsilon,
recomputed from `to_json()` alone with Google's dp-accounting (RDP at Opacus's orders, each round a
Poisson-sampled Gaussian composed `steps` times, only over the rounds that sampled that partition),
must stay <= 1.0 and match the ledger's own.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dp_accounting import dp_event, rdp

from node.data import SiteData, load_jsonl, load_partitions
from node.engine import ModelHost
from node.model import load_model
from node.trainer import TrainSettings, train_round
from privacy.audit import AuditTrail
from privacy.consistency import check_ledger_against_audit
from privacy.ledger import Budget, PrivacyLedger

MONTHS, PER_MONTH = 36, 4
BUDGET = Budget(epsilon=1.0, delta=1e-5)
SETTINGS = TrainSettings(batch_size=8, local_epochs=1, learning_rate=1e-2)  # the default run share (0.5)


def independent_epsilons(report: dict[str, object]) -> dict[str, float]:
    """Each partition's epsilon from the ledger's JSON alone, with dp-accounting's RDP accountant."""
    epsilons = {}
    for part in report["partitions"]:  # type: ignore[attr-defined]
        accountant = rdp.RdpAccountant(orders=report["rdp_orders"])  # type: ignore[arg-type]
        for e in report["entries"]:  # type: ignore[attr-defined]
            if e["kind"] == "round" and part["sha256"] in (e["partitions"] or [report["head"]["dataset_sha256"]]):  # type: ignore[index]
                poisson = dp_event.PoissonSampledDpEvent(
                    e["sample_rate"], dp_event.GaussianDpEvent(e["noise_multiplier"])
                )
                accountant.compose(dp_event.SelfComposedDpEvent(poisson, e["steps"]))
        epsilons[part["sha256"]] = float(accountant.get_epsilon(report["delta"]))  # type: ignore[arg-type]
    return epsilons


@pytest.fixture(scope="module")
def host(tiny_model_dir: Path) -> ModelHost:
    model, tok = load_model(tiny_model_dir)
    return ModelHost(model, tok, model_name=tiny_model_dir.name)


def _write_month(data_dir: Path, month: int, lines: list[str]) -> None:
    """Month `month`'s batch: 4 records, distinct from every other month's (so a distinct fingerprint)."""
    batch = data_dir / "train" / f"{2023 + (month - 1) // 12}-{(month - 1) % 12 + 1:02d}.jsonl"
    batch.parent.mkdir(parents=True, exist_ok=True)
    rows = [lines[(month * PER_MONTH + i) % len(lines)] for i in range(PER_MONTH)]
    batch.write_text("".join(json.dumps({**json.loads(r), "month": month}) + "\n" for r in rows))


def test_36_months_of_new_partitions_keep_training_with_every_partition_within_its_budget(
    host: ModelHost, site_data_dir: Path, tmp_path: Path
) -> None:
    lines = (site_data_dir / "train.jsonl").read_text().splitlines()
    assert load_jsonl(site_data_dir / "train.jsonl")  # the demo's records, reused month after month
    data_dir, state = tmp_path / "data", tmp_path / "state"
    audit = AuditTrail(state / "audit.log")
    ledger: PrivacyLedger | None = None
    sampled_per_month: list[int] = []
    for month in range(1, MONTHS + 1):
        _write_month(data_dir, month, lines)
        data = load_partitions(data_dir, host.tokenizer)  # what a node loads at start: one partition per batch
        assert isinstance(data, SiteData) and len(data.partitions) == month
        newest = data.partitions[-1]
        if ledger is None:
            ledger = PrivacyLedger(state / "ledger.sqlite", budget=BUDGET, dataset_sha256=newest.sha256, audit=audit)
        else:
            ledger.add_partition(newest.sha256, label=newest.name, details={"records": len(newest.examples)})
        result = train_round(
            host,
            ledger,
            data,
            site="site-a",
            run_id=f"month-{month}",
            round=1,
            rounds_left=1,
            global_arrays=None,
            settings=SETTINGS,
        )
        entry = ledger.entries()[-1]
        assert (entry.run_id, entry.status, entry.kind) == (f"month-{month}", "completed", "round")  # it trained
        assert newest.sha256 in entry.partitions  # the new batch, with its full budget, is always sampled
        assert result.report.num_examples == PER_MONTH * len(entry.partitions)  # only the sampled partitions' records
        sampled_per_month.append(len(entry.partitions))

    assert ledger is not None
    report = json.loads(json.dumps(ledger.to_json()))
    assert len(report["partitions"]) == MONTHS
    recomputed = independent_epsilons(report)
    for part in report["partitions"]:
        assert recomputed[part["sha256"]] <= 1.0, part["label"]
        assert recomputed[part["sha256"]] == pytest.approx(part["epsilon"], rel=1e-6)
    assert max(recomputed.values()) == pytest.approx(report["epsilon_spent"], rel=1e-6)
    # partitions compose over several months, then drop out: no round sampled every partition
    assert max(p["rounds"] for p in report["partitions"]) >= 2 and max(sampled_per_month) < MONTHS
    assert min(p["rounds"] for p in report["partitions"]) >= 1
    check_ledger_against_audit(ledger, audit, dataset_sha256=data.fingerprints)  # the audit trail agrees
