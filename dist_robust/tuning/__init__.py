"""Ray Tune sweeps over the robust objectives' hyperparameters; every trial runs ``trainer.run``.

``dist-robust tune`` is :func:`dist_robust.tuning.cli.tune_main`. Modules, each with one job:

* ``spec``: a sweep as data; ``space``: sweep files read into it, every problem named before Ray
  starts (Tune's distributions check little: ``uniform(1, 0)`` and ``choice([])`` pass);
  ``space_checks``: the sweep-level settings (metric, scheduler, search, resources);
* ``search``: the spec as Tune's own objects (distributions, ASHA/PBT, random/grid/Optuna);
* ``trial``: one trial, a Ray Train ``TorchTrainer`` of DeepSpeed workers, with the pointer
  checkpoints PBT needs (Ray's ``TuneReportCallback`` carries none); ``worker``: inside each
  worker (restore, each node's share of a checkpoint's files);
* ``sweep_runs``: MLflow parent and child runs; ``cleanup``: what Tune leaves behind when it
  stops a trial (placement groups without a dashboard, RUNNING MLflow runs);
* ``console``: trial events on the terminal, Ray's own output to files; ``summary``: the
  finished sweep's table of trials and its best trial; ``cli``: the command.
"""

from dist_robust.tuning.cli import tune_main

__all__ = ["tune_main"]
