"""What encryption at rest (federation.security.at_rest) costs a node: serving start-up and adapter deploy.

Measured on the CPU, each the median of `--repeats` runs with its min and max, in clear and under
a KEK (AES-256-GCM envelope, 64 KiB chunks):
- `kek`: getting the KEK once per process: scrypt of a passphrase file (n=2^15, r=8) and an external
  command (`printf`, standing in for a fast KMS client; a real KMS adds its network round trip);
- `deploy`: `adapter_store.save_version` (safetensors encode, encrypt, write, fsync, rename) of
  one adapter version, for the tiny model's adapter and for synthetic 16 and 128 MiB adapters (a
  DeepSeek-scale LoRA is tens to hundreds of MiB);
- `load`: reading one stored version back (`adapter_store.read_weights` + safetensors decode);
- `startup_tiny`: `adapter_store.restore_versions` of 3 stored versions into a real `ModelHost` of
  the tiny DeepSeek-V3 model (read, decrypt, decode, sha256 check, install): the adapter part of a
  node's start;
- `aead_mib_s`: raw envelope throughput in memory (encrypt, decrypt) on 128 MiB.

    .venv/bin/python bench/at_rest.py [--repeats 7] [--out bench/results/at_rest_cpu_DATE.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: the repo's packages

import numpy as np

from bench.common import machine, versions
from federation.protocol import wire
from federation.security.at_rest import CommandKek, Envelope, PassphraseKek
from node import adapter_store
from node.engine import AdapterInfo, ModelHost
from node.model import load_model, write_tiny_model

MIB = 1 << 20


def timed(fn: Callable[[], object], *, repeats: int, setup: Callable[[], object] | None = None) -> dict[str, float]:
    """Median, min and max seconds of `repeats` calls (`setup` before each, not timed)."""
    runs = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return {"median_s": statistics.median(runs), "min_s": min(runs), "max_s": max(runs), "n": len(runs)}


def synthetic(size: int, *, seed: int) -> wire.Arrays:
    """float32 LoRA-like arrays totalling `size` bytes (random: incompressible, as trained weights are)."""
    rng = np.random.default_rng(seed)
    n = size // 4 // 64
    return {f"layer.{i}.lora_A.weight": rng.standard_normal((16, n // 16), dtype=np.float32) for i in range(64)}


def kek_costs(tmp: Path, *, repeats: int) -> dict[str, Any]:
    passfile = tmp / "kek.pass"
    passfile.write_text("a long benchmark passphrase\n")
    passfile.chmod(0o600)
    salt = os.urandom(16)
    key_hex = os.urandom(32).hex()
    return {
        "passphrase_scrypt": timed(lambda: PassphraseKek(passfile).kek(salt), repeats=repeats),
        "command_printf": timed(lambda: CommandKek(["printf", "%s", key_hex]).kek(b""), repeats=repeats),
    }


def deploy_and_load(tmp: Path, arrays: wire.Arrays, envelope: Envelope | None, *, repeats: int) -> dict[str, Any]:
    adapters = tmp / ("enc" if envelope else "plain")
    sha = wire.sha256_of(arrays)
    info = AdapterInfo(version="v1", sha256=sha, parent=None, created=0)

    def clean() -> None:
        for p in (adapters / "v1").glob("*"):
            p.unlink()

    deploy = timed(
        lambda: adapter_store.save_version(adapters, info, arrays, envelope=envelope), repeats=repeats, setup=clean
    )
    directory = adapters / "v1"
    load = timed(
        lambda: wire.decode(adapter_store.read_weights(directory, version="v1", sha256=sha, envelope=envelope)),
        repeats=repeats,
    )
    size = sum(p.stat().st_size for p in directory.glob("adapter.safetensors*"))
    return {"deploy": deploy, "load": load, "stored_bytes": size}


def startup_tiny(tmp: Path, envelope: Envelope | None, *, repeats: int) -> dict[str, Any]:
    model_dir = write_tiny_model(tmp / "tiny")
    model, tok = load_model(model_dir)
    like = ModelHost(model, tok, model_name="shape").initial_arrays()
    adapters = tmp / ("tiny-enc" if envelope else "tiny-plain")
    rng = np.random.default_rng(0)
    for i in range(3):
        arrays = {k: rng.normal(0.0, 0.05, v.shape).astype(np.float32) for k, v in like.items()}
        info = AdapterInfo(version=f"v{i + 1}", sha256=wire.sha256_of(arrays), parent=None, created=i)
        adapter_store.save_version(adapters, info, arrays, envelope=envelope)
    hosts: list[ModelHost] = []

    def fresh() -> None:
        hosts[:] = [ModelHost(model, tok, model_name="tiny")]

    result = timed(
        lambda: adapter_store.restore_versions(hosts[0], adapters, envelope=envelope), repeats=repeats, setup=fresh
    )
    return {**result, "versions": 3, "adapter_bytes": sum(a.nbytes for a in like.values())}


def aead_throughput(envelope: Envelope, *, repeats: int) -> dict[str, float]:
    data = os.urandom(128 * MIB)
    blob = envelope.encrypt_bytes(data)
    enc = timed(lambda: envelope.encrypt_stream(io.BytesIO(data), io.BytesIO()), repeats=repeats)
    dec = timed(lambda: envelope.decrypt_bytes(blob, name="bench"), repeats=repeats)
    return {"encrypt": 128 / enc["median_s"], "decrypt": 128 / dec["median_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    day = datetime.now(UTC).date().isoformat()
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / f"at_rest_cpu_{day}.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedseek-bench-at-rest-") as name:
        tmp = Path(name)
        envelope = Envelope(CommandKek(["printf", "%s", os.urandom(32).hex()]))
        results: dict[str, Any] = {"kek": kek_costs(tmp, repeats=args.repeats), "adapters": {}}
        model_dir = write_tiny_model(tmp / "tiny-shape")
        model, tok = load_model(model_dir)
        tiny = {k: v.astype(np.float32) for k, v in ModelHost(model, tok, model_name="s").initial_arrays().items()}
        for label, arrays in (
            ("tiny", tiny),
            ("16MiB", synthetic(16 * MIB, seed=1)),
            ("128MiB", synthetic(128 * MIB, seed=2)),
        ):
            results["adapters"][label] = {
                "plain": deploy_and_load(tmp / label, arrays, None, repeats=args.repeats),
                "encrypted": deploy_and_load(tmp / label, arrays, envelope, repeats=args.repeats),
            }
            print(label, json.dumps(results["adapters"][label]), flush=True)
        results["startup_tiny"] = {
            "plain": startup_tiny(tmp / "s-plain", None, repeats=args.repeats),
            "encrypted": startup_tiny(tmp / "s-enc", envelope, repeats=args.repeats),
        }
        results["aead_mib_s"] = aead_throughput(envelope, repeats=args.repeats)
    cpuinfo = Path("/proc/cpuinfo").read_text()
    out = {
        "benchmark": "at_rest",
        "date": day,
        "machine": machine("cpu"),
        "cpus": os.cpu_count(),
        "aes_ni": " aes " in cpuinfo or " aes\n" in cpuinfo,
        "versions": versions("cryptography", "safetensors", "numpy"),
        "note": "2-core CPU shared with other workers; median of repeats with min/max",
        **results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(json.dumps({k: out[k] for k in ("kek", "startup_tiny", "aead_mib_s")}, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
