"""What the site access policy (node/policy.py, casbin) adds to each request's access check.

Measured in-process on the CPU, per decision, best of several repeats:
- `casbin_uncached`: one casbin evaluation of the default policy (plus members), no cache:
  what the first request of a (subject, route, model) costs;
- `policy_allows`: `SitePolicy.allows` as requests see it (stat of the file, cached decision);
- `require_key` / `require_cert`: node.access.AccessPolicy.require for an API key / a certificate
  (the whole check the request guard runs), and `require_key_no_policy`: the same key check with
  the policy step skipped, the baseline the policy's overhead is measured against.

    .venv/bin/python bench/access_policy.py [--out bench/results/access_policy_cpu_DATE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: the repo's packages

from starlette.requests import Request

from bench.common import machine, versions
from federation.ops.layout import NodeLayout
from federation.security.pki import Identity
from node.access import AccessPolicy
from node.api_keys import ensure_first_key
from node.policy import SitePolicy, Subject, add_members, ensure_policy
from privacy.audit import AuditTrail


def per_call_us(fn: Callable[[], object], *, n: int, repeats: int = 7) -> float:
    """The best of `repeats` means over `n` calls, in microseconds (the least disturbed run)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter_ns()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter_ns() - start) / n / 1000)
    return round(best, 2)


def request(path: str, headers: dict[str, str]) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return Request({"type": "http", "method": "GET", "path": path, "headers": raw, "query_string": b""})


def identity(name: str, role: str) -> Identity:
    now = datetime.now(UTC)
    return Identity(name, role, "bench", now - timedelta(days=1), now + timedelta(days=1), 1, "0" * 64)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        layout = NodeLayout(Path(tmp) / "state")
        members = [f"reviewer-{i}" for i in range(20)]  # a site with a few listed reviewers
        ensure_policy(layout.access_policy, site="site-a")
        add_members(layout.access_policy, site="site-a", org="site-a", names=members)
        audit = AuditTrail(layout.audit)
        policy = SitePolicy(layout.access_policy, audit=audit)
        keys = ensure_first_key(layout)
        key = layout.api_key.read_text().strip()
        peers = {"cert": identity("reviewer-7", "reviewer"), "none": None}
        which = {"peer": "none"}

        def peer(_: Request) -> Identity | None:
            return peers[which["peer"]]

        access = AccessPolicy(site="site-a", audit=audit, api_keys=keys, agent_token="t" * 32, policy=policy, peer=peer)
        keyed = request("/v1/chat/completions", {"authorization": f"Bearer {key}"})
        reviewer = request("/v1/explanations", {})
        subject = Subject("cert", "reviewer-7", "reviewer")

        results: dict[str, float] = {}
        results["casbin_uncached"] = per_call_us(
            lambda: policy._decisions._evaluate("cert", "reviewer-7", "reviewer", "explanations", ""),
            n=max(args.n // 10, 50),
        )
        results["policy_allows"] = per_call_us(lambda: policy.allows(subject, "explanations"), n=args.n)
        results["require_key"] = per_call_us(lambda: access.require(keyed, "application"), n=args.n)
        which["peer"] = "cert"
        results["require_cert"] = per_call_us(lambda: access.require(reviewer, "reviewer"), n=args.n)
        which["peer"] = "none"
        real = policy.allows
        policy.allows = lambda *a, **k: True  # type: ignore[method-assign]  # the baseline: no policy step
        results["require_key_no_policy"] = per_call_us(lambda: access.require(keyed, "application"), n=args.n)
        policy.allows = real  # type: ignore[method-assign]
        results["policy_overhead_key"] = round(results["require_key"] - results["require_key_no_policy"], 2)
        lines = len(policy.rules.policies) + len(policy.rules.groupings)

    out = {
        "benchmark": "access_policy",
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": machine("cpu"),
        "versions": versions("casbin", "starlette"),
        "policy_lines": lines,
        "unit": "microseconds per request (best of 7 means)",
        "results": results,
    }
    print(json.dumps(out, indent=2))
    if args.out:
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
