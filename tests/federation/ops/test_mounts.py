"""`federation.ops.mounts`: the filesystem a path is on, as this process's mount namespace has it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from federation.ops.mounts import filesystem_type, in_memory


def test_known_mounts() -> None:
    assert filesystem_type(Path("/proc/self")) == "proc"
    assert filesystem_type(Path("/")) not in ("", "unknown")


def test_a_path_not_yet_made_is_on_its_nearest_ancestors_filesystem(tmp_path: Path) -> None:
    assert filesystem_type(tmp_path / "not" / "made" / "yet") == filesystem_type(tmp_path)


def test_a_tmpfs_mounted_at_a_name_with_a_space_is_in_memory(tmp_path: Path) -> None:
    """A real tmpfs, mounted in a private mount namespace (gone with it), at a point mountinfo escapes."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare here")
    point = tmp_path / "ram disk"
    point.mkdir()
    probe = (
        "import sys; from pathlib import Path; from federation.ops.mounts import filesystem_type, in_memory; "
        "p = Path(sys.argv[1]) / 'lora' / 'v1'; print(filesystem_type(p), in_memory(p))"
    )
    cmd = ["unshare", "-m", "sh", "-c", 'mount -t tmpfs fedseek-test "$1" && exec "$2" -c "$3" "$1"', "sh"]
    done = subprocess.run([*cmd, str(point), sys.executable, probe], capture_output=True, text=True, timeout=60)
    if done.returncode != 0 and "Traceback" not in done.stderr:  # unshare or mount refused, not our code
        pytest.skip(f"cannot mount a tmpfs in a namespace of its own here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["tmpfs", "True"]
    assert not in_memory(point) or filesystem_type(tmp_path) in ("tmpfs", "ramfs")  # outside: not mounted
