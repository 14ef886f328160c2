"""Configuration: precedence, "auto" resolution, and errors that name key, value and what is accepted."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import time

import pytest

from dist_robust.config.parsing import add_run_arguments, config_from_args
from dist_robust.config.run_config import ConfigError, RunConfig
from dist_robust.config.validation import validate
from dist_robust.config.ds_config import default_ds_config, resolve_ds_config
from dist_robust.objectives import REGISTRY, ObjectiveConfig, build_objective
from tests.launch import REPO


def _cfg(*argv: str) -> RunConfig:
    import argparse

    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)))


def test_every_objective_builds_from_its_own_options_read_off_the_flat_section():
    assert list(REGISTRY) == ["erm", "pgd", "freelb", "gaussian", "smart"]
    flat = {f.name: f for f in dataclasses.fields(ObjectiveConfig)}
    assert flat["name"].metadata["choices"] == tuple(REGISTRY)
    for name, spec in REGISTRY.items():
        for f in spec.option_fields():  # each option is a config key with its flag, once for all objectives
            assert flat[f.name].metadata["flag"] == f.metadata["flag"] and flat[f.name].default == f.default
        objective = build_objective(ObjectiveConfig(name=name, epsilon=0.25, adv_steps=3, sigma=0.5))
        assert objective.name == name
    assert build_objective(ObjectiveConfig(name="pgd", epsilon=0.25)).epsilon == 0.25
    assert build_objective(ObjectiveConfig(name="gaussian", sigma=0.5)).sigma == 0.5
    assert build_objective(ObjectiveConfig(name="freelb", adv_steps=3)).micro_steps == 3
    # a shared option's help says which objectives read it
    assert flat["epsilon"].metadata["help"].startswith("pgd/freelb/smart: ")


def test_options_are_checked_by_the_named_objectives_own_declaration():
    assert not validate_problems(objective="smart", adv_steps=0)  # R3F
    assert validate_problems(objective="pgd", adv_steps=0) == ["objective.adv_steps (--adv-steps) = 0: must be >= 1"]
    assert validate_problems(objective="pgd", adv_weight=1.5) == [
        "objective.adv_weight (--adv-weight) = 1.5: must be in [0, 1]"]
    assert validate_problems(objective="freelb", init_mag=-1.0) == [
        "objective.init_mag (--init-mag) = -1.0: must be >= 0 (or unset)"]
    assert validate_problems(objective="pgd", norm="l3") == ["objective.norm (--norm) = 'l3': accepted: l2, linf"]


def validate_problems(**values) -> list[str]:
    from dist_robust.config.run_config import config_problems

    cfg = RunConfig()
    for key, value in values.items():
        setattr(cfg.objective, "name" if key == "objective" else key, value)
    return [p for p in config_problems(cfg, 1) if p.startswith("objective.")]


def test_precedence_file_then_overrides_then_flags(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("objective:\n  name: pgd\n  epsilon: 0.2\n  alpha: 0.05\ntrain:\n  max_steps: 7\n")
    cfg = _cfg("--config", str(run), "objective.epsilon=0.3", "train.seed=5", "--epsilon", "0.4")
    assert cfg.objective.name == "pgd"
    assert cfg.objective.alpha == 0.05
    assert cfg.objective.epsilon == 0.4  # the flag beats the override, which beats the file
    assert cfg.train.seed == 5 and cfg.train.max_steps == 7


def test_deepspeed_flag_spellings(tmp_path):
    hf_style = _cfg("--deepspeed", "ds_configs/zero3.json".replace("ds_configs", str(REPO / "ds_configs")))
    ds_style = _cfg("--deepspeed", "--deepspeed_config", str(REPO / "ds_configs" / "zero1.json"))
    assert hf_style.ds_config["zero_optimization"]["stage"] == 3
    assert ds_style.ds_config["zero_optimization"]["stage"] == 1
    assert _cfg().ds_config["zero_optimization"]["stage"] == 2  # built-in default


def test_built_in_ds_config_is_the_shipped_zero2_file():
    # Running without --deepspeed must train exactly like --deepspeed ds_configs/zero2.json.
    assert default_ds_config() == json.loads((REPO / "ds_configs" / "zero2.json").read_text())


def test_auto_values_and_freelb_accumulation():
    cfg = _cfg("--deepspeed", str(REPO / "ds_configs" / "zero2.json"), "--objective", "freelb",
               "--adv-steps", "3", "--micro-batch-size", "4", "--grad-accum", "2", "--lr", "3e-4",
               "--max-steps", "50", "--warmup-ratio", "0.2")
    ds = resolve_ds_config(cfg, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 6  # 2 batches x K=3 ascent passes
    assert ds["train_batch_size"] == 4 * 6 * 2
    assert ds["optimizer"]["params"]["lr"] == 3e-4
    assert ds["scheduler"]["params"] == {"warmup_min_lr": 0, "warmup_max_lr": 3e-4, "warmup_num_steps": 10,
                                         "total_num_steps": 50}


def test_zero_warmup_ratio_gives_a_schedule_deepspeed_accepts():
    import torch
    from deepspeed.runtime.lr_schedules import WarmupDecayLR

    cfg = _cfg("--warmup-ratio", "0", "--max-steps", "50", "--lr", "1e-3")
    params = resolve_ds_config(cfg, world_size=1)["scheduler"]["params"]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = WarmupDecayLR(opt, **params)  # raised "warmup_num_steps must be a positive integer" with 0
    lrs = []
    for _ in range(3):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[2] == pytest.approx(1e-3, rel=0.05)  # at the peak after DeepSpeed's shortest warm-up


def test_all_problems_reported_at_once_with_key_value_and_accepted():
    cfg = _cfg("objective.name=adversarial", "--epsilon", "-0.5", "--noise-samples", "0", "--log-interval", "-1")
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=1)
    text = str(err.value)
    assert "4 problem(s)" in text
    assert "train.log_interval (--log-interval) = -1.0: must be >= 0 seconds" in text
    assert "objective.name (--objective) = 'adversarial': accepted objectives: erm, pgd, freelb, gaussian" in text
    assert "objective.epsilon (--epsilon) = -0.5: must be >= 0" in text
    assert "objective.noise_samples (--noise-samples) = 0: must be >= 1" in text


def test_batch_size_inconsistent_with_world_size(tmp_path):
    ds = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    ds.update(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=2, train_batch_size=16)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    validate(_cfg("--deepspeed", str(path)), world_size=2)  # 4 x 2 x 2 = 16: fine
    with pytest.raises(ConfigError, match=r"train_batch_size = 16: must equal .* \(4\) x .* \(2\) x world size "
                                          r"\(4\) = 32"):
        validate(_cfg("--deepspeed", str(path)), world_size=4)


def test_ds_config_problems_name_the_file_and_key(tmp_path):
    ds = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    ds["zero_optimization"]["stage"] = 4
    ds["fp16"] = ds["bf16"] = {"enabled": True}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    with pytest.raises(ConfigError) as err:
        validate(_cfg("--deepspeed", str(path)), world_size=1)
    text = str(err.value)
    assert f"{path}: zero_optimization.stage = 4: accepted stages: 0, 1, 2, 3" in text
    assert f"{path}: fp16.enabled and bf16.enabled are both true: enable at most one" in text
    ds["fp16"] = {"enabled": False}
    ds["zero_optimization"]["stage"] = 3
    path.write_text(json.dumps(ds))
    validate(_cfg("--deepspeed", str(path)), world_size=1)  # bf16 alone at ZeRO-3: fine
    del ds["optimizer"]["params"]["torch_adam"]  # DeepSpeed's own Adam would get an argument it refuses
    path.write_text(json.dumps(ds))
    with pytest.raises(ConfigError, match=re.escape(f"{path}: optimizer.params.fused = True: only torch's AdamW "
                                                    "takes it, as true or false; set optimizer.params.torch_adam")):
        validate(_cfg("--deepspeed", str(path)), world_size=1)


def test_unknown_keys_list_what_is_accepted(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'objective.epsilonn'; objective accepts name, scale, epsilon"):
        _cfg("objective.epsilonn=0.1")
    run = tmp_path / "bad.yaml"
    run.write_text("optimizer:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="unknown section 'optimizer'"):
        _cfg("--config", str(run))
    with pytest.raises(ConfigError, match=r"train.max_steps \(--max-steps\) = 'many': expected int"):
        _cfg("train.max_steps=many")


def test_bad_config_fails_before_any_process_starts(tmp_path):
    """train.py exits 2 with the message, without importing DeepSpeed or starting a process group."""
    t0 = time.time()
    proc = subprocess.run([sys.executable, "train.py", "--epsilon", "-1", "--output-dir", str(tmp_path / "out"),
                           "--deepspeed", "ds_configs/zero2.json"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "objective.epsilon (--epsilon) = -1.0: must be >= 0" in proc.stderr
    assert "deepspeed" not in proc.stderr.lower().replace("--deepspeed", "")  # never got as far as DeepSpeed
    assert not (tmp_path / "out").exists()
    missing = subprocess.run([sys.executable, "train.py", "--deepspeed", "ds_configs/zero9.json"], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "ds_configs/zero9.json: file not found" in missing.stderr
    assert time.time() - t0 < 120


def test_unknown_objective_flag_lists_choices():
    proc = subprocess.run([sys.executable, "train.py", "--objective", "fgsm"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "invalid choice: 'fgsm'" in proc.stderr and "'pgd'" in proc.stderr and "'gaussian'" in proc.stderr


def test_non_finite_numbers_are_refused_by_name():
    from dist_robust.config.run_config import ConfigError, RunConfig
    from dist_robust.config.validation import validate

    cfg = RunConfig()
    cfg.objective.epsilon, cfg.train.lr, cfg.objective.sigma = float("nan"), float("inf"), float("-inf")
    with pytest.raises(ConfigError) as err:
        validate(cfg, 1)
    assert err.value.problems == ["objective.epsilon (--epsilon) = nan: must be a finite number",
                                  "objective.sigma (--sigma) = -inf: must be a finite number",
                                  "train.lr (--lr) = inf: must be a finite number"]


def test_unknown_language_is_a_config_error_before_anything_starts():
    from dist_robust.config.run_config import ConfigError, DataConfig
    from dist_robust.data.tasks import get_task

    with pytest.raises(ConfigError, match=r"data.languages \(--languages\) = xx: synthetic has no such language; "
                                          r"accepted: en de fr es zh"):
        get_task(DataConfig(languages=["en", "xx"]))
    with pytest.raises(ConfigError, match=r"pawsx has no such language; accepted: en de es fr ja ko zh"):
        get_task(DataConfig(task="pawsx", languages=["en", "xx"]))  # the hub has only these


def test_validation_changes_nothing_and_a_frozen_config_stays_as_resolved():
    cfg = _cfg("--objective", "freelb", "--adv-steps", "3", "--deepspeed", str(REPO / "ds_configs" / "zero2.json"))
    before = cfg.to_dict()
    validate(cfg, world_size=2)
    assert cfg.to_dict() == before
    frozen = cfg.frozen()
    assert frozen.to_dict() == before
    with pytest.raises(dataclasses.FrozenInstanceError, match="TrainConfig.grad_accum cannot change"):
        frozen.train.grad_accum = 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        frozen.objective.epsilon = 0.5
    with pytest.raises(TypeError):
        frozen.ds_config["zero_optimization"]["stage"] = 3
    changed = frozen.with_values({"train.grad_accum": 4})  # a new config; the frozen one is as it was
    assert changed.train.grad_accum == 4 and frozen.train.grad_accum == 1
    changed.train.seed = 7  # (a copy is assembled like any config)
