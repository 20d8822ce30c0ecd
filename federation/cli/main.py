"""`fedseek`: the one console script, and the only place that wires every package together.

Each subcommand is a thin adapter from arguments to a library call. Every deliberate failure is
a `FedSeekError` (federation/errors.py); `main` maps it in one place: one line on stderr
(`fedseek: error: ...`) and the error's exit code (2).

`fedseek --help` builds the whole parser, so nothing at module level here or in the command
modules may import torch, opacus, transformers, peft, shap or Flower: handlers import what they
need when they run (tests/federation/cli/test_help.py checks it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from federation.errors import FedSeekError, InvalidInput, Unavailable, kind_for_status

if TYPE_CHECKING:
    import httpx

Handler = Callable[[argparse.Namespace], int]


# ---- model --------------------------------------------------------------------------------
def _model_tiny(args: argparse.Namespace) -> int:
    from node.model import TinyModelConfig, write_tiny_model

    if args.pretrain:
        from fedseek_examples.demo.pretrain import write_pretrained_tiny_model
        from fedseek_examples.demo.run import default_cache_dir

        cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
        info = write_pretrained_tiny_model(Path(args.out), config=TinyModelConfig(seed=args.seed), cache_dir=cache)
        how = "from the cache" if info["cached"] else f"pretrained in {info['seconds']:.0f} s"
        print(f"tiny DeepSeek-V3 model, {how} on {info['public_chats']} public chats, written to {args.out}")
        return 0
    out = write_tiny_model(Path(args.out), TinyModelConfig(seed=args.seed))
    print(f"tiny DeepSeek-V3 model written to {out}")
    return 0


# ---- services ------------------------------------------------------------------------------
def _coordinator_start(args: argparse.Namespace) -> int:
    from coordinator.service import run_coordinator
    from federation.protocol import config as cfg

    if args.config:
        conf = cfg.load(cfg.CoordinatorConfig, Path(args.config))
    else:
        if not (args.pki and args.state):
            raise InvalidInput("give --config FILE, or --pki and --state")
        conf = cfg.CoordinatorConfig(
            pki_dir=args.pki,
            state_dir=args.state,
            fleet_host=args.fleet_host,
            fleet_port=args.fleet_port,
            site_keys_dir=args.site_keys or str(Path(args.pki) / "site-keys"),
        )
    if not Path(conf.pki_dir).is_dir():  # the state directory may be new; the PKI must be there
        from federation.errors import NotFound

        raise NotFound(f"no such directory: {conf.pki_dir} (the PKI directory: --pki, or pki_dir in the config)")
    run_coordinator(conf)
    return 0


def _node_start(args: argparse.Namespace) -> int:
    from federation.protocol import config as cfg
    from node.agent import run_node

    run_node(cfg.load(cfg.NodeConfig, Path(args.config)))
    return 0


def _run(args: argparse.Namespace) -> int:
    from coordinator.runs import Continuation, resume_plan, run
    from federation.protocol.round_settings import RunSettings

    def show(rec: dict[str, Any]) -> None:
        if rec.get("version") is None:  # the run's error, raised next, says why
            print(f"round {rec['round']}: no global adapter", flush=True)
            return
        print(f"round {rec['round']}: {rec['version']} from {rec['accepted']} eval_loss={rec['eval_loss']}", flush=True)
        for who, why in sorted(rec.get("rejected", {}).items()):  # a refused update (outsized, malformed) is news
            print(f"round {rec['round']}: rejected {who}: {why}", flush=True)
        rolled_back = sorted(site for site, status in rec.get("release", {}).items() if status == "retired")
        if rolled_back:  # the sites' gray release found it worse than what they serve (node/release.py)
            print(f"round {rec['round']}: {rec['version']} rolled back at {', '.join(rolled_back)}", flush=True)

    if args.resume:  # the run's recorded settings, from its last version, after the last round it started
        settings, continuation = resume_plan(Path(args.state), args.resume, more_rounds=args.rounds)
        print(f"resuming {args.resume} at round {continuation.start_round} from {continuation.parent or 'the seed'}")
        summary = run(
            Path(args.state),
            settings=settings,
            timeout=args.timeout,
            progress=show,
            app_dir=args.app,
            continuation=continuation,
        )
        print(json.dumps(summary["global_adapter"], indent=2))
        return 0
    settings = RunSettings(
        run_name=args.name,
        num_rounds=args.rounds if args.rounds is not None else RunSettings().num_rounds,
        min_nodes=args.min_nodes,
        ffa_lora=args.ffa_lora,
        budget_share=args.budget_share,
        aggregation=args.aggregation,
        trim_fraction=args.trim_fraction,
        update_norm_ratio=args.update_norm_ratio,
        secagg=args.secagg,
        noise_schedule=args.noise_schedule,
        server_opt=args.server_opt,
        server_lr=args.server_lr,
        server_momentum=args.server_momentum,
    )  # a bad value is refused here (RoundSettingsError: one line, exit 2), before anything is submitted
    start = Continuation(parent=args.parent) if args.parent else None  # a new run from a registry version
    summary = run(
        Path(args.state), settings=settings, timeout=args.timeout, progress=show, app_dir=args.app, continuation=start
    )
    print(json.dumps(summary["global_adapter"], indent=2))
    return 0


# ---- explanations -------------------------------------------------------------------------------
def _explain(args: argparse.Namespace) -> int:
    """Run a background explanation at a node and follow it; the work stays at the site."""
    import ssl
    import time

    import httpx
    from tqdm import tqdm

    from federation.security import pki
    from federation.security.peer_pin import pinned_client_context

    body = {
        **_explain_input(args),
        "model": args.model,
        "response": args.response,
        "contrast": args.contrast,
        "granularity": args.granularity,
        "max_evals": args.max_evals,
        "background": True,
    }
    try:
        # Only a node of the consortium may answer: a reviewer's prompt goes to a site, not to any
        # certificate holder naming the host.
        tls = pinned_client_context(ca_cert=args.ca, role="node")
    except (OSError, ssl.SSLError, pki.PKIError) as exc:
        raise InvalidInput(f"cannot load CA certificate {args.ca}: {exc}") from exc
    try:
        tls.load_cert_chain(args.cert, args.key)  # explanations are for the reviewer role only
    except (OSError, ssl.SSLError) as exc:
        raise InvalidInput(f"cannot load the reviewer certificate {args.cert} / key {args.key}: {exc}") from exc
    try:
        with httpx.Client(base_url=args.node, verify=tls, timeout=60) as http:
            state = _node_json(http.post("/v1/explanations", json=body))
            with tqdm(total=args.max_evals, desc=state["id"], unit="eval", file=sys.stderr) as bar:
                while state.get("status") == "running":
                    bar.total, bar.n = state["progress"]["total"], state["progress"]["done"]
                    bar.refresh()
                    time.sleep(args.poll)
                    state = _node_json(http.get(f"/v1/explanations/{state['id']}"))
                if state.get("status") == "completed":
                    bar.n = bar.total
                    bar.refresh()
    except httpx.HTTPError as exc:
        raise Unavailable(f"node {args.node}: {exc}") from exc
    if state.get("status") != "completed":
        raise FedSeekError(f"explanation {state['id']} {state.get('status')}: {state.get('error', 'no result')}")
    out = Path(args.out or f"{state['id']}.json")
    out.write_text(json.dumps(state, indent=2), encoding="utf-8")
    print(f"explanation {state['id']} of {state['model']} ({state['granularity']} features):")
    if state.get("summary"):
        print(f"  {state['summary']}")
    for rank, top in enumerate(state["top_features"], start=1):
        print(f"  {rank}. {top['value']:+.4f}  {top.get('label') or top['feature']}")
    print(f"report (reviewers, sealed at the site): {args.node}{state['html']}")
    print(f"result: {out}")
    return 0


def _explain_input(args: argparse.Namespace) -> dict[str, Any]:
    if not args.messages_file:
        return {"prompt": args.prompt}
    try:
        data = json.loads(Path(args.messages_file).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"cannot read messages from {args.messages_file}: {exc}") from exc
    return {"messages": data.get("messages") if isinstance(data, dict) else data}  # a list, or {"messages": [...]}


def _node_json(response: httpx.Response) -> dict[str, Any]:
    """The JSON body of a node's success response; otherwise its OpenAI-style error, raised as its kind."""
    try:
        data = response.json()
    except ValueError:
        data = None
    if response.is_success and isinstance(data, dict):
        return data
    error = data.get("error") if isinstance(data, dict) else None
    message = error.get("message") if isinstance(error, dict) else response.text[:200]
    code = error.get("code") if isinstance(error, dict) else None
    kind = kind_for_status(response.status_code)
    raise kind(f"node answered {response.status_code}: {message}", code=code if isinstance(code, str) else None)


# ---- demo -------------------------------------------------------------------------------------
def _demo(args: argparse.Namespace) -> int:
    from fedseek_examples.demo.run import DemoSettings, run_demo

    report = run_demo(
        DemoSettings(
            out=Path(args.out),
            sites=args.sites,
            rounds=args.rounds,
            keep_running=args.keep_running,
            cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        )
    )
    print(f"report: {Path(args.out) / 'report.json'} (rounds completed: {report['rounds_completed']})")
    return 0


def _version() -> str:
    """The installed distribution's version (importlib.metadata: no import of the packages themselves)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedseek")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedseek", description="Private, federated DeepSeek for regulated industries")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO) as well as warnings")
    from federation.cli.logs import ENV, FORMATS, default_format

    parser.add_argument(
        "--log-format",
        choices=FORMATS,
        default=default_format(),
        help=f"plain lines for a terminal, or one JSON object a line (ts, level, logger, msg, pid) for a log "
        f"shipper (default: ${ENV}, else plain)",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    from federation.cli.ca import add_ca_commands

    add_ca_commands(sub)

    from federation.cli.app import add_app_commands

    add_app_commands(sub)

    from federation.cli.monitoring import add_monitoring_commands

    add_monitoring_commands(sub)

    model = sub.add_parser("model", help="model utilities").add_subparsers(dest="model_command", required=True)
    p = model.add_parser("tiny", help="write a tiny seeded DeepSeek-V3 model with the real tokenizer")
    p.add_argument("--out", required=True, help="directory to write the model into")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: %(default)s)")
    p.add_argument(
        "--pretrain", action="store_true", help="pretrain on public synthetic referral chats (the demo's base; cached)"
    )
    p.add_argument("--cache-dir", help="pretrained models by key (default: $FEDSEEK_CACHE or ~/.cache/fedseek)")
    p.set_defaults(func=_model_tiny)
    from federation.cli.model import add_model_commands

    add_model_commands(model)  # list|promote|rollback|policy: a node's gray release

    coord = sub.add_parser("coordinator", help="consortium coordinator").add_subparsers(
        dest="coord_command", required=True
    )
    p = coord.add_parser("start", help="start SuperLink behind the mTLS fleet gateway (nginx)")
    p.add_argument("--config", help="coordinator config (JSON); otherwise --pki and --state")
    p.add_argument("--pki", help="PKI directory holding the coordinator's certificate")
    p.add_argument("--state", help="the coordinator's state directory")
    p.add_argument(
        "--fleet-host", default="127.0.0.1", help="address of the sites' mTLS fleet endpoint (default: %(default)s)"
    )
    p.add_argument("--fleet-port", type=int, default=9443, help="port of the fleet endpoint (default: %(default)s)")
    p.add_argument("--site-keys", help="directory of <site>.pub SuperNode keys (default: PKI/site-keys)")
    p.set_defaults(func=_coordinator_start)

    node = sub.add_parser("node", help="site node agent").add_subparsers(dest="node_command", required=True)
    p = node.add_parser("start", help="start the node agent daemon")
    p.add_argument("--config", required=True, help="the node's config (JSON)")
    p.set_defaults(func=_node_start)
    from federation.cli.enroll import add_enroll_command

    add_enroll_command(node)  # the site's key and certificate request, made on the site

    from federation.protocol.round_settings import AGGREGATIONS, NOISE_SCHEDULES, SERVER_OPTS, RunSettings

    run_defaults = RunSettings()
    p = sub.add_parser("run", help="start a federated run on the running coordinator")
    p.add_argument("--state", required=True, help="the coordinator's state directory")
    p.add_argument(
        "--rounds",
        type=int,
        help=f"rounds to run (default: {run_defaults.num_rounds}; with --resume: the rest of the run's plan, "
        "else this many more)",
    )
    p.add_argument(
        "--min-nodes", type=int, default=run_defaults.min_nodes, help="sites each round needs (default: %(default)s)"
    )
    p.add_argument(
        "--name",
        default=run_defaults.run_name,
        help="the run's name in the registry and ledgers (default: %(default)s)",
    )
    start = p.add_mutually_exclusive_group()
    start.add_argument(
        "--resume",
        metavar="RUN",
        help="continue RUN after a coordinator crash: its settings, from its last version, after the last round "
        "it started (no site is charged twice for a round; other run options are ignored)",
    )
    start.add_argument("--parent", metavar="VERSION", help="start a new run from this registry version")
    p.add_argument(
        "--budget-share",
        type=float,
        default=run_defaults.budget_share,
        help="share of each site's remaining privacy budget this run may spend (default: %(default)s)",
    )
    p.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the run (default: %(default)s)")
    p.add_argument(
        "--ffa-lora",
        action="store_true",
        help="FFA-LoRA: freeze A at the shared seeded init and send only B (about half the bytes, exact averaging)",
    )
    p.add_argument(
        "--secagg",
        action="store_true",
        help="secure aggregation (Flower's SecAgg+): the coordinator sees only the sum of the sites' updates; "
        "needs at least 3 ready sites and --aggregation fedavg",
    )
    p.add_argument(
        "--aggregation",
        choices=AGGREGATIONS,
        default=run_defaults.aggregation,
        help="how each round's accepted updates are combined: weighted fedavg, or the robust coordinate-wise "
        "trimmed-mean or median (default: %(default)s)",
    )
    p.add_argument(
        "--trim-fraction",
        type=float,
        default=run_defaults.trim_fraction,
        help="trimmed-mean: share of values dropped at each end of every coordinate (default: %(default)s)",
    )
    p.add_argument(
        "--update-norm-ratio",
        type=float,
        default=run_defaults.update_norm_ratio,
        help="reject an update more than this many times the median of the others' distance from the round's "
        "start; 0: no bound (default: %(default)s)",
    )
    p.add_argument(
        "--noise-schedule",
        choices=NOISE_SCHEDULES,
        default=run_defaults.noise_schedule,
        help="how each site spreads the run's epsilon over its rounds: the same noise in every round, or equal "
        "epsilon steps (default: %(default)s)",
    )
    p.add_argument(
        "--server-opt",
        choices=SERVER_OPTS,
        default=run_defaults.server_opt,
        help="the coordinator's step from each round's combined update: the update itself, or FedOpt momentum / "
        "Adam (default: %(default)s)",
    )
    p.add_argument("--server-lr", type=float, default=run_defaults.server_lr, help="(default: %(default)s)")
    p.add_argument(
        "--server-momentum",
        type=float,
        default=run_defaults.server_momentum,
        help="fedavgm momentum, fedadam beta1 (default: %(default)s)",
    )
    p.add_argument(
        "--app",
        type=Path,
        help="signed app directory to submit (default: the coordinator state's app/, `fedseek app sign`)",
    )
    p.set_defaults(func=_run)

    from federation.cli.audit import add_audit_commands
    from federation.cli.backup import add_backup_commands
    from federation.cli.budget import add_budget_command
    from federation.cli.compliance import add_compliance_commands
    from federation.cli.keys import add_key_commands
    from federation.cli.keys_at_rest import add_kek_commands
    from federation.cli.privacy_audit import add_privacy_commands
    from federation.cli.serve import add_serve_command
    from federation.cli.witness import add_witness_commands

    add_budget_command(sub)
    add_witness_commands(sub)
    add_privacy_commands(sub)
    add_serve_command(sub)
    add_key_commands(sub)
    add_kek_commands(sub)
    add_audit_commands(sub)
    add_backup_commands(sub)
    add_compliance_commands(sub)  # fedseek compliance report: the inspector's HTML document
    from federation.cli.doctor import add_doctor_command

    add_doctor_command(sub)  # fedseek doctor: one line per check, exit code from the worst

    p = sub.add_parser("explain", help="explain a model answer with SHAP, computed at a site's node")
    p.add_argument("--node", required=True, help="the node's API base URL, e.g. https://localhost:8443")
    p.add_argument("--ca", required=True, help="consortium CA certificate (PEM) the node's TLS cert chains to")
    p.add_argument("--cert", required=True, help="your reviewer certificate (PEM), issued by the consortium CA")
    p.add_argument("--key", required=True, help="the private key of --cert (PEM)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the user prompt to explain")
    what.add_argument("--messages-file", help="JSON file with a chat `messages` list")
    p.add_argument("--model", help="adapter version (default: the latest served)")
    p.add_argument("--response", help="the answer to explain (default: the model generates one)")
    p.add_argument(
        "--contrast",
        metavar="RESPONSE",
        help="explain why the answer rather than RESPONSE: attributions of log p(answer) - log p(RESPONSE)",
    )
    p.add_argument(
        "--granularity", choices=["token", "word", "sentence"], default="word", help="feature unit (default: word)"
    )
    p.add_argument("--max-evals", type=int, default=200, help="model evaluations to spend (site policy caps it)")
    p.add_argument("--out", help="where to write the result JSON (default: ./<id>.json)")
    p.add_argument("--poll", type=float, default=0.5, help=argparse.SUPPRESS)
    p.set_defaults(func=_explain)

    p = sub.add_parser("demo", help="run a whole consortium on localhost, end to end")
    p.add_argument("--out", required=True, help="directory for the consortium's state and report.json")
    p.add_argument("--sites", type=int, default=3, help="hospital sites (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=2, help="federated rounds (default: %(default)s)")
    p.add_argument("--keep-running", action="store_true", help="leave the consortium serving after the run")
    p.add_argument("--cache-dir", help="pretrained base models by key (default: $FEDSEEK_CACHE or ~/.cache/fedseek)")
    p.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from federation.cli.logs import FORMATS, formatter

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.log_format not in FORMATS:  # from FEDSEEK_LOG_FORMAT, which argparse's choices do not see
        parser.error(f"FEDSEEK_LOG_FORMAT: expected one of {', '.join(FORMATS)}, got {args.log_format!r}")
    # UTC timestamps with milliseconds: an operator lines these up with audit records and other hosts' logs.
    logging.Formatter.converter = time.gmtime
    before = list(logging.root.handlers)  # a host process's (pytest's) handlers keep their own format
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    ours = [h for h in logging.root.handlers if h not in before]
    for handler in ours:
        handler.setFormatter(formatter(args.log_format))
    from privacy.redact import RedactingFilter  # no log line may carry a name, record number or phone number

    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())
    json_stderr = bool(ours) and args.log_format == "json"
    log = logging.getLogger("fedseek.cli")
    log.info("fedseek %s", args.command)
    func: Handler = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `fedseek budget --json | head`: the reader left; not an error of ours
        # Point stdout at /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except FedSeekError as exc:  # the one place a deliberate failure becomes what the operator sees
        if json_stderr:  # every stderr line stays a JSON object for the log shipper
            log.error("fedseek: error: %s", exc.one_line())
        else:
            print(f"fedseek: error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
