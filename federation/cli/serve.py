"""`fedseek serve`: the node's OpenAI serving alone, with no federation (like `vllm serve`).

For quick starts and benchmarks: the same engine, routes, API keys, audit trail and metrics as
`fedseek node start`, but no PKI, ledger or training. The HTTP port opens at once and answers 503
until the model has loaded. Plain HTTP (loopback by default) or server-side TLS with --cert/--key.
"""

from __future__ import annotations

import argparse
import logging
import secrets
import signal
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger("fedseek.serve")

ADAPTER_FILES = ("adapter.safetensors", "adapter_model.safetensors")  # FedSeek's own, or peft's save_pretrained


def add_serve_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `serve` on the root parser's subcommands."""
    p = sub.add_parser("serve", help="serve a model (and LoRA adapters) over the OpenAI API, no federation")
    p.add_argument("--model", required=True, help="local Hugging Face checkpoint directory")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="a LoRA adapter to serve")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--state", default="fedseek-serve", help="audit trail and API keys (first key: STATE/api-key)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cert", help="TLS certificate (PEM); with --key, serve HTTPS")
    p.add_argument("--key", help="TLS private key (PEM)")
    p.add_argument("--max-slots", type=int, default=8, help="requests decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.set_defaults(func=_serve)


def parse_adapters(specs: list[str]) -> dict[str, Path]:
    from federation.cli.main import CLIError

    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, directory = spec.partition("=")
        if not (sep and name and directory):
            raise CLIError(f"--adapter wants NAME=DIR, got {spec!r}")
        path = Path(directory)
        if not any((path / f).is_file() for f in ADAPTER_FILES):
            raise CLIError(f"adapter {name}: no {' or '.join(ADAPTER_FILES)} in {path}")
        out[name] = path
    return out


def load_serving(args: argparse.Namespace, adapters: dict[str, Path], audit: Any) -> Any:
    """Model, adapters and engine; what `fedseek node start` builds, minus the federation."""
    from safetensors.numpy import load_file

    from federation.protocol import wire
    from node.engine import ModelHost
    from node.model import load_model
    from node.service import Serving

    model, tokenizer = load_model(args.model, device=args.device)
    host = ModelHost(model, tokenizer, model_name=Path(args.model).name)
    for name, path in adapters.items():
        file = next(path / f for f in ADAPTER_FILES if (path / f).is_file())
        arrays = load_file(str(file))
        host.install(name, arrays, sha256=wire.sha256_of(arrays))
    return Serving(
        host,
        audit,
        owner="local",
        max_slots=args.max_slots,
        max_queue=args.max_queue,
        max_model_len=args.max_model_len,
    )


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from federation.cli.main import CLIError
    from federation.security.mtls_server import KEEP_ALIVE_S
    from node.access import AccessPolicy
    from node.api_keys import ensure_first_key
    from node.server import create_serving_app
    from privacy.audit import AuditTrail

    if bool(args.cert) != bool(args.key):
        raise CLIError("give both --cert and --key for TLS, or neither")
    adapters = parse_adapters(args.adapter)
    state = Path(args.state)
    state.mkdir(parents=True, exist_ok=True)
    audit = AuditTrail(state / "audit.jsonl")  # one writer: serving and access refusals alike
    policy = AccessPolicy(
        site="local",
        audit=audit,
        api_keys=ensure_first_key(state),
        agent_token=secrets.token_urlsafe(32),  # no /internal routes here
    )
    loaded: dict[str, Any] = {}
    failed: list[BaseException] = []

    def load() -> None:
        try:
            loaded["serving"] = load_serving(args, adapters, audit)
            print(f"model {Path(args.model).name} loaded; adapters: {sorted(adapters) or 'none'}", flush=True)
        except BaseException as exc:  # reported below; the server stops
            failed.append(exc)
            server.should_exit = True

    app = create_serving_app(lambda: loaded.get("serving"), policy, name=Path(args.model).name)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        ssl_certfile=args.cert,
        ssl_keyfile=args.key,
        timeout_keep_alive=KEEP_ALIVE_S,
    )
    server = uvicorn.Server(config)
    scheme = "https" if args.cert else "http"
    print(f"serving on {scheme}://{args.host}:{args.port}/v1 (API key in {state / 'api-key'}); loading...", flush=True)
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
        raise CLIError(f"cannot serve: {str(failed[0]).splitlines()[0] if str(failed[0]) else failed[0]!r}")
    return 0
