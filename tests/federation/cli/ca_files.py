"""What a PKI directory holds, for tests that a refused CA command changed nothing."""

from __future__ import annotations

from pathlib import Path

from federation.security.pki.layout import CA_AUDIT_DIR


def ca_files(root: Path) -> dict[str, bytes]:
    """The CA's and its parties' files by relative path; the CA's audit trail (which records refusals) aside."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).parts[0] != CA_AUDIT_DIR
    }
