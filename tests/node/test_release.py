"""The release state machine (node/release.py): candidate, promotion, automatic and manual rollback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from federation.errors import InvalidInput
from node.release import CANDIDATE, RETIRED, STABLE, Release, ReleaseError, ReleasePolicy
from privacy.audit import AuditTrail


def _release(tmp_path: Path, *, installed: tuple[str, ...] = (), **policy: Any) -> Release:
    audit = AuditTrail(tmp_path / "audit.jsonl")
    release = Release(tmp_path / "adapters" / "release.json", audit=audit, base_eval_loss=2.0, installed=installed)
    if policy:
        release.set_policy(ReleasePolicy(**policy), actor="admin")
    return release


def _actions(release: Release) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in release.audit.path.read_text().splitlines()]
    return [(r["action"], r["resource"]) for r in rows if r["action"].startswith("release.")]


def test_a_deployed_version_is_a_candidate_serving_its_share_of_default_traffic(tmp_path: Path) -> None:
    release = _release(tmp_path, share=0.25, min_requests=100)
    assert release.offer("global-v0001", eval_loss=1.9) == CANDIDATE
    routed = [release.route() for _ in range(40)]
    assert routed.count("global-v0001") == 10  # exactly its share, deterministically
    assert routed.count(None) == 30  # the base model stays the stable default
    assert release.status_of(None) == STABLE and release.share_of(None) == 0.75
    assert release.share_of("global-v0001") == 0.25
    assert ("release.candidate", "global-v0001") in _actions(release)


def test_share_zero_serves_the_candidate_only_to_requests_that_name_it(tmp_path: Path) -> None:
    release = _release(tmp_path, share=0.0, min_requests=5)
    release.offer("global-v0001", eval_loss=1.9)
    assert {release.route() for _ in range(20)} == {None}
    for _ in range(5):  # requests naming it
        release.served("global-v0001", ok=True)
    assert release.stable == "global-v0001"


def test_a_candidate_with_a_worse_eval_loss_is_rolled_back_at_once(tmp_path: Path) -> None:
    release = _release(tmp_path, share=0.5, tolerance=0.05, min_requests=0)
    release.offer("global-v0001", eval_loss=1.9)  # better than the base (2.0): promoted at once
    assert release.stable == "global-v0001"
    assert release.offer("global-v0002", eval_loss=1.9 * 1.06) == RETIRED  # 6% worse, 5% tolerated
    assert release.candidate is None and release.stable == "global-v0001"
    assert {release.route() for _ in range(10)} == {"global-v0001"}  # it never served default traffic
    record = release.record_of("global-v0002")
    assert record is not None and "eval loss" in record.reason
    assert _actions(release)[-1] == ("release.rolled_back", "global-v0002")
    assert release.offer("global-v0003", eval_loss=1.9 * 1.04) == STABLE  # within tolerance


def test_a_non_finite_eval_loss_is_rolled_back(tmp_path: Path) -> None:
    release = _release(tmp_path)
    assert release.offer("global-v0001", eval_loss=float("nan")) == RETIRED


def test_promoted_after_min_requests_when_its_error_rate_holds(tmp_path: Path) -> None:
    release = _release(tmp_path, share=0.5, min_requests=4)
    release.offer("global-v0001", eval_loss=1.9)
    for _ in range(3):
        release.served("global-v0001", ok=True)
    assert release.candidate == "global-v0001"
    release.served("global-v0001", ok=True)
    assert release.stable == "global-v0001" and release.candidate is None
    assert _actions(release)[-1] == ("release.promoted", "global-v0001")


def test_rolled_back_after_min_requests_when_it_fails_more_than_the_stable(tmp_path: Path) -> None:
    release = _release(tmp_path, share=0.5, min_requests=4, error_margin=0.1)
    for _ in range(10):
        release.served(None, ok=True)  # the base model: no errors
    release.offer("global-v0001", eval_loss=1.9)
    for ok in (True, False, True, True):
        release.served("global-v0001", ok=ok)
    assert release.stable is None and release.candidate is None
    assert release.status_of("global-v0001") == RETIRED
    record = release.record_of("global-v0001")
    assert record is not None and "error rate 0.250" in record.reason
    assert _actions(release)[-1] == ("release.rolled_back", "global-v0001")


def test_a_pending_candidate_is_settled_when_the_next_version_comes(tmp_path: Path) -> None:
    release = _release(tmp_path, share=0.1, min_requests=1000)
    release.offer("global-v0001", eval_loss=1.9)
    release.offer("global-v0002", eval_loss=1.8)  # v1 held up through its round: promoted, v2 is judged against it
    assert release.stable == "global-v0001" and release.candidate == "global-v0002"
    release.served("global-v0002", ok=False)  # failing so far
    release.offer("global-v0003", eval_loss=1.8)
    assert release.status_of("global-v0002") == RETIRED and release.stable == "global-v0001"
    assert release.candidate == "global-v0003"


def test_promote_and_rollback_by_hand(tmp_path: Path) -> None:
    release = _release(tmp_path, share=0.5, min_requests=0)
    release.offer("global-v0001", eval_loss=1.9)
    release.offer("global-v0002", eval_loss=5.0)  # rolled back automatically
    release.promote("global-v0002", actor="alice")  # a person overrides it
    assert release.stable == "global-v0002" and release.status_of("global-v0001") == RETIRED
    assert release.rollback(actor="alice") == "global-v0001"  # the previous stable serves again
    assert release.stable == "global-v0001" and release.status_of("global-v0002") == RETIRED
    assert release.rollback(actor="alice") is None  # and before it, the base model
    assert release.status_of(None) == STABLE
    with pytest.raises(ReleaseError):
        release.rollback(actor="alice")
    with pytest.raises(ReleaseError):
        release.rollback("global-v0002", actor="alice")  # retired: neither candidate nor stable
    rows = [json.loads(line) for line in release.audit.path.read_text().splitlines()]
    manual = [r for r in rows if r["actor"] == "alice"]
    assert [r["action"] for r in manual] == ["release.promoted", "release.rolled_back", "release.rolled_back"]
    assert all(r["details"]["automatic"] is False for r in manual[1:])


def test_rollback_of_the_candidate_keeps_the_stable(tmp_path: Path) -> None:
    release = _release(tmp_path, share=0.5, min_requests=50)
    release.offer("global-v0001", eval_loss=1.9)
    assert release.rollback(actor="bob") is None
    assert release.candidate is None and release.status_of("global-v0001") == RETIRED


def test_unknown_versions_are_refused(tmp_path: Path) -> None:
    release = _release(tmp_path)
    with pytest.raises(Exception, match="not installed"):
        release.promote("global-v0009", actor="alice")


def test_the_state_survives_a_restart(tmp_path: Path) -> None:
    release = _release(tmp_path, share=0.5, min_requests=10)
    release.offer("global-v0001", eval_loss=1.9)
    for _ in range(3):
        release.served("global-v0001", ok=True)
    release.promote("global-v0001", actor="alice")
    release.offer("global-v0002", eval_loss=1.85)
    again = Release(release.path, audit=release.audit, base_eval_loss=2.0, installed=("global-v0001", "global-v0002"))
    assert again.stable == "global-v0001" and again.candidate == "global-v0002"
    assert again.policy == ReleasePolicy(share=0.5, min_requests=10)
    record = again.record_of("global-v0001")
    assert record is not None and record.requests == 3
    assert again.offer("global-v0002", eval_loss=9.0) == CANDIDATE  # a re-deployment changes nothing


def test_a_node_from_before_gray_release_keeps_serving_its_newest_version(tmp_path: Path) -> None:
    release = _release(tmp_path, installed=("global-v0001", "global-v0002"))
    assert release.stable == "global-v0002" and release.status_of("global-v0001") == RETIRED


def test_a_version_whose_directory_is_gone_is_forgotten(tmp_path: Path) -> None:
    release = _release(tmp_path, min_requests=0)
    release.offer("global-v0001", eval_loss=1.9)
    release.offer("global-v0002", eval_loss=1.8)
    again = Release(release.path, audit=release.audit, base_eval_loss=2.0, installed=("global-v0001",))
    assert again.stable == "global-v0001"


def test_bad_policies_are_refused(tmp_path: Path) -> None:
    for bad in ({"share": 1.5}, {"tolerance": -1.0}, {"min_requests": -1}, {"error_margin": 2.0}):
        with pytest.raises(InvalidInput):
            ReleasePolicy(**bad)
    with pytest.raises(InvalidInput):
        ReleasePolicy.from_json({"shares": 0.1})
