"""Resume on another number of ranks: 2 -> 1 and 1 -> 2, at ZeRO-2 and ZeRO-3 (and ZeRO-2 -> ZeRO-1).

A 2-rank run trains 6 steps (checkpoints at 2, 4, 6). One rank resumes its step-2 checkpoint
(converted to DeepSpeed's universal format) and trains to step 6 with twice the gradient
accumulation; two ranks resume that 1-rank run's step-4 checkpoint (ZeRO-3) and train to step 6. With
the global batch kept, every step reads the same examples with the same perturbation and
dropout seeds, so both resumed trajectories must equal the uninterrupted 2-rank one. PGD is
used because its random start would differ if seeds followed ranks rather than data.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.launch import REPO, TINY, deepspeed, launcher_env, results, rewind, train_process

pytestmark = pytest.mark.launcher

CONFIGS = ("zero2", "zero3")
FLAGS = [*TINY, "--max-steps", "6", "--save-steps", "2", "--save-total-limit", "3", "--eval-steps", "0",
         "--no-export-model", "--no-generalized", "--epsilon", "0.5", "--alpha", "0.2", "--adv-steps", "2"]


def _runs(out, nproc: int, configs=CONFIGS, extra: list[str] = ()):
    args = [str(out), "--ds-configs", *(str(REPO / "ds_configs" / f"{c}.json") for c in configs),
            "--objectives", "pgd", "--", *FLAGS, *extra]
    if nproc > 1:
        return deepspeed(args, nproc=nproc, script="tests/engine_runs.py")
    proc = subprocess.run([sys.executable, "tests/engine_runs.py", *args], cwd=REPO, env=launcher_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return proc


@pytest.mark.parametrize("config", CONFIGS)
def test_resume_on_another_world_size_continues_the_trajectory(world_size_runs, config):
    straight, one_rank = world_size_runs["straight"][config], world_size_runs["one"][config]
    assert straight["config"]["world_size"] == 2 and len(straight["train_losses"]) == 6
    # 2 -> 1: steps 3-6 on one rank, accumulating 2 micro-batches where two ranks took one each
    assert one_rank["config"]["world_size"] == 1
    assert one_rank["config"]["ds_config"]["gradient_accumulation_steps"] == 2
    assert one_rank["train_losses"] == pytest.approx(straight["train_losses"], abs=1e-6)
    # the resumed run evaluates the weights it trained: the same accuracies
    assert one_rank["per_language"] == pytest.approx(straight["per_language"], abs=1e-9)


def test_one_rank_checkpoint_resumes_on_two_ranks(world_size_runs):
    """1 -> 2 at ZeRO-3: steps 5-6 back on two ranks, from the one-rank run's own step-4 checkpoint."""
    straight, two_ranks = world_size_runs["straight"]["zero3"], world_size_runs["two"]["zero3"]
    assert two_ranks["config"]["world_size"] == 2
    assert two_ranks["config"]["ds_config"]["gradient_accumulation_steps"] == 1
    assert two_ranks["train_losses"] == pytest.approx(straight["train_losses"], abs=1e-6)
    assert two_ranks["per_language"] == pytest.approx(straight["per_language"], abs=1e-9)


def test_resume_logs_say_what_changed(world_size_runs):
    log = world_size_runs["one_log"]
    assert "resuming a 2-rank checkpoint on 1 ranks: gradient accumulation 2 (was 1)" in log
    assert "written by 2 rank(s), continuing on 1" in log
    assert "written by 1 rank(s), continuing on 2" in world_size_runs["two_log"]
    # the universal conversion is deleted once loaded
    assert not list(world_size_runs["root"].glob("**/universal-checkpoints"))


@pytest.fixture(scope="module")
def world_size_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("world-size")
    _runs(root / "straight", nproc=2)
    for config in CONFIGS:
        rewind(root / "straight" / config / "pgd", root / "one" / config / "pgd", "step-00000002")
    one = _runs(root / "one", nproc=1, extra=["--resume", "auto"])
    rewind(root / "one" / "zero3" / "pgd", root / "two" / "zero3" / "pgd", "step-00000004")
    two = _runs(root / "two", nproc=2, configs=("zero3",), extra=["--resume", "auto"])
    out = {k: {c: results(root / k / c / "pgd") for c in CONFIGS} for k in ("straight", "one")}
    out["two"] = {"zero3": results(root / "two" / "zero3" / "pgd")}
    return {**out, "one_log": one.stdout + one.stderr, "two_log": two.stdout + two.stderr, "root": root}


def test_layout_is_recorded_with_every_checkpoint(world_size_runs):
    tag = world_size_runs["root"] / "straight" / "zero2" / "pgd" / "checkpoints" / "step-00000004"
    layout = json.loads((tag / "layout.json").read_text())
    assert layout == {"world_size": 2, "micro_batch_size": 8, "grad_accum": 1, "zero_stage": 2, "train_size": 256,
                      "embedding_blocks": 1}
    manifest = json.loads((tag / "manifest.json").read_text())
    assert "layout.json" in manifest["files"]


def _one_rank(out, config: str) -> subprocess.CompletedProcess:
    return train_process([*FLAGS, "--deepspeed", str(REPO / "ds_configs" / f"{config}.json"), "--objective", "pgd",
                          "--output-dir", str(out), "--resume", "auto"])


def test_zero2_checkpoint_resumes_at_zero1_on_another_world_size(world_size_runs, tmp_path):
    """ZeRO-1 and 2 share a checkpoint format: 2 ranks at ZeRO-2 -> 1 rank at ZeRO-1, same trajectory."""
    straight = world_size_runs["straight"]["zero2"]
    rewind(world_size_runs["root"] / "straight" / "zero2" / "pgd", tmp_path / "run", "step-00000002")
    proc = _one_rank(tmp_path / "run", "zero1")
    assert proc.returncode == 0, proc.stderr[-6000:]
    resumed = results(tmp_path / "run")
    assert resumed["config"]["ds_config"]["zero_optimization"]["stage"] == 1
    assert resumed["train_losses"] == pytest.approx(straight["train_losses"], abs=1e-6)


def test_checkpoint_of_another_stage_format_is_refused_before_the_model_is_built(world_size_runs, tmp_path):
    rewind(world_size_runs["root"] / "straight" / "zero2" / "pgd", tmp_path / "run", "step-00000002")
    proc = _one_rank(tmp_path / "run", "zero3")
    assert proc.returncode != 0
    assert ("step-00000002 was written at ZeRO-2 and this run is at ZeRO-3: DeepSpeed loads a checkpoint only at a "
            "stage of its format" in proc.stderr)
    assert "resume it with a ds_config at ZeRO-1 or 2, e.g. --deepspeed ds_configs/zero2.json" in proc.stderr
    assert "dist_robust.run.trainer: resumed" not in proc.stderr and "parameters, 1 rank(s)" not in proc.stderr
