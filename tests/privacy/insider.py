"""What an insider with write access to a site's state directory and FedSeek's source does to its ledger.

Every edit re-chains with the ledger's own hash function and resets the head, so the ledger's
internal integrity check still passes: only the audit trail's cross-references can tell.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import fields
from pathlib import Path
from typing import Any

from privacy.ledger import Genesis, LedgerEntry, _entry_hash, _entry_of, _row_of


def rechain(path: Path, *, genesis: dict[str, Any] | None = None, **updates: dict[int, dict[str, Any]]) -> None:
    """Edit the ledger as an insider with its source code would: change values, recompute every hash and the head."""
    conn = sqlite3.connect(path)
    try:
        meta = {k: json.loads(v) for k, v in conn.execute("SELECT key, value FROM meta")}
        gen = {**meta["genesis"], **(genesis or {})}
        names = [f.name for f in fields(LedgerEntry)]
        query = f"SELECT {', '.join(names)} FROM entries"
        rows = [dict(zip(names, _row_of(_entry_of(row)), strict=True)) for row in conn.execute(query)]
        swap = {meta["genesis"]["dataset_sha256"]: gen["dataset_sha256"]}  # rounds name the data they sampled
        rows = [
            {**row, "partitions": json.dumps([swap.get(p, p) for p in json.loads(row["partitions"])])} for row in rows
        ]
        rows = [
            {**row, **updates.get("entries", {}).get(row["id"], {})}
            for row in rows
            if row["id"] not in updates.get("deleted", {})
        ]
        prev = Genesis.from_json(gen).hash
        placeholders = ", ".join("?" * (len(names) + 2))
        conn.execute("DELETE FROM entries")
        for new_id, row in enumerate(rows, start=1):
            entry = _entry_of(list({**row, "id": new_id}.values()))
            hash_ = _entry_hash(entry, prev_hash=prev)
            conn.execute(
                f"INSERT INTO entries ({', '.join(names)}, prev_hash, hash) VALUES ({placeholders})",
                (*_row_of(entry), prev, hash_),
            )
            prev = hash_
        conn.execute("UPDATE meta SET value = ? WHERE key = 'genesis'", (json.dumps(gen),))
        if genesis and "budget" in genesis:
            conn.execute("UPDATE meta SET value = ? WHERE key = 'budget'", (json.dumps(genesis["budget"]),))
        conn.execute("UPDATE meta SET value = ? WHERE key = 'head'", (json.dumps({"id": len(rows), "hash": prev}),))
        conn.commit()
    finally:
        conn.close()


def delete_last_row(path: Path) -> None:
    """Delete the last entry and point the head at the one before (no re-chaining needed)."""
    conn = sqlite3.connect(path)
    try:
        last, prev_hash = conn.execute("SELECT id, prev_hash FROM entries ORDER BY id DESC LIMIT 1").fetchone()
        conn.execute("DELETE FROM entries WHERE id = ?", (last,))
        conn.execute("UPDATE meta SET value = ? WHERE key = 'head'", (json.dumps({"id": last - 1, "hash": prev_hash}),))
        conn.commit()
    finally:
        conn.close()
