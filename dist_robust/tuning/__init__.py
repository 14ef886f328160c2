"""Ray Tune sweeps over the robust objectives' hyperparameters; every trial runs ``trainer.run``.

``dist-robust tune`` is :func:`dist_robust.tuning.cli.tune_main`. Modules: ``space`` (sweep files,
checked before Ray starts), ``search`` (Tune space, scheduler, search algorithm), ``trial`` (one
trial: a Ray Train TorchTrainer of DeepSpeed workers), ``worker`` (inside each worker),
``sweep_runs`` (MLflow parent and child runs).
"""

from dist_robust.tuning.cli import tune_main

__all__ = ["tune_main"]
