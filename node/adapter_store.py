"""Adapters on disk: the versions a node has deployed, and the directories `fedseek serve` is given.

A deployed version is a directory `<adapters>/<version>/` with its weights (`adapter.safetensors`)
and what the host needs to serve it again (`adapter.json`: sha256, parent, created); the JSON is
written last, so a version counts as stored only once both are whole. `fedseek serve --adapter`
also takes peft's `save_pretrained` output (`adapter_model.safetensors`).

At a site with a key-encryption key (`NodeConfig.kek`) the weights are stored encrypted,
`adapter.safetensors.enc` (federation.security.at_rest), bound to the version and sha256 that
`adapter.json` names, so neither file can be swapped or edited without the restore refusing it; a
site with a KEK refuses weights stored in clear (`fedseek keys encrypt` encrypts them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.numpy import load_file

from federation.ops.atomic import write_atomic
from federation.protocol import wire
from federation.protocol.names import InvalidNameError, check_adapter_name
from federation.security.at_rest import AtRestError, Envelope, WrongKek, header_kek_id

if TYPE_CHECKING:  # torch: not needed to check an adapter directory (`fedseek serve` does before loading)
    from node.engine import AdapterInfo, ModelHost

WEIGHTS_FILE = "adapter.safetensors"
META_FILE = "adapter.json"
RELEASE_FILE = "release.json"
"""Beside the version directories: which version is stable, which the candidate (node/release.py)."""
ADAPTER_FILES = (WEIGHTS_FILE, "adapter_model.safetensors")  # FedSeek's own, or peft's save_pretrained
ENCRYPTED_WEIGHTS_FILE = WEIGHTS_FILE + ".enc"


def weights_context(version: str, sha256: str) -> str:
    """What an encrypted weights file is bound to: its version and the sha256 its adapter.json names."""
    return f"adapter/{version}/{sha256}"


def weights_file(directory: Path) -> Path | None:
    """The adapter weights in `directory` (FedSeek's file first), or None if there are none."""
    return next((directory / f for f in ADAPTER_FILES if (directory / f).is_file()), None)


def install_from_dir(host: ModelHost, name: str, directory: Path) -> AdapterInfo:
    """Serve the adapter in `directory` as model `name` (raises FileNotFoundError if it has no weights)."""
    file = weights_file(directory)
    if file is None:
        raise FileNotFoundError(f"adapter {name}: no {' or '.join(ADAPTER_FILES)} in {directory}")
    arrays = load_file(str(file))
    return host.install(name, arrays, sha256=wire.sha256_of(arrays))


def release_path(adapters: Path) -> Path:
    """The gray release's state file (a file, so `restore_versions` never takes it for a version)."""
    return adapters / RELEASE_FILE


def save_version(
    adapters: Path,
    info: AdapterInfo,
    arrays: wire.Arrays,
    *,
    envelope: Envelope | None = None,
    lineage: dict[str, Any] | None = None,
) -> None:
    """Keep a deployed version so that `restore_versions` serves it again after a restart (encrypted
    under the site's KEK with `envelope`); `lineage` is what the deployment said of its training (the
    registry's run, round and contributing sites with their epsilon), shown in explanation reports."""
    target = adapters / check_adapter_name(info.version)  # never a path: the directory stays under `adapters`
    target.mkdir(parents=True, exist_ok=True)
    if envelope is None:
        write_atomic(target / WEIGHTS_FILE, wire.encode(arrays))
    else:
        envelope.write(
            target / ENCRYPTED_WEIGHTS_FILE, wire.encode(arrays), context=weights_context(info.version, info.sha256)
        )
    meta: dict[str, Any] = {
        "version": info.version,
        "sha256": info.sha256,
        "parent": info.parent,
        "created": info.created,
    }
    if lineage is not None:
        meta["lineage"] = lineage
    write_atomic(target / META_FILE, json.dumps(meta))


def read_lineage(adapters: Path, version: str) -> dict[str, Any] | None:
    """The lineage a deployed version's adapter.json holds (its parent too), or None if it has none."""
    try:
        meta = json.loads((adapters / check_adapter_name(version) / META_FILE).read_text())
    except (OSError, ValueError, InvalidNameError):
        return None
    lineage = meta.get("lineage")
    if not isinstance(lineage, dict):
        return None
    return {**lineage, "parent": lineage.get("parent", meta.get("parent"))}


def restore_versions(host: ModelHost, adapters: Path, *, envelope: Envelope | None = None) -> None:
    """Install every stored version, oldest first (so the newest is the latest), each checked against its sha256;
    an encrypted one opened with `envelope` (an AtRestError naming the file if it cannot be)."""
    if not adapters.is_dir():
        return
    metas = [json.loads(p.read_text()) | {"dir": p.parent} for p in adapters.glob(f"*/{META_FILE}")]
    for meta in metas:  # a stored version is the directory it lies in, and a name a deploy could have used
        if meta.get("version") != meta["dir"].name:
            raise InvalidNameError(
                f"{meta['dir'] / META_FILE} names version {meta.get('version')!r}, not its directory"
            )
        check_adapter_name(meta["version"], what=f"stored adapter version in {meta['dir']}")
    for meta in sorted(metas, key=lambda m: (m["created"], m["version"])):
        arrays = wire.decode(
            read_weights(meta["dir"], version=meta["version"], sha256=meta["sha256"], envelope=envelope)
        )
        host.install(meta["version"], arrays, sha256=meta["sha256"], parent=meta.get("parent"), created=meta["created"])


class StoredInClear(AtRestError):
    """Adapter weights in clear at a site that keeps them encrypted."""


def read_weights(directory: Path, *, version: str, sha256: str, envelope: Envelope | None) -> bytes:
    """A stored version's weights: decrypted (and checked) if encrypted; in clear only at a site without a KEK."""
    encrypted, plain = directory / ENCRYPTED_WEIGHTS_FILE, directory / WEIGHTS_FILE
    if encrypted.exists():
        if envelope is None:
            raise WrongKek(
                f"{encrypted}: encrypted under KEK {header_kek_id(encrypted)} and this node has no KEK configured"
            )
        return envelope.read(encrypted, context=weights_context(version, sha256))
    if envelope is not None and plain.exists():
        raise StoredInClear(f"{plain}: adapter weights in clear at a site with a KEK; run `fedseek keys encrypt`")
    return plain.read_bytes()
