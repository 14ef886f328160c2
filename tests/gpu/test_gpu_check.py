"""The GPU check (``bench/gpu_check.py``) as a test: runs only where CUDA is available.

    python -m pytest -m gpu tests/gpu          # on a machine with one GPU; skipped elsewhere
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.launch import REPO

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_every_objective_stage_and_precision_on_one_gpu():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py")], cwd=REPO, capture_output=True,
                          text=True, timeout=900)
    print(proc.stdout[-6000:])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
