"""A disk that fills in the middle of a checkpoint: one clear error, nothing earlier harmed, resume once there is room.

The output directory is a real size-limited filesystem (a tmpfs mounted for the test, where the
machine allows it); the second checkpoint does not fit beside the first.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.launch import TINY, deepspeed, results

FLAGS = [*TINY, "--max-steps", "8", "--eval-steps", "0", "--save-steps", "2", "--save-total-limit", "1",
         "--no-export-model"]


def _checkpoint_bytes(run: Path) -> int:
    tag = (run / "checkpoints" / "latest").read_text()
    manifest = json.loads((run / "checkpoints" / tag / "manifest.json").read_text())
    return sum(f["size"] for f in manifest["files"].values())


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs at ``tmp_path/disk``, resized by calling the returned function with a byte count."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small filesystem here ({mounted.stderr.decode().strip()[:100]})")

    def resize(size: int) -> Path:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)], check=True)
        return disk

    try:
        yield resize
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.mark.launcher
def test_a_full_disk_mid_checkpoint_stops_with_one_error_and_resumes_once_there_is_room(tmp_path, small_disk):
    straight = tmp_path / "straight"
    deepspeed([*FLAGS, "--output-dir", str(straight)])
    expected = results(straight)
    one = _checkpoint_bytes(straight)
    # room for the tokenizer, the first checkpoint and half of the second one
    disk = small_disk(_folder_bytes(straight / "tokenizer") + _folder_bytes(straight / "checkpoints") + one // 2)
    run = disk / "run"
    failed = deepspeed([*FLAGS, "--output-dir", str(run)], check=False)
    out = failed.stdout + failed.stderr
    assert failed.returncode != 0
    errors = [line for line in out.splitlines() if line.startswith("error: could not write checkpoint")]
    assert len(errors) == 1, out[-4000:]  # from rank 0 only, one line
    assert "the disk has" in errors[0] and f"a checkpoint of this run takes {one / 2**20:.1f} MiB" in errors[0]
    assert "step-00000002 and the pointers are untouched" in errors[0] and "--resume auto" in errors[0]
    assert "Traceback" not in out
    assert (run / "checkpoints" / "latest").read_text() == "step-00000002"
    assert not (run / "checkpoints" / "step-00000004").exists()  # the torn tag was removed

    small_disk(64 << 20)  # room again
    deepspeed([*FLAGS, "--output-dir", str(run), "--resume", "auto"])
    got = results(run)
    assert got["train_losses"] == pytest.approx(expected["train_losses"], abs=1e-6)
    assert got["per_language"] == expected["per_language"]
