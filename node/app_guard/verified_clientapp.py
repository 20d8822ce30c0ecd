"""`python -m node.app_guard.verified_clientapp`: the task process the app guard starts instead of `flwr-clientapp`.

It is Flower's own `run_clientapp` with one hook: the call that unpacks the app bundle
(`install_from_fab`, right after `PullTaskInput` hands over message, context, run and bundle)
first checks the consortium's app-publisher signature. A refused bundle is never unpacked or
imported; the `AppRefused` takes `run_clientapp`'s error path, so the ServerApp gets an error
reply at once (its reason names the refusal) and the task ends failed.

The verdict goes to the guard on the inherited `--verdict-fd` pipe, before any app code can run
in this process; an approved bundle is unpacked only after the guard acknowledges on stdin that
the approval is in the site's audit trail. The task token comes on stdin's first line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import IO, Any

from federation.errors import FedSeekError
from federation.security.app_signing import AppRefused, fab_identity, load_publishers, verify_fab

_ACK = "recorded"


class _Verdict:
    """The one verdict this task sends to the guard."""

    def __init__(self, pipe: IO[str]) -> None:
        self._pipe: IO[str] | None = pipe

    def send(self, **fields: Any) -> None:
        if self._pipe is None:
            raise AppRefused("this task already sent its verdict")  # one bundle per task
        self._pipe.write(json.dumps(fields) + "\n")
        self._pipe.close()
        self._pipe = None


def guarded_install(original: Any, publishers: Path, verdict: _Verdict) -> Any:
    """`install_from_fab`, unpacking only a bundle signed by a trusted publisher, once its approval is recorded."""
    from flwr.supercore.task_identity import TaskIdentity

    def install_from_fab(fab_file: Any, install_dir: Path | None = None, skip_prompt: bool = False) -> Path:
        task = {"run_id": TaskIdentity.run_id}
        try:
            if not isinstance(fab_file, bytes):
                raise AppRefused("app bundle not received as bytes")
            approval = verify_fab(fab_file, load_publishers(publishers))  # re-read: a rotated key counts at once
        except FedSeekError as exc:
            identity = fab_identity(fab_file) if isinstance(fab_file, bytes) else {}
            verdict.send(verdict="refused", reason=exc.one_line(), **task, **identity)
            raise AppRefused(f"this site runs only app bundles signed by the consortium: {exc.one_line()}") from None
        verdict.send(
            verdict="approved",
            key_id=approval.key_id,
            app=approval.app,
            version=approval.version,
            digest=approval.digest,
            fab_sha256=approval.fab_sha256,
            **task,
        )
        if sys.stdin.readline().strip() != _ACK:
            raise AppRefused("the site's audit trail did not record the approval; not running the app")
        path: Path = original(fab_file, install_dir=install_dir, skip_prompt=skip_prompt)
        return path

    return install_from_fab


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m node.app_guard.verified_clientapp")
    p.add_argument("--runtime-api-address", required=True)
    p.add_argument("--insecure", action="store_true")
    p.add_argument("--root-certificates")
    p.add_argument("--parent-pid", type=int)
    p.add_argument("--verdict-fd", type=int, required=True)
    p.add_argument("--publishers", required=True, type=Path)
    args = p.parse_args(argv)
    token = sys.stdin.readline().strip()
    verdict = _Verdict(os.fdopen(args.verdict_fd, "w", encoding="utf-8"))

    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime import run_clientapp as clientapp

    if "install_from_fab" not in clientapp.run_clientapp.__code__.co_names:  # the guard checked; so does the task
        verdict.send(verdict="refused", reason="flwr's run_clientapp no longer unpacks through install_from_fab")
        sys.exit(3)
    clientapp.install_from_fab = guarded_install(clientapp.install_from_fab, args.publishers, verdict)  # type: ignore[attr-defined]
    clientapp.run_clientapp(
        runtime_api_address=args.runtime_api_address,
        token=token,
        insecure=args.insecure,
        certificates=validate_and_resolve_root_certificates(args.root_certificates, args.insecure),
        parent_pid=args.parent_pid,
        runtime_dependency_install=False,  # never install what a bundle asks for
    )


if __name__ == "__main__":
    main()
