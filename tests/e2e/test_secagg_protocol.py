"""`fedseek run --secagg` in one process: Flower's real SecAgg+ (its workflow's stages, its client mod,
its key agreement, Shamir shares and masks) between the unmodified ServerApp round loop and three sites
running node/secagg.py, over tests/coordinator/test_strategy.py's in-process Grid (every message deflated
and inflated as the SuperLink would). Here, not under tests/coordinator: it runs the node's code too.

The sites' updates are deterministic (seeded per site and round), so the plain FedAvg run and the secure run
see the same inputs: their global adapters must agree within SecAgg+'s fixed-point error bound, which the
round record states. Each site also keeps every reply it sent, so the tests check what left the site.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen as flower_masks

from coordinator.registry import AdapterRegistry
from coordinator.secagg import CLIPPING_RANGE, quantization_range
from coordinator.server_app import run_federation
from federation.protocol import records, wire
from federation.protocol.round_settings import RoundSettingsError, RunSettings, TrainInstruction
from federation.protocol.secagg_masks import strong_masks
from node.secagg import secagg_mod
from tests.coordinator.test_strategy import (
    RUN_ID,
    SHAPES,
    FakeSite,
    InProcessGrid,
    _run_config,
    serverapp_identity,  # noqa: F401 (autouse fixture)
)

# By name: the package re-exports a function under the module's own name.
flower_secaggplus = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")

SCALE = 0.05  # LoRA-sized values: a seeded standard normal times this


@dataclass
class SecAggSite(FakeSite):
    """A site answering like node/client_app.py with node/secagg.py's mod, dying at `dies_at` (a SecAgg+ stage)."""

    dies_at: str = ""
    ffa: bool = False
    context: Context = field(
        default_factory=lambda: Context(run_id=RUN_ID, node_id=0, node_config={}, state=RecordDict(), run_config={})
    )
    sent: list[Message] = field(default_factory=list)

    def update_for(self, server_round: int) -> wire.Arrays:
        arrays = {k: v * np.float32(SCALE) for k, v in super().update_for(server_round).items()}
        if self.ffa:  # the shared seeded A: the same at every site, never trained; every A with its B
            rng = np.random.default_rng([len(self.name), self.num_examples, server_round])
            arrays["layers.1.v_proj.lora_B"] = rng.standard_normal((8, 2)).astype(np.float32) * np.float32(SCALE)
            shared = np.random.default_rng(7)
            arrays.update(
                {k: shared.standard_normal(SHAPES[k]).astype(np.float32) * 0.1 for k in sorted(wire.lora_a(arrays))}
            )
        if self.mode == "outsized" and self._bad(server_round):
            arrays["layers.0.q_proj.lora_B"][0, 0] = 2 * CLIPPING_RANGE
        if self.mode == "shape" and self._bad(server_round):
            arrays["layers.0.q_proj.lora_B"] = np.zeros((4, 2), np.float32)
        return arrays

    def __call__(self, msg: Message) -> Message | None:
        if not self.alive:
            return None
        if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
            if msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE] == self.dies_at:
                self.alive = False
                return None
            try:
                if self.mode == "flower-masks":  # this site runs Flower's own 32-bit-seeded mask generator
                    with pytest.MonkeyPatch.context() as patch:
                        patch.setattr(flower_secaggplus, "pseudo_rand_gen", flower_masks)
                        reply = secagg_mod(msg, self.context, self._train)
                else:
                    reply = secagg_mod(msg, self.context, self._train)
            except Exception as exc:  # what the SuperNode sends for a ClientApp that raised
                from flwr.app import Error

                reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
            self.sent.append(reply)
            return reply
        if msg.metadata.message_type == MessageType.TRAIN and self.mode != "no-budget":  # a plain FedAvg round
            return self._train(msg, self.context)
        return super().__call__(msg)

    def query(self, msg: Message, server_round: int) -> Message:
        reply = super().query(msg, server_round)
        answer = records.readiness_from_content(reply.content)
        answer = wire.Readiness(**{**answer.to_dict(), "num_examples": self.num_examples})
        return Message(RecordDict({records.READINESS: records.readiness_to_config(answer)}), reply_to=msg)

    def _train(self, msg: Message, context: Context) -> Message:
        """node/client_app.py's train reply: the update (whole, or B with A's digest), metrics, privacy."""
        instruction = TrainInstruction.from_config_record(msg.content.config_records[records.CONFIG])
        server_round = instruction.server_round
        self.trained.append(server_round)
        arrays = self.update_for(server_round)
        self.updates[server_round] = arrays
        update = wire.AdapterUpdate.of(arrays, instruction.reply_factors)
        report = self.report(server_round)
        content = RecordDict(
            {
                **records.update_records(update),
                records.METRICS: records.report_metrics(report),
                records.PRIVACY: records.report_to_config(report),
            }
        )
        return Message(content, reply_to=msg)


def _sites(*, ffa: bool = False, **modes: str) -> dict[int, SecAggSite]:
    specs = [("site-a", 20, 0.5, 1.25), ("site-b", 50, 0.8, 1.5), ("site-c", 130, 0.3, 1.75)]
    sites = {}
    for node_id, (name, n, eps, loss) in zip((11, 22, 33), specs, strict=True):
        mode = modes.get(name.replace("-", "_"), "good")
        dies_at = mode.removeprefix("dies-at-") if mode.startswith("dies-at-") else ""
        sites[node_id] = SecAggSite(name, n, eps, loss, mode=mode, dies_at=dies_at, ffa=ffa)
    return sites


def _expected(sites: list[SecAggSite], server_round: int, names: set[str]) -> dict[str, np.ndarray]:
    weights = np.array([s.num_examples for s in sites], dtype=np.float64)
    return {
        n: np.tensordot(
            weights / weights.sum(), np.stack([s.updates[server_round][n].astype(np.float64) for s in sites]), 1
        )
        for n in names
    }


def _run(tmp_path: Path, sites: dict[int, SecAggSite], **settings: Any) -> tuple[dict[str, Any], wire.Arrays | None]:
    summary = run_federation(InProcessGrid(dict(sites)), _run_config(tmp_path, **settings))
    adapter = summary.get("global_adapter")
    arrays = AdapterRegistry(tmp_path / "registry").load(adapter["version"])[0] if adapter else None
    return summary, arrays


@pytest.mark.parametrize("ffa", [False, True], ids=["lora", "ffa-lora"])
def test_the_secure_aggregate_equals_plain_fedavg_on_the_same_updates(tmp_path: Path, ffa: bool) -> None:
    plain_sites, secure_sites = _sites(ffa=ffa), _sites(ffa=ffa)
    plain, plain_arrays = _run(tmp_path / "plain", plain_sites, num_rounds=2, ffa_lora=ffa)
    secure, secure_arrays = _run(tmp_path / "secure", secure_sites, num_rounds=2, ffa_lora=ffa, secagg=True)
    assert plain["status"] == secure["status"] == "finished", secure.get("error")
    assert plain_arrays is not None and secure_arrays is not None and set(plain_arrays) == set(secure_arrays)
    for rec in secure["rounds"]:
        assert rec["accepted"] == ["site-a", "site-b", "site-c"] and rec["secagg"]["summed"] == rec["accepted"]
        assert rec["secagg"]["quantization_range"] == quantization_range(3) == 2**30
        assert rec["secagg"]["check_error"] <= rec["secagg"]["error_bound"]
    bound = secure["rounds"][-1]["secagg"]["error_bound"]
    assert 0 < bound < 1e-7  # 3 quanta of 8/2**30 over a weight sum of 200/130
    for name, value in secure_arrays.items():
        diff = np.abs(value.astype(np.float64) - plain_arrays[name].astype(np.float64))
        ulp = np.spacing(np.abs(plain_arrays[name])).astype(np.float64)  # each run rounds to float32 once
        assert np.all(diff <= bound + ulp), (name, float(diff.max()), bound)
    # and both are the example-weighted mean of round 2's updates (round 2 starts from round 1's adapter)
    summed = wire.lora_b(secure_arrays) if ffa else secure_arrays
    expected = _expected(list(secure_sites.values()), 2, set(summed))
    for name in summed:
        np.testing.assert_allclose(summed[name], expected[name], rtol=0, atol=bound + 1e-8)
    if ffa:  # A is the shared seeded init, as it is
        a = wire.lora_a(secure_arrays)
        assert all(np.array_equal(v, secure_sites[11].updates[1][k]) for k, v in a.items())


def _update_fingerprints(site: SecAggSite) -> Iterator[tuple[str, bytes]]:
    """Each single update's tensors as raw float32 bytes, and the hex digests a record could hold of them."""
    for server_round, arrays in site.updates.items():
        yield f"{site.name} round {server_round} sha256", wire.sha256_of(arrays).encode()
        for name, value in arrays.items():
            if wire.factor_of(name) == "A" and site.ffa:
                continue  # FFA-LoRA's A is the shared seeded init, not an update: it is in the adapter
            raw = np.ascontiguousarray(value, dtype=np.float32).tobytes()
            yield f"{site.name} round {server_round} {name}", raw
            yield f"{site.name} round {server_round} {name} sha256", hashlib.sha256(raw).hexdigest().encode()
            yield f"{site.name} round {server_round} {name} float64", value.astype(np.float64).tobytes()


@pytest.mark.parametrize("ffa", [False, True], ids=["lora", "ffa-lora"])
def test_no_single_update_leaves_a_site_or_reaches_the_coordinators_records(tmp_path: Path, ffa: bool) -> None:
    sites = _sites(ffa=ffa)
    summary, arrays = _run(tmp_path, sites, num_rounds=2, ffa_lora=ffa, secagg=True)
    assert summary["status"] == "finished" and arrays is not None
    fingerprints = [fp for site in sites.values() for fp in _update_fingerprints(site)]
    assert len(fingerprints) > 20
    # what left each site: no array data, no update bytes in any record
    for site in sites.values():
        assert site.sent
        for reply in site.sent:
            assert all(len(r) == 0 for r in reply.content.array_records.values())
            blob = b"".join(obj.deflate() for obj in _nested(reply.content))
            for what, needle in fingerprints:
                if what.startswith(site.name):
                    assert needle not in blob, f"{what} left the site"
    # the coordinator's records: registry, adapters, run summary, lineage
    files = [p for p in (tmp_path / "registry").rglob("*") if p.is_file()]
    assert any(p.name == "unit-run.json" for p in files)
    for path in files:
        data = path.read_bytes()
        for what, needle in fingerprints:
            assert needle not in data, f"{what} found in the coordinator's {path.relative_to(tmp_path)}"


def _nested(content: RecordDict) -> list[Any]:
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return list(get_all_nested_objects(content).values())


@pytest.mark.parametrize(
    ("stage", "summed"),
    [
        ("collect_masked_vectors", ["site-b", "site-c"]),  # keys shared, then gone before masking: the others' sum
        ("unmask", ["site-a", "site-b", "site-c"]),  # masked vector in, gone before unmasking: its mask rebuilt
    ],
)
def test_one_site_dropping_mid_protocol_still_yields_the_sum(tmp_path: Path, stage: str, summed: list[str]) -> None:
    sites = _sites(site_a=f"dies-at-{stage}", bad_rounds=None)
    summary, arrays = _run(tmp_path, sites, num_rounds=1, secagg=True)
    assert summary["status"] == "finished", summary.get("error")
    rec = summary["rounds"][0]
    assert rec["secagg"]["summed"] == summed == rec["accepted"]
    in_sum = [s for s in sites.values() if s.name in summed]
    expected = _expected(in_sum, 1, set(SHAPES))
    assert arrays is not None
    for name in SHAPES:
        np.testing.assert_allclose(arrays[name], expected[name], rtol=0, atol=rec["secagg"]["error_bound"] + 1e-8)


@pytest.mark.parametrize(
    ("mode", "why"),
    [("outsized", "exceeds the clipping range"), ("shape", "adapter layout differs from the run's")],
)
def test_a_site_refused_before_the_sum_is_a_dropout(tmp_path: Path, mode: str, why: str) -> None:
    """A value SecAgg+ would clip is withheld at the site; a wrong layout is refused by the coordinator from
    the clear metadata. Either way the site is out of the sum, the protocol completes with the others."""
    sites = _sites(site_c=mode)
    summary, arrays = _run(tmp_path, sites, num_rounds=1, secagg=True)
    assert summary["status"] == "finished", summary.get("error")
    rec = summary["rounds"][0]
    assert rec["accepted"] == ["site-a", "site-b"]
    assert any(why in reason for reason in rec["rejected"].values()), rec["rejected"]
    expected = _expected([sites[11], sites[22]], 1, set(SHAPES))
    assert arrays is not None
    for name in SHAPES:
        np.testing.assert_allclose(arrays[name], expected[name], rtol=0, atol=rec["secagg"]["error_bound"] + 1e-8)


def test_masks_that_do_not_cancel_are_refused_by_the_check_value(tmp_path: Path) -> None:
    """One site draws its masks with Flower's stock generator, the others with the strong one: the sum is noise,
    its check value says so, and nothing is saved as an adapter."""
    sites = _sites(site_b="flower-masks")
    summary, arrays = _run(tmp_path, sites, num_rounds=1, secagg=True)
    assert summary["status"] == "failed" and arrays is None
    assert "check value came back" in summary["error"] and "masks did not cancel" in summary["error"]
    assert summary["rounds"][0]["secagg"]["check_error"] > 1e-3
    assert not list((tmp_path / "registry").glob("global-*"))


def test_fewer_than_three_ready_sites_are_refused_before_anything_trains(tmp_path: Path) -> None:
    sites = _sites(site_c="no-budget")
    summary, arrays = _run(tmp_path, sites, num_rounds=1, secagg=True)
    assert summary["status"] == "failed" and arrays is None
    assert "secure aggregation needs at least 3 ready sites, 2 ready" in summary["error"]
    assert "nothing trained or charged" in summary["error"]
    assert all(not s.trained for s in sites.values())


def test_secagg_needs_fedavg() -> None:
    with pytest.raises(RoundSettingsError, match="fedavg with secagg"):
        RunSettings(secagg=True, aggregation="median")


def test_a_plain_train_message_passes_the_mod_untouched() -> None:
    seen: list[Message] = []

    def handler(msg: Message, ctxt: Context) -> Message:
        seen.append(msg)
        return Message(RecordDict({"x": ConfigRecord({"ok": True})}), reply_to=msg)

    msg = Message(RecordDict({records.CONFIG: ConfigRecord({"server-round": 1})}), 5, MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = "m1"
    ctxt = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    reply = secagg_mod(msg, ctxt, handler)
    assert seen == [msg] and json.loads(json.dumps(dict(reply.content.config_records["x"]))) == {"ok": True}


def test_both_ends_of_a_fedseek_run_use_the_strong_masks() -> None:
    import importlib

    client_side = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
    server_side = importlib.import_module("flwr.server.workflow.secure_aggregation.secaggplus_workflow")

    import coordinator.secagg  # noqa: F401 (installs it in the workflow)
    import node.secagg  # noqa: F401 (installs it in the client mod)

    assert client_side.pseudo_rand_gen is strong_masks
    assert server_side.pseudo_rand_gen is strong_masks


@pytest.mark.parametrize(
    ("sites", "shares", "threshold"),
    [(2, 2, 2), (3, 3, 1), (5, 5, 2), (4, 4, 2)],
    ids=["two-sites", "threshold-1", "threshold-2-of-5", "half-of-4"],
)
def test_a_site_refuses_to_join_an_unsafe_setup(sites: int, shares: int, threshold: int) -> None:
    """The coordinator chooses the parameters; a threshold of at most half the shares would let it rebuild a
    site's mask seed and key from different neighbours (telling some it dropped out), so the site says no."""
    from flwr.common.secure_aggregation.secaggplus_constants import Stage

    from node.secagg import SecAggRefused

    setup = {
        Key.STAGE: Stage.SETUP,
        Key.SAMPLE_NUMBER: sites,
        Key.SHARE_NUMBER: shares,
        Key.THRESHOLD: threshold,
        Key.CLIPPING_RANGE: 4.0,
        Key.TARGET_RANGE: 2**30,
        Key.MOD_RANGE: 2**32,
        Key.MAX_WEIGHT: 100.0,
    }
    msg = Message(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(setup)}), 5, MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = "m1"
    ctxt = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(SecAggRefused, match="does not join"):
        secagg_mod(msg, ctxt, lambda m, c: m)
    setup[Key.SAMPLE_NUMBER], setup[Key.SHARE_NUMBER], setup[Key.THRESHOLD] = 3, 3, 2  # what --secagg uses
    reply = secagg_mod(Message(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(setup)}), 5, MessageType.TRAIN), ctxt, None)  # type: ignore[arg-type]
    assert Key.PUBLIC_KEY_1 in reply.content.config_records[RECORD_KEY_CONFIGS]
