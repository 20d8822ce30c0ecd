"""A site that scales its update x100, through whole rounds of the coordinator's strategy.

The rounds run as in tests/coordinator/test_strategy.py: `run_federation` over an in-process Flower
Grid whose messages pass through Flower's own object transport, each site answering like
node/client_app.py. The poisoning site trains like the others and then scales what it sends: its
change from the adapter it was sent, or its whole adapter. The norm bound rejects it (recorded in the
round record and logged); with the bound off, the robust means keep the result within the honest
updates, where FedAvg is pulled away.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Message

from coordinator.aggregate import distance, weighted_average
from coordinator.registry import AdapterRegistry
from coordinator.server_app import run_federation
from federation.protocol import records, wire
from tests.coordinator.test_strategy import (
    SHAPES,
    FakeSite,
    FfaSite,
    InProcessGrid,
    _assert_arrays_close,
    _expected_average,
    _ffa_sites,
    _run_config,
    _sites,
    serverapp_identity,  # noqa: F401 - autouse: what Flower sets up in a ServerApp process
)

POISONED = 22  # site-b's node


@dataclass
class Scaling:
    """Makes a site send x`factor` its change from the adapter it was sent (zero in a first round:
    LoRA's B starts there), or x`factor` its whole adapter; under FFA-LoRA (`only_b`) its B factors
    only, as a poisoner must to keep the run's A digest."""

    site: FakeSite
    factor: float = 100.0
    what: str = "change"  # change | weights
    only_b: bool = False
    sent: dict[int, wire.Arrays] = field(default_factory=dict)

    def install(self) -> None:
        honest_train, honest_update = self.site.train, self.site.update_for

        def train(msg: Message, server_round: int) -> Message:
            self.sent[server_round] = records.from_array_record(msg.content.array_records[records.ARRAYS])
            return honest_train(msg, server_round)

        def update_for(server_round: int) -> wire.Arrays:
            honest = honest_update(server_round)
            start, zero, factor = self.sent.get(server_round, {}), np.float32(0), np.float32(self.factor)
            out = {}
            for k, v in honest.items():
                if self.only_b and wire.factor_of(k) != "B":
                    out[k] = v
                elif self.what == "weights":
                    out[k] = v * factor
                else:
                    out[k] = start.get(k, zero) + factor * (v - start.get(k, zero))
            return out

        self.site.train = train  # type: ignore[method-assign]
        self.site.update_for = update_for  # type: ignore[method-assign]


def _poisoned(sites: dict[int, Any], **how: Any) -> dict[int, Any]:
    Scaling(sites[POISONED], **how).install()
    return sites


def _run(tmp_path: Path, sites: dict[int, Any], **cfg: Any) -> dict[str, Any]:
    return run_federation(InProcessGrid(dict(sites)), _run_config(tmp_path, **cfg))


def _honest_mean(sites: list[FakeSite], server_round: int, names: Any = SHAPES) -> wire.Arrays:
    return weighted_average([({k: s.updates[server_round][k] for k in names}, 1.0) for s in sites])


def _within(result: wire.Arrays, honest: list[wire.Arrays]) -> None:
    """Every coordinate of `result` lies between the honest updates' smallest and largest value."""
    for name in honest[0]:
        stack = np.stack([u[name] for u in honest])
        assert np.all(result[name] >= stack.min(axis=0) - 1e-6), name
        assert np.all(result[name] <= stack.max(axis=0) + 1e-6), name


@pytest.mark.parametrize("what", ["change", "weights"])
def test_an_update_scaled_x100_is_rejected_in_every_round_and_the_adapter_is_the_honest_mean(
    tmp_path: Path, what: str, caplog: pytest.LogCaptureFixture
) -> None:
    sites = _poisoned(_sites(), what=what)
    with caplog.at_level(logging.WARNING, logger="fedseek.coordinator"):
        summary = _run(tmp_path, sites)  # the defaults: fedavg, update-norm-ratio 10
    assert summary["status"] == "finished"
    registry = AdapterRegistry(tmp_path / "registry")
    honest = [sites[11], sites[33]]
    for server_round, rec in enumerate(summary["rounds"], start=1):
        assert set(rec["rejected"]) == {f"node-{POISONED}"}
        reason = r"update norm \S+ is \S+x the median \S+ of the other updates' \(update-norm-ratio 10\)"
        assert re.fullmatch(reason + ": refused as outsized", rec["rejected"][f"node-{POISONED}"])
        assert sorted(rec["accepted"]) == ["site-a", "site-c"]
        norms = rec["update_norms"]
        assert norms["site-b"] > 10 * max(norms["site-a"], norms["site-c"])
        stored, manifest = registry.load(rec["version"])
        _assert_arrays_close(stored, _expected_average(honest, server_round))  # exactly FedAvg of the honest two
        assert sorted(s.site for s in manifest.sites) == ["site-a", "site-c"]
    lines = [r.getMessage() for r in caplog.records if "refused as outsized" in r.getMessage()]
    assert len(lines) == 2 and all("\n" not in line and "node 22" in line for line in lines)


def test_without_the_bound_fedavg_is_pulled_far_from_the_honest_mean(tmp_path: Path) -> None:
    """What the bound and the robust means guard against: the same site, accepted, moves the adapter."""
    sites = _poisoned(_sites())
    summary = _run(tmp_path, sites, num_rounds=1, update_norm_ratio=0)
    (rec,) = summary["rounds"]
    assert rec["rejected"] == {} and sorted(rec["accepted"]) == ["site-a", "site-b", "site-c"]
    stored, _ = AdapterRegistry(tmp_path / "registry").load(rec["version"])
    honest = _honest_mean([sites[11], sites[33]], 1)
    assert distance(stored, honest) > 10 * distance(sites[11].updates[1], honest)


@pytest.mark.parametrize("method", ["median", "trimmed-mean"])
def test_a_robust_mean_bounds_an_accepted_x100_update(tmp_path: Path, method: str) -> None:
    """With the norm bound off the poisoned update is aggregated, yet each coordinate stays within the
    honest sites' values: five sites, one of them poisoned (trimmed mean: one value off each end)."""
    specs = [("site-a", 20), ("site-b", 50), ("site-c", 130), ("site-d", 40), ("site-e", 60)]
    sites = {11 * (i + 1): FakeSite(name, n, 0.5, 1.5) for i, (name, n) in enumerate(specs)}
    _poisoned(sites)
    summary = _run(tmp_path, sites, update_norm_ratio=0, aggregation=method, trim_fraction=0.2)
    assert summary["status"] == "finished"
    honest = [s for node, s in sites.items() if node != POISONED]
    for server_round, rec in enumerate(summary["rounds"], start=1):
        assert rec["rejected"] == {} and "site-b" in rec["accepted"]
        stored, _ = AdapterRegistry(tmp_path / "registry").load(rec["version"])
        _within(stored, [s.updates[server_round] for s in honest])
        mean = _honest_mean(honest, server_round)
        assert distance(stored, mean) < max(distance(s.updates[server_round], mean) for s in honest)


def test_two_sites_and_min_nodes_2_the_poisoned_update_fails_the_round_naming_it(tmp_path: Path) -> None:
    sites = _poisoned({n: s for n, s in _sites().items() if n in (11, POISONED)})
    summary = _run(tmp_path, sites, num_rounds=1)
    assert summary["status"] == "failed" and summary["rounds_completed"] == 0
    assert summary["error"].startswith("round 1 made no global adapter (1 valid updates, min-nodes 2)")
    assert "site-b (node-22): update norm" in summary["error"] and "refused as outsized" in summary["error"]
    assert AdapterRegistry(tmp_path / "registry").versions() == []


def test_two_sites_and_min_nodes_1_the_honest_update_alone_makes_the_adapter(tmp_path: Path) -> None:
    """The others' median of two sites is the other one: the x100 site is refused, not the honest one."""
    sites = _poisoned({n: s for n, s in _sites().items() if n in (11, POISONED)})
    summary = _run(tmp_path, sites, min_nodes=1)
    assert summary["status"] == "finished"
    for server_round, rec in enumerate(summary["rounds"], start=1):
        assert set(rec["rejected"]) == {f"node-{POISONED}"} and rec["accepted"] == ["site-a"]
        stored, _ = AdapterRegistry(tmp_path / "registry").load(rec["version"])
        _assert_arrays_close(stored, _expected_average([sites[11]], server_round))


@pytest.mark.parametrize(("method", "ratio"), [("fedavg", 10.0), ("median", 0.0)])
def test_ffa_lora_bounds_a_poisoned_b_and_keeps_the_shared_a(tmp_path: Path, method: str, ratio: float) -> None:
    """Under FFA-LoRA only B is averaged and bounded; A, the shared seeded init, is kept as it is."""
    sites: dict[int, FfaSite] = _ffa_sites()
    b_names = [k for k in sites[11].update_for(1) if ".lora_B." in k]
    Scaling(sites[POISONED], only_b=True).install()
    summary = _run(tmp_path, sites, ffa_lora=True, aggregation=method, update_norm_ratio=ratio)
    assert summary["status"] == "finished"
    registry = AdapterRegistry(tmp_path / "registry")
    shared_a = sites[11].lora_a()
    honest = [sites[11], sites[33]]
    for server_round, rec in enumerate(summary["rounds"], start=1):
        stored, _ = registry.load(rec["version"])
        for name, value in wire.lora_a(stored).items():
            np.testing.assert_array_equal(value, shared_a[name])
        b = {k: stored[k] for k in b_names}
        if ratio:  # rejected: B is FedAvg of the honest two
            assert set(rec["rejected"]) == {f"node-{POISONED}"}
            assert rec["rejected"][f"node-{POISONED}"].endswith("refused as outsized")
            fedavg = weighted_average(
                [({k: s.updates[server_round][k] for k in b_names}, s.num_examples) for s in honest]
            )
            for name in b_names:
                np.testing.assert_array_equal(b[name], fedavg[name])
        else:  # accepted, bounded by the median
            assert rec["rejected"] == {} and "site-b" in rec["accepted"]
            _within(b, [{k: s.updates[server_round][k] for k in b_names} for s in honest])
