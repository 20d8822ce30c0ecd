"""`fedseek model list|promote|rollback|policy`: a site's gray release, from a person at the node's admin API.

These talk to the running node (`--node URL`) over mTLS with an admin certificate of the
consortium, not to its state directory: the running agent holds the release in memory and
routes every request by it, so a file changed behind its back would race it, and the node
audits each decision under the certificate's name (`release.promoted`, `release.rolled_back`,
`release.policy`). The node must answer with a consortium node certificate (pinned role).
"""

from __future__ import annotations

import argparse
import json
import ssl
from typing import Any

from federation.errors import InvalidInput, Unavailable, kind_for_status


def add_model_commands(model: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `list`, `promote`, `rollback` and `policy` under `fedseek model`."""

    def node_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--node", required=True, help="the node's API base URL, e.g. https://hospital-a:8443")
        p.add_argument("--ca", required=True, help="consortium CA certificate (PEM)")
        p.add_argument("--cert", required=True, help="your admin certificate (PEM), issued by the consortium CA")
        p.add_argument("--key", required=True, help="the private key of --cert (PEM)")
        p.add_argument("--json", action="store_true", help="print the node's answer as JSON")

    p = model.add_parser("list", help="a node's versions: stable, candidate, retired, share, eval loss, errors")
    node_args(p)
    p.set_defaults(func=_list)

    p = model.add_parser("promote", help="make a version the stable one at a node (audited under your name)")
    p.add_argument("version", help="the version to make stable (as `fedseek model list` shows)")
    node_args(p)
    p.set_defaults(func=_promote)

    p = model.add_parser(
        "rollback", help="roll back the candidate, or the stable version to the one before it (audited)"
    )
    p.add_argument("version", nargs="?", help="the candidate or stable version (default: the candidate, else stable)")
    node_args(p)
    p.set_defaults(func=_rollback)

    p = model.add_parser("policy", help="how a node judges a candidate: its traffic share and the promotion rule")
    p.add_argument("--share", type=float, help="share of default traffic the candidate serves (0: named only)")
    p.add_argument("--tolerance", type=float, help="relative eval loss increase tolerated against the stable")
    p.add_argument("--min-requests", type=int, help="requests the candidate serves before it is judged")
    p.add_argument("--error-margin", type=float, help="error rate above the stable's tolerated")
    node_args(p)
    p.set_defaults(func=_policy)


def _call(args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    import httpx

    from federation.security import pki
    from federation.security.peer_pin import pinned_client_context

    try:
        tls = pinned_client_context(ca_cert=args.ca, role="node")
        tls.load_cert_chain(args.cert, args.key)
    except (OSError, ssl.SSLError, pki.PKIError) as exc:
        raise InvalidInput(f"cannot load the CA {args.ca} or admin certificate {args.cert}: {exc}") from exc
    try:
        with httpx.Client(base_url=args.node, verify=tls, timeout=60) as http:
            response = http.request(method, path, json=body)
    except httpx.HTTPError as exc:
        raise Unavailable(f"node {args.node}: {exc}") from exc
    try:
        data = response.json()
    except ValueError:
        data = None
    if response.is_success and isinstance(data, dict):
        return data
    error = data.get("error") if isinstance(data, dict) else None
    message = error.get("message") if isinstance(error, dict) else response.text[:200]
    raise kind_for_status(response.status_code)(f"node answered {response.status_code}: {message}")


def _show(args: argparse.Namespace, release: dict[str, Any]) -> int:
    if args.json:
        print(json.dumps(release, indent=2))
        return 0
    policy = release["policy"]
    print(
        f"stable: {release['stable'] or 'base'}  candidate: {release['candidate'] or '-'}  "
        f"(share {policy['share']:g}, tolerance {policy['tolerance']:g}, min-requests {policy['min_requests']}, "
        f"error-margin {policy['error_margin']:g})"
    )
    print(f"{'VERSION':<16} {'STATUS':<10} {'SHARE':>6} {'EVAL_LOSS':>10} {'REQUESTS':>9} {'ERRORS':>7}  REASON")
    for v in release["versions"]:
        loss = f"{v['eval_loss']:.4f}" if v["eval_loss"] is not None else "-"
        print(
            f"{v['version']:<16} {v['status']:<10} {v['share']:>6.2f} {loss:>10} {v['requests']:>9} "
            f"{v['errors']:>7}  {v['reason']}"
        )
    return 0


def _list(args: argparse.Namespace) -> int:
    return _show(args, _call(args, "GET", "/v1/admin/models"))


def _promote(args: argparse.Namespace) -> int:
    return _show(args, _call(args, "POST", "/v1/admin/models/promote", {"version": args.version}))


def _rollback(args: argparse.Namespace) -> int:
    return _show(args, _call(args, "POST", "/v1/admin/models/rollback", {"version": args.version}))


def _policy(args: argparse.Namespace) -> int:
    fields = {"share": args.share, "tolerance": args.tolerance, "min_requests": args.min_requests}
    fields["error_margin"] = args.error_margin
    return _show(
        args, _call(args, "POST", "/v1/admin/models/policy", {k: v for k, v in fields.items() if v is not None})
    )
