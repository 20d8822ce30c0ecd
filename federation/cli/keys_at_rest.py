"""`fedseek keys status|encrypt|rotate`: a site's encryption at rest under its key-encryption key.

    fedseek keys status  --config NODE.json      the site's KEK id; encrypted files by KEK id; files in clear
    fedseek keys encrypt --config NODE.json      encrypt training data, adapters and old explanations in place
    fedseek keys rotate  --config NODE.json --new-passphrase-file FILE | --new-command "CMD ARGS"
                                                 re-wrap every file's data key under a new KEK, then point
                                                 the config at it (the data itself is not rewritten)

Each takes the node's config (its `kek`, `data_dir` and `state_dir`); `status` needs no key. Run
`encrypt` and `rotate` with the node stopped: it reads its files at start. Both are audited in the
site's trail (`at_rest.encrypted`, `kek.rotated`), and both may be run again after a crash: a file
already done is skipped. Not `fedseek key`, which manages API keys.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import shlex
from collections import Counter
from pathlib import Path
from typing import Any

from federation.errors import Conflict, InvalidInput
from federation.ops.atomic import write_atomic
from federation.ops.layout import NodeLayout
from federation.protocol import config as cfg
from federation.security import at_rest


def add_kek_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `keys status|encrypt|rotate` on the root parser's subcommands."""
    keys = sub.add_parser("keys", help="encryption at rest: the site's key-encryption key").add_subparsers(
        dest="keys_command", required=True
    )
    p = keys.add_parser("status", help="the site's KEK and its encrypted files, by KEK id (no key needed)")
    p.add_argument("--config", required=True, type=Path, help="the node's config (NODE.json)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_status)

    p = keys.add_parser(
        "encrypt", help="encrypt the site's data, adapters and explanations kept in clear (node stopped)"
    )
    p.add_argument("--config", required=True, type=Path, help="the node's config; its `kek` is used")
    p.set_defaults(func=_encrypt)

    p = keys.add_parser("rotate", help="re-wrap every encrypted file's key under a new KEK (node stopped)")
    p.add_argument("--config", required=True, type=Path, help="the node's config; its `kek` is the old KEK")
    new = p.add_mutually_exclusive_group(required=True)
    new.add_argument("--new-passphrase-file", help="the new KEK's passphrase file (0600)")
    new.add_argument("--new-command", help='the new KEK\'s command, e.g. "kms-unwrap --key site-a-2027"')
    p.set_defaults(func=_rotate)


def _load(path: Path) -> tuple[cfg.NodeConfig, NodeLayout]:
    config = cfg.load(cfg.NodeConfig, path)
    return config, NodeLayout(Path(config.state_dir))


def _refuse_if_running(layout: NodeLayout) -> None:
    """The node reads its files at start and writes adapters and explanations while it runs: files
    renamed or re-wrapped under it would fail its next read, so it must be stopped."""
    try:
        pid = int(json.loads(layout.endpoints.read_text())["pid"])
        os.kill(pid, 0)
    except (OSError, ValueError, KeyError, TypeError):
        return
    raise Conflict(f"the node is running (pid {pid}, {layout.endpoints}); stop it first")


def _envelope(config: cfg.NodeConfig, layout: NodeLayout) -> at_rest.Envelope:
    if not config.kek:
        raise InvalidInput('the config has no `kek`: add {"passphrase_file": PATH} or {"command": [ARGV, ...]}')
    envelope = at_rest.site_envelope(config.kek, layout.kek)
    assert envelope is not None  # config.kek is set
    return envelope


def _roots(config: cfg.NodeConfig) -> list[Path]:
    return [Path(config.data_dir), Path(config.state_dir)]


def _audit(layout: NodeLayout, action: str, details: dict[str, Any]) -> None:
    from privacy.audit import AuditTrail

    AuditTrail(layout.audit).append(
        actor=f"operator:{getpass.getuser()}", action=action, resource="kek", details=details
    )


# ---- status ------------------------------------------------------------------------------------
def in_clear(config: cfg.NodeConfig) -> list[Path]:
    """The files a site with a KEK keeps encrypted that are in clear: training and eval data, adapter
    weights, explanations sealed under the site key."""
    from node import adapter_store
    from node.data import TRAIN_DIR, TRAIN_FILE

    data = Path(config.data_dir)
    layout = NodeLayout(Path(config.state_dir))
    found = [data / name for name in (TRAIN_FILE, "eval.jsonl") if (data / name).is_file()]
    if (data / TRAIN_DIR).is_dir():
        found += sorted(p for p in (data / TRAIN_DIR).glob("*.jsonl") if p.is_file())
    found += sorted(layout.adapters.glob(f"*/{adapter_store.WEIGHTS_FILE}"))
    if layout.explanations.is_dir():
        found += sorted(p for p in layout.explanations.glob("*.sealed") if not at_rest.is_encrypted(p))
    return found


def _status(args: argparse.Namespace) -> int:
    config, layout = _load(args.config)
    state = at_rest.read_kek_state(layout.kek)
    files = at_rest.encrypted_files(*_roots(config))
    by_kek = Counter(at_rest.header_kek_id(p) for p in files)
    clear = in_clear(config)
    if args.json:
        out = {
            "kek": state,
            "configured": sorted(config.kek) or None,
            "encrypted": {kid: n for kid, n in sorted(by_kek.items())},
            "files": [{"path": str(p), "kek": at_rest.header_kek_id(p)} for p in files],
            "in_clear": [str(p) for p in clear],
        }
        print(json.dumps(out, indent=2))
        return 0
    if state is None:
        print(
            "no KEK: this site keeps its training data and adapters in clear" if not config.kek else "KEK not used yet"
        )
    else:
        print(f"site KEK {state['id']} ({state['source']}, since {state['since']})")
    for kid, count in sorted(by_kek.items()):
        mark = "" if state and kid == state["id"] else "  (not the site's KEK: rotate or restore)"
        print(f"  {count} file(s) under KEK {kid}{mark}")
    if clear and config.kek:
        print(f"{len(clear)} file(s) in clear (run `fedseek keys encrypt`): " + ", ".join(str(p) for p in clear[:5]))
    return 0


# ---- encrypt -----------------------------------------------------------------------------------
def _encrypt(args: argparse.Namespace) -> int:
    from node import adapter_store
    from node.site_keys import load_site_keys

    config, layout = _load(args.config)
    _refuse_if_running(layout)
    envelope = _envelope(config, layout)
    done: list[str] = []
    for path in in_clear(config):
        if path.suffix == ".sealed":  # an explanation sealed under the site key: re-sealed under the KEK
            keys = load_site_keys(layout.site_secret)
            explanation, kind = path.name.removesuffix(".sealed").rsplit(".", 1)
            label = f"{explanation}/{kind}"
            plain = keys.unseal(path.read_bytes(), label=label)
            write_atomic(path, keys.with_envelope(envelope).seal(plain, label=label))
        elif path.name == adapter_store.WEIGHTS_FILE:
            meta = json.loads((path.parent / adapter_store.META_FILE).read_text())
            context = adapter_store.weights_context(meta["version"], meta["sha256"])
            _encrypt_beside(envelope, path, path.with_name(adapter_store.ENCRYPTED_WEIGHTS_FILE), context=context)
        else:
            _encrypt_beside(envelope, path, path.with_name(path.name + ".enc"), context="data")
        done.append(str(path))
    _audit(layout, "at_rest.encrypted", {"kek": envelope.kek_id, "files": done})
    print(f"{len(done)} file(s) encrypted under KEK {envelope.kek_id}" + "".join(f"\n  {p}" for p in done))
    return 0


def _encrypt_beside(envelope: at_rest.Envelope, src: Path, dst: Path, *, context: str) -> None:
    """Encrypt `src` into `dst`, check that `dst` opens to the same bytes, then remove `src`.

    Removing a file does not erase its blocks (on SSDs and copy-on-write file systems nothing
    reliably does): data that was ever in clear on a disk is only as safe as that disk's disposal."""
    envelope.encrypt_file(src, dst, context=context)
    if envelope.read(dst, context=context) != src.read_bytes():
        dst.unlink()
        raise at_rest.TamperedFile(f"{dst}: did not read back as {src}; {src} kept")
    src.unlink()


# ---- rotate ------------------------------------------------------------------------------------
def _rotate(args: argparse.Namespace) -> int:
    config, layout = _load(args.config)
    _refuse_if_running(layout)
    old = _envelope(config, layout)
    spec: dict[str, Any] = (
        {"passphrase_file": args.new_passphrase_file}
        if args.new_passphrase_file
        else {"command": shlex.split(args.new_command)}
    )
    source = at_rest.kek_source(spec)
    new = at_rest.Envelope(source, salt=os.urandom(at_rest.SALT_BYTES), older=[old.source])
    if new.kek_id == old.kek_id:
        raise InvalidInput(f"the new KEK is the site's KEK {old.kek_id}; nothing to rotate")
    files = at_rest.encrypted_files(*_roots(config))
    rewrapped = [str(p) for p in files if new.rewrap(p)]  # a file already under the new KEK is skipped
    previous = [old.kek_id, *((at_rest.read_kek_state(layout.kek) or {}).get("previous", []))]
    at_rest.write_kek_state(layout.kek, new, previous=previous)
    raw = json.loads(Path(args.config).read_text())
    raw["kek"] = spec
    write_atomic(Path(args.config), json.dumps(raw, indent=2))
    details = {"from": old.kek_id, "to": new.kek_id, "files": len(files), "rewrapped": len(rewrapped)}
    _audit(layout, "kek.rotated", details)
    print(
        f"KEK {old.kek_id} -> {new.kek_id}: {len(rewrapped)} of {len(files)} file(s) re-wrapped; {args.config} updated"
    )
    return 0
