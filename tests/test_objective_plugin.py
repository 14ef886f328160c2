"""A new objective is one file: its options, checks and constructor, and nothing else to edit.

The file below lives outside the package and is named in ``$DIST_ROBUST_OBJECTIVES``, as a user's own
objective would be. From it alone come the ``--objective`` choice, the ``--toy-weight`` flag and its help,
the run-file and sweep-file key ``objective.toy_weight``, the bounds check and the objective's own check,
and training through the real launcher: its first loss is twice ERM's, to the bit (the same batch, the
same initial weights, the loss scaled by an exact factor of 2), and so is the second (AdamW's update
ignores the scale).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.launch import REPO, TINY, deepspeed, launcher_env, results

pytestmark = pytest.mark.launcher

TOY = '''
"""ERM with its loss multiplied by a weight (a toy objective, in one file)."""

from __future__ import annotations

from dataclasses import dataclass

from dist_robust.objectives.base import cross_entropy, logits_of
from dist_robust.objectives.options import ObjectiveSpec, option, register


@dataclass
class ToyOptions:
    toy_weight: float = option(1.0, "multiplies the cross-entropy.", "--toy-weight", low=0, high=10)


@dataclass
class Toy:
    weight: float
    name: str = "toy"
    micro_steps: int = 1

    def train_step(self, engine, batch, ctx):
        loss = cross_entropy(logits_of(engine, batch), batch["labels"]) * self.weight
        engine.backward(loss)
        engine.step()
        return {"loss": loss.detach()}


def _check(options, bad):
    if options.toy_weight == 3.0:
        bad("objective.toy_weight", options.toy_weight, "any weight but 3")


register(ObjectiveSpec("toy", ToyOptions, lambda o: Toy(o.toy_weight), check=_check))
'''


@pytest.fixture
def toy_env(tmp_path):
    (tmp_path / "toy_objective.py").write_text(TOY)
    return launcher_env(DIST_ROBUST_OBJECTIVES="toy_objective", PYTHONPATH=f"{tmp_path}:{REPO}")


def _cli(args: list[str], env: dict, module: str = "dist_robust.cli") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_it_trains_through_the_launcher(tmp_path, toy_env):
    flags = [*TINY, "--max-steps", "2", "--eval-steps", "0", "--save-steps", "0", "--no-export-model",
             "--no-generalized"]
    deepspeed([*flags, "--objective", "toy", "--toy-weight", "2", "--output-dir", str(tmp_path / "toy")], env=toy_env)
    deepspeed([*flags, "--objective", "erm", "--output-dir", str(tmp_path / "erm")])
    toy, erm = results(tmp_path / "toy"), results(tmp_path / "erm")
    assert toy["objective"] == "toy" and toy["config"]["objective"]["toy_weight"] == 2.0
    assert toy["train_losses"][0] == 2 * erm["train_losses"][0]
    # AdamW's step does not change when the loss is scaled (up to its eps), so the weights moved alike
    assert toy["train_losses"][1] == pytest.approx(2 * erm["train_losses"][1], rel=1e-5)


def test_its_flag_run_file_key_and_checks_come_from_its_declaration(tmp_path, toy_env):
    help_text = _cli(["train", "--help"], toy_env).stdout
    assert "--toy-weight" in help_text and "toy: multiplies the cross-entropy." in " ".join(help_text.split())
    run = tmp_path / "run.yaml"
    run.write_text("objective:\n  name: toy\n  toy_weight: 3.0\n")
    proc = _cli(["train", "--config", str(run), *TINY], toy_env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "objective.toy_weight (--toy-weight) = 3.0: any weight but 3" in proc.stderr
    proc = _cli(["train", "--objective", "toy", "--toy-weight", "11", *TINY], toy_env)
    assert proc.returncode == 2 and "objective.toy_weight (--toy-weight) = 11.0: must be in [0, 10]" in proc.stderr
    # without the plugin the name is unknown, and a plugin that cannot be imported is named
    plain = _cli(["train", "--objective", "toy", *TINY], launcher_env())
    assert plain.returncode == 2 and "'toy' (choose from 'erm', 'pgd', 'freelb', 'gaussian', 'smart')" in plain.stderr
    broken = _cli(["train", *TINY], {**toy_env, "DIST_ROBUST_OBJECTIVES": "toy_objective,no_such_module"})
    assert broken.returncode == 2 and "Traceback" not in broken.stderr
    assert "$DIST_ROBUST_OBJECTIVES names 'no_such_module', which cannot be imported" in broken.stderr


def test_sweep_files_search_its_options(tmp_path, toy_env):
    space = textwrap.dedent("""\
        base:
          flags: [--model, tiny, --objective, toy, --max-steps, "4", --eval-steps, "2", --save-steps, "2"]
        params:
          objective.toy_weight: {type: uniform, low: 0.5, high: %s}
        """)
    (tmp_path / "good.yaml").write_text(space % "2.0")
    (tmp_path / "bad.yaml").write_text(space % "11.0")
    load = ("import sys; from dist_robust.tuning.space import load_space; "
            "s = load_space(sys.argv[1]); print(s.base.objective.name, s.params['objective.toy_weight'].args['high'])")
    good = subprocess.run([sys.executable, "-c", load, str(tmp_path / "good.yaml")], cwd=REPO, env=toy_env,
                          capture_output=True, text=True, timeout=300)
    assert good.returncode == 0 and good.stdout.split() == ["toy", "2.0"], good.stderr[-3000:]
    bad = _cli(["--space", str(tmp_path / "bad.yaml"), "--storage", str(tmp_path / "ray")], toy_env,
               module="dist_robust.tuning")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-3000:]
    assert "params.objective.toy_weight = 11.0: objective.toy_weight (--toy-weight) = 11.0: must be in [0, 10]" \
        in bad.stderr


@pytest.mark.slow  # make test-all; not in CI (a local Ray cluster)
def test_a_sweep_trains_it_on_ray(tmp_path, toy_env, tmp_path_factory):
    flags = [f for f in TINY if f not in ("--mlflow-uri", "none")]
    space = {"name": "toy-sweep", "base": {"flags": [*flags, "--objective", "toy", "--max-steps", "4",
                                                     "--eval-steps", "2", "--save-steps", "2", "--no-export-model",
                                                     "--no-generalized"]},
             "params": {"objective.toy_weight": {"type": "uniform", "low": 1.0, "high": 2.0}},
             "num_samples": 1, "workers_per_trial": 2, "scheduler": {"type": "fifo"},
             "scratch_dir": str(tmp_path / "scratch")}
    (tmp_path / "space.yaml").write_text(json.dumps(space))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**toy_env, "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": str(tmp_path_factory.mktemp("ray"))}
    proc = subprocess.run([sys.executable, "-m", "dist_robust.tuning", "--space", str(tmp_path / "space.yaml"),
                           "--storage", str(tmp_path / "results"), "--mlflow-uri", uri, "--experiment", "toy",
                           "--num-cpus", "2"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("toy").experiment_id])
    (trial,) = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert trial.info.status == "FINISHED" and trial.data.params["objective.name"] == "toy"
    assert 1.0 <= float(trial.data.params["objective.toy_weight"]) <= 2.0
    assert len(client.get_metric_history(trial.info.run_id, "train/loss")) == 4
