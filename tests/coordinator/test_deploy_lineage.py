"""The deploy (evaluate) message carries the version's lineage, so a site's explanation reports can
name the contributing sites and each one's epsilon (node/explain_service.py)."""

from __future__ import annotations

import json
from typing import Any

from flwr.app import MessageType

from federation.protocol import records
from tests.coordinator.test_strategy import happy_run, serverapp_identity  # noqa: F401  (fixtures)


def test_deploy_messages_carry_the_registry_lineage(happy_run: Any) -> None:  # noqa: F811
    _, grid, sites, registry = happy_run
    evaluate = grid.sent(MessageType.EVALUATE)
    assert evaluate
    for msg in evaluate:
        cfg = msg.content.config_records[records.CONFIG]
        manifest = registry.manifest(str(cfg["adapter-version"]))
        lineage = json.loads(str(cfg["adapter-lineage"]))
        assert lineage == {
            "parent": manifest.parent,
            "run": manifest.run,
            "round": manifest.round,
            "sites": [{"site": s.site, "epsilon": s.epsilon, "delta": s.delta} for s in manifest.sites],
        }
        assert {s["site"] for s in lineage["sites"]} == {s.name for s in sites.values()}
        assert all(s["epsilon"] > 0 for s in lineage["sites"])
    rounds = sorted(
        {json.loads(str(m.content.config_records[records.CONFIG]["adapter-lineage"]))["round"] for m in evaluate}
    )
    assert rounds == [1, 2]
