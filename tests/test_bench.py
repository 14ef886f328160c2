"""The benchmarks' own plumbing on the CPU: a benchmark that no longer runs measures nothing, and
``bench/gpu_mfu.py`` (the prepared GPU measurement) launches ``bench/vs_hf.py``'s workers."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.launch import REPO, launcher_env


def test_vs_hf_runs_our_step_in_both_precisions():
    cmd = [sys.executable, str(REPO / "bench" / "vs_hf.py"), "--model", "tiny", "--approaches", "ours+zero2+pgd1",
           "--precisions", "fp32", "bf16", "--rounds", "1", "--steps", "1", "--warmup", "1",
           "--batch", "4", "--length", "16"]
    proc = subprocess.run(cmd, cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout.split("\nmodel tiny, batch 4 x 16 tokens, fp32 and bf16")[1]
    assert "x ours+zero2+pgd1 fp32 speed" in table
    rows = re.findall(r"^(ours\+zero\S+ (?:fp32|bf16))\s+[\d.]+\s", table, re.MULTILINE)
    assert rows == ["ours+zero2+pgd1 fp32", "ours+zero2+pgd1 bf16"], table
