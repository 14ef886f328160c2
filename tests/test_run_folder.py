"""A second run into the same --output-dir never harms the first: it is refused, or told to continue or replace it."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from dist_robust.run import run_folder
from dist_robust.config.run_config import RunConfig
from tests.launch import TINY, results, train_process

FLAGS = [*TINY, "--max-steps", "4", "--eval-steps", "2", "--save-steps", "2"]


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` by relative path -> sha256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "default"
    proc = train_process([*FLAGS, "--output-dir", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_a_second_run_into_a_finished_runs_folder_is_refused_and_changes_nothing(first_run):
    before = _snapshot(first_run)
    proc = train_process([*FLAGS, "--objective", "pgd", "--max-steps", "2", "--output-dir", str(first_run)])
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert "already holds a finished run" in errors[0]
    for way in ("--resume auto", "--overwrite", "another --output-dir"):
        assert way in errors[0]
    assert "Traceback" not in proc.stderr and "--help" not in proc.stderr
    assert _snapshot(first_run) == before


def test_a_fresh_start_over_a_checkpointed_run_is_refused_and_resume_is_offered(first_run, tmp_path):
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / "checkpoints").mkdir()
    for name in ("checkpoints", "run.json", "tokenizer"):
        src = first_run / name
        dst = stopped / name
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            dst.write_bytes(src.read_bytes())
    before = _snapshot(stopped)
    proc = train_process([*FLAGS, "--output-dir", str(stopped)])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "already holds a run checkpointed at step-00000004" in proc.stderr
    assert _snapshot(stopped) == before


def test_resume_with_another_objective_is_refused_naming_what_differs(first_run):
    before = _snapshot(first_run)
    proc = train_process([*FLAGS, "--objective", "gaussian", "--seed", "7", "--resume", "auto",
                          "--output-dir", str(first_run)])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "configured differently" in proc.stderr
    assert "objective.name: 'erm' -> 'gaussian'" in proc.stderr and "train.seed: 42 -> 7" in proc.stderr
    assert _snapshot(first_run) == before


def test_overwrite_replaces_the_run_and_resume_continues_it(first_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(first_run, copy)
    (copy / "notes.txt").write_text("the user's own file")
    # the same run resumed: allowed (it re-evaluates the finished run's best checkpoint)
    resumed = train_process([*FLAGS, "--resume", "auto", "--output-dir", str(copy)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert results(copy)["best_step"] == results(first_run)["best_step"]
    # replaced: a new run with another objective, nothing of the old one left but the user's file
    proc = train_process([*FLAGS, "--objective", "gaussian", "--max-steps", "2", "--overwrite", "--output-dir",
                          str(copy)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert results(copy)["objective"] == "gaussian" and len(results(copy)["train_losses"]) == 2
    tags = sorted(p.name for p in (copy / "checkpoints").iterdir() if p.name.startswith(("step-", "best-")))
    assert tags == ["step-00000002"] and (copy / "checkpoints" / "latest").read_text() == "step-00000002"
    assert json.loads((copy / "run.json").read_text())["identity"]["objective.name"] == "gaussian"
    assert (copy / "notes.txt").read_text() == "the user's own file"


def test_overwrite_and_resume_together_are_a_config_error():
    proc = train_process([*FLAGS, "--overwrite", "--resume", "auto", "--output-dir", "/nonexistent/x"])
    assert proc.returncode == 2
    assert "train.overwrite (--overwrite) = True" in proc.stderr and "choose one" in proc.stderr


def test_check_on_an_object_store(tmp_path):
    from dist_robust.infra import storage

    cfg = RunConfig()
    cfg.train.output_dir = "memory://run-folder-test/a"
    run_folder.check(cfg)  # empty: fine
    storage.write_text("memory://run-folder-test/a/checkpoints/latest", "step-00000100")
    with pytest.raises(run_folder.RunFolderError, match="checkpointed at step-00000100"):
        run_folder.check(cfg)
    cfg.train.resume = "auto"
    run_folder.check(cfg)  # no run.json (a run from before): continue it
    run_folder.claim(cfg, lambda rel, text: storage.write_text(storage.join(cfg.train.output_dir, rel), text))
    assert json.loads(storage.read_text("memory://run-folder-test/a/run.json"))["identity"]["train.seed"] == 42
    cfg.objective.epsilon = 0.3
    with pytest.raises(run_folder.RunFolderError, match=r"objective.epsilon: 0.01 -> 0.3"):
        run_folder.check(cfg)
    cfg.train.max_steps, cfg.data.languages = 10_000, ["de"]  # operational keys: not another run
    cfg.objective.epsilon = 0.01
    run_folder.check(cfg)


def test_what_may_change_on_resume_and_what_may_not():
    a, b = RunConfig(), RunConfig()
    b.data.train_file, b.train.lr, b.train.max_steps, b.data.languages = "/data/more.tsv", 3e-5, 9000, ["de"]
    assert run_folder.digest(run_folder.identity(a)) == run_folder.digest(run_folder.identity(b))
    for key, value in (("model.name", "xlm-roberta-large"), ("data.augment", "synonym"), ("objective.sigma", 0.3)):
        c = RunConfig()
        section, name = key.split(".")
        setattr(getattr(c, section), name, value)
        assert run_folder.differences(run_folder.identity(a), run_folder.identity(c)) == \
            [f"{key}: {run_folder.identity(a)[key]!r} -> {value!r}"]
