"""`fedseek serve`: the node's OpenAI serving alone, with no federation (like `vllm serve`).

For quick starts and benchmarks: the same engine, routes, API keys, audit trail and metrics as
`fedseek node start`, but no PKI, ledger or training. The HTTP port opens at once and answers 503
until the model has loaded. Plain HTTP (loopback by default) or server-side TLS with --cert/--key.
What is served is built by `node.build` (`serving_access`, `build_serving`); this module parses
the arguments, runs the HTTP server and prints.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from federation.errors import InvalidInput

log = logging.getLogger("fedseek.serve")


def add_serve_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `serve` on the root parser's subcommands."""
    p = sub.add_parser("serve", help="serve a model (and LoRA adapters) over the OpenAI API, no federation")
    p.add_argument("--model", required=True, help="local Hugging Face checkpoint directory")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="a LoRA adapter to serve")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    p.add_argument(
        "--state",
        default=None,
        help="audit trail and API keys (first key: STATE/api-key); default: $XDG_STATE_HOME/fedseek/serve "
        "(~/.local/state/fedseek/serve), never the current directory",
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (default: %(default)s)")
    p.add_argument(
        "--dtype",
        choices=("auto", "bfloat16", "float16", "float32"),
        default="auto",
        help="weight precision; auto: bfloat16 on CUDA, float32 on the CPU (default: %(default)s)",
    )
    p.add_argument("--cert", help="TLS certificate (PEM); with --key, serve HTTPS")
    p.add_argument("--key", help="TLS private key (PEM)")
    p.add_argument("--max-slots", type=int, default=8, help="requests decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    p.add_argument(
        "--max-model-len", type=int, default=4096, help="prompt plus answer tokens per request (default: %(default)s)"
    )
    p.set_defaults(func=_serve)


def parse_adapters(specs: list[str], *, base_model: str = "") -> dict[str, Path]:
    """NAME=DIR pairs; a NAME must fit the one version pattern and not be reserved (nor `base_model`,
    the name the base model is served under), as a deployed version must."""
    from federation.protocol.names import check_adapter_name
    from node.adapter_store import ADAPTER_FILES, weights_file

    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, directory = spec.partition("=")
        if not (sep and name and directory):
            raise InvalidInput(f"--adapter wants NAME=DIR, got {spec!r}")
        check_adapter_name(name, what="--adapter name", reserved=(base_model,) if base_model else ())
        path = Path(directory)
        if weights_file(path) is None:
            raise InvalidInput(f"adapter {name}: no {' or '.join(ADAPTER_FILES)} in {path}")
        out[name] = path
    return out


def default_state_dir() -> Path:
    """Where `fedseek serve` keeps its audit trail and keys unless told: the user's XDG state directory."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "fedseek" / "serve"


def check_model_dir(path: Path) -> None:
    """Refuse a model directory that cannot be a checkpoint before anything is created on disk."""
    if not path.is_dir():
        raise InvalidInput(f"model {path}: not a directory (give a local Hugging Face checkpoint directory)")
    if not (path / "config.json").is_file():
        raise InvalidInput(f"model {path}: no config.json (not a Hugging Face checkpoint directory)")


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from federation.errors import Unavailable
    from federation.ops.atomic import PRIVATE_UMASK
    from federation.ops.layout import NodeLayout
    from federation.security.mtls_server import KEEP_ALIVE_S, timed_h11
    from node.api import create_serving_app
    from node.build import ServeOptions, build_serving, serving_access

    if bool(args.cert) != bool(args.key):
        raise InvalidInput("give both --cert and --key for TLS, or neither")
    os.umask(PRIVATE_UMASK)  # the audit trail, keys and site secret: this user's alone
    options = ServeOptions(
        model_dir=Path(args.model),
        adapters=parse_adapters(args.adapter, base_model=Path(args.model).name),
        device=args.device,
        dtype=args.dtype,
        max_slots=args.max_slots,
        max_queue=args.max_queue,
        max_model_len=args.max_model_len,
    )
    check_model_dir(options.model_dir)  # before the state directory exists: a typo leaves nothing behind
    layout = NodeLayout(Path(args.state) if args.state else default_state_dir())
    policy = serving_access(layout)
    loaded: dict[str, Any] = {}
    failed: list[BaseException] = []

    def load() -> None:
        try:
            loaded["serving"] = build_serving(options, audit=policy.audit, layout=layout)
            print(f"model {options.model_dir.name} loaded; adapters: {sorted(options.adapters) or 'none'}", flush=True)
        except BaseException as exc:  # reported below; the server stops
            failed.append(exc)
            server.should_exit = True

    app = create_serving_app(lambda: loaded.get("serving"), policy, name=options.model_dir.name)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        http=timed_h11(),  # a request head must be complete within seconds (uvicorn alone never times it)
        ssl_certfile=args.cert,
        ssl_keyfile=args.key,
        timeout_keep_alive=KEEP_ALIVE_S,
    )
    server = uvicorn.Server(config)
    scheme = "https" if args.cert else "http"
    print(f"serving on {scheme}://{args.host}:{args.port}/v1 (API key in {layout.api_key}); loading...", flush=True)
    threading.Thread(target=load, name="fedseek-load", daemon=True).start()
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it against the handler that was in
    # place before; a no-op handler here lets the engine close and the command exit 0, as a
    # service manager expects of a requested stop.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run()
    finally:
        if "serving" in loaded:
            loaded["serving"].close()
    if failed:
        raise Unavailable(f"cannot serve: {str(failed[0]).splitlines()[0] if str(failed[0]) else failed[0]!r}")
    return 0
