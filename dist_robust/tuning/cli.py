"""``dist-robust tune``: run (or resume) a Ray Tune sweep whose trials are multi-worker DeepSpeed runs.

    dist-robust tune --space tuning/smoke.yaml
    dist-robust tune --space tuning/pgd_epsilon.yaml --mlflow-uri http://mlflow:5000 --storage s3://bucket/sweeps
    dist-robust tune --space tuning/pgd_epsilon.yaml --resume        # after an interruption

The sweep file is checked in full before Ray starts (see :mod:`dist_robust.tuning.space`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys

from dist_robust.infra import storage
from dist_robust.config.parsing import Parser
from dist_robust.infra.redaction import MASK, redact_tree
from dist_robust.run.tracking import resolve_experiment
from dist_robust.tuning import sweep_runs
from dist_robust.tuning.space import SpaceError, load_space
from dist_robust.tuning.spec import SweepSpec
from dist_robust.tuning.summary import best_row, print_summary, trial_record, trial_table

log = logging.getLogger(__name__)

SWEEP_FILE = "dist_robust_sweep.json"  # in the Tune experiment directory: what --resume rebuilds from
TRIAL_RESOURCES = {"cpu": 0, "memory": 2 ** 28}  # the trial driver; its Train workers take the CPUs
EXIT_INTERRUPTED = 130
HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"  # how often Ray Train's controller polls its workers


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="dist-robust tune", description=__doc__)
    p.add_argument("--space", help="Sweep file (YAML), e.g. tuning/smoke.yaml. Not needed with --resume --name.")
    p.add_argument("--name", help="Sweep name: the Tune experiment and the MLflow parent run (default: the "
                                  "file's 'name', else its stem).")
    p.add_argument("--storage", default="ray_results",
                   help="Where Tune and Train keep results and checkpoints: a path, or a URL (s3://, gs://) "
                        "that every node of a cluster can reach.")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default: the base run's --mlflow-uri, "
                                        "$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db; 'none' disables).")
    p.add_argument("--experiment", help="MLflow experiment (default: the file's 'experiment', else the base "
                                        "run's --experiment).")
    p.add_argument("--resume", action="store_true",
                   help="Continue an interrupted sweep (Tuner.restore) from --storage/--name.")
    p.add_argument("--smoke", action="store_true",
                   help="The same sweep on the tiny built-in config: 6 steps per trial, at most 2 samples.")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join ('auto' on a cluster node, ray://host:10001 from outside); "
                        "default: $RAY_ADDRESS, else a Ray instance on this machine.")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all).")
    return p


def tune_main(argv: list[str] | None = None) -> int:
    """Entry point of ``dist-robust tune``; returns the exit code (2: bad sweep file, 130: interrupted)."""
    args = _parser().parse_args(argv)
    try:
        spec, saved = _sweep(args)
    except (SpaceError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    _init_ray(args)
    from dist_robust.tuning.console import ray_session_logs, send_ray_logs_to  # (imports Ray: after _init_ray)

    driver_log = _scratch(spec) + "-ray-driver.log"  # beside the sweep's working directory, not in it
    send_ray_logs_to(driver_log)
    print(f"sweep {spec.name}: Ray's messages go to {driver_log}, the trials' own output to "
          f"{ray_session_logs()} (on each node)", flush=True)
    experiment_path = storage.join(_storage_root(args.storage), spec.name)
    tracking = _start_tracking(args, spec, saved)
    _save_sweep(experiment_path, spec, tracking, args)
    with GracefulStop() as stop:
        grid = _run(args, spec, tracking, experiment_path)
    return _finish(grid, spec, tracking, experiment_path, stop.received)


def _scratch(spec: SweepSpec) -> str:
    """This machine's working directory of the sweep (trials' local files, the driver's log)."""
    return os.path.join(spec.scratch_dir, spec.name) if spec.scratch_dir else storage.private_dir("tune", spec.name)


def _storage_root(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def _sweep(args: argparse.Namespace) -> tuple[SweepSpec, dict | None]:
    """The sweep to run: parsed from --space, or as saved by the run being resumed."""
    if args.name is not None and storage.safe_segment(args.name) != args.name:
        raise SpaceError("(--name)", [f"--name {args.name!r}: letters, digits, '.', '_' and '-' only (it names the "
                                      f"sweep's folder under --storage), e.g. {storage.safe_segment(args.name)!r}"])
    if args.resume:
        name = args.name or (load_space(args.space, args.smoke).name if args.space else None)
        if not name:
            raise SpaceError("(none)", ["--resume needs --name NAME or the --space file of the sweep"])
        path = storage.join(_storage_root(args.storage), name, SWEEP_FILE)
        if not storage.exists(path):
            raise FileNotFoundError(f"--resume: no sweep {name!r} under --storage {args.storage} (no {path})")
        saved = json.loads(storage.read_text(path))
        spec = SweepSpec.from_dict(saved["spec"])
        spec = dataclasses.replace(spec, worker_env=_worker_env_again(spec.worker_env, args))
        tracking = saved.get("tracking")
        if tracking and MASK in tracking["uri"] and not args.mlflow_uri:
            raise SpaceError("(saved sweep)", [f"the sweep's MLflow URI {tracking['uri']} carries a password, which "
                                               "is never saved: pass --mlflow-uri again to resume"])
        return spec, saved
    if not args.space:
        raise SpaceError("(none)", ["--space FILE is required (e.g. tuning/smoke.yaml)"])
    spec = load_space(args.space, args.smoke)
    if args.name:  # (checked above, as the file's name was)
        spec = dataclasses.replace(spec, name=args.name)
    path = storage.join(_storage_root(args.storage), spec.name)
    if storage.exists(storage.join(path, SWEEP_FILE)):
        raise FileNotFoundError(f"sweep {spec.name!r} already exists at {path}: pass --resume to continue it, "
                                "or --name to start another")
    return spec, None


def _worker_env_again(saved: dict[str, str], args: argparse.Namespace) -> dict[str, str]:
    """The workers' environment of a resumed sweep: values from the --space file, else this shell's."""
    given = load_space(args.space, args.smoke).worker_env if args.space else {}
    env = {k: given.get(k, os.environ.get(k, v)) for k, v in saved.items()}
    missing = [k for k, v in env.items() if v == MASK]
    if missing:
        raise SpaceError("(saved sweep)", [f"worker_env {', '.join(missing)}: values are never saved; resume with "
                                           "--space FILE, or with them set in this shell"])
    return env


def _init_ray(args: argparse.Namespace) -> None:
    local = args.address is None and not os.environ.get("RAY_ADDRESS")
    if local and "ray" not in sys.modules:
        # A new cluster of this sweep: token authentication on, said here rather than by Ray's warning. Ray reads
        # the mode when it is imported, so only before that; once imported, ray.init turns it on itself.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    if not ray.is_initialized():
        # Trial processes' output (every rank's log, Ray Train's own warnings) stays in Ray's session logs.
        env = train_controller_env()
        ray.init(address=args.address, num_cpus=args.num_cpus if local else None, include_dashboard=False,
                 log_to_driver=False, runtime_env={"env_vars": env} if env else None)


def train_controller_env() -> dict[str, str]:
    """Settings for every process of the sweep's Ray job, the Train controllers included.

    Ray Train's controller collects the workers' reports (and learns that they finished) when it
    polls them, every 2 s by default: each evaluation, checkpoint and the end of a trial waited
    for the next poll, about 7 s per smoke trial (bench/tune_overhead.py). Polling every 0.5 s
    costs one small call per worker each time. Where this shell (or the Ray job it runs in)
    already sets the variable, that value stands and nothing is added: Ray refuses a job whose
    runtime environments set the same variable twice.
    """
    return {} if HEALTH_CHECK_ENV in os.environ else {HEALTH_CHECK_ENV: "0.5"}


def _start_tracking(args: argparse.Namespace, spec: SweepSpec,
                    saved: dict | None) -> sweep_runs.SweepTracking | None:
    """The MLflow parent run: continued on --resume, else created (None with tracking off)."""
    if saved is not None:
        t = saved.get("tracking")
        if not t:
            return None
        return sweep_runs.start_parent(args.mlflow_uri or t["uri"], t["experiment"], spec, t["parent_run_id"])
    uri = sweep_runs.absolute_uri(args.mlflow_uri or spec.base.tracking.mlflow_uri)
    if uri is None:
        return None
    experiment = resolve_experiment(args.experiment or spec.experiment or spec.base.tracking.experiment)
    return sweep_runs.start_parent(uri, experiment, spec)


def _save_sweep(experiment_path: str, spec: SweepSpec, tracking: sweep_runs.SweepTracking | None,
                args: argparse.Namespace) -> None:
    # No credentials in the saved sweep: --resume takes them again from the command line or environment.
    saved = redact_tree({"spec": spec.to_dict(), "tracking": tracking.__dict__ if tracking else None,
                         "storage": _storage_root(args.storage)})
    storage.write_text(storage.join(experiment_path, SWEEP_FILE), json.dumps(saved, indent=2))


def _run(args: argparse.Namespace, spec: SweepSpec, tracking: sweep_runs.SweepTracking | None,
         experiment_path: str):
    """Tuner.fit (or Tuner.restore + fit on --resume); returns the ResultGrid."""
    import ray
    from ray import tune

    from dist_robust.tuning.cleanup import TrialCleanup
    from dist_robust.tuning.console import TrialEvents
    from dist_robust.tuning.search import max_concurrent_trials, param_space, scheduler, search_alg, use_gpu
    from dist_robust.tuning.trial import TrialPlan, run_trial

    cluster = ray.cluster_resources()
    plan = TrialPlan(spec, storage.join(experiment_path, "train-runs"), _scratch(spec), tracking,
                     use_gpu(spec, cluster))
    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan), TRIAL_RESOURCES)
    callbacks = [TrialCleanup(tracking), TrialEvents(spec.metric)]  # a restored Tuner brings its own
    if args.resume and tune.Tuner.can_restore(experiment_path):
        tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
        return tuner.fit()
    concurrent = max_concurrent_trials(spec, cluster)
    tuner = tune.Tuner(
        trainable,
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples,
                                    scheduler=scheduler(spec), search_alg=search_alg(spec, concurrent),
                                    reuse_actors=False,
                                    trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(name=spec.name, storage_path=_storage_root(args.storage), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0), callbacks=callbacks),
    )
    return tuner.fit()


class GracefulStop:
    """Ctrl+C or SIGTERM (a cluster scheduler's stop): Tune saves the sweep's state and returns.

    Tune stops gracefully on SIGUSR1; this turns the first SIGINT/SIGTERM into that and records it,
    so an interrupted sweep is told apart from a finished one. A second signal interrupts at once.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received = False
        self._previous: dict = {}

    def __enter__(self) -> GracefulStop:
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # Tune's own handler would hide the interruption
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.received:
            raise KeyboardInterrupt
        self.received = True
        print(f"{signal.Signals(signum).name}: stopping the sweep after saving its state "
              "(send it again to stop at once)", file=sys.stderr)
        os.kill(os.getpid(), signal.SIGUSR1)

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _trial_name(trial) -> str:
    return trial.trial_id


def _finish(grid, spec: SweepSpec, tracking: sweep_runs.SweepTracking | None, experiment_path: str,
            interrupted: bool) -> int:
    table = trial_table(grid, spec)
    best = best_row(table, spec)
    print_summary(table, best, spec)
    if interrupted:
        if tracking is not None:
            sweep_runs.set_status(tracking, tracking.parent_run_id, "KILLED")
        print(f"interrupted: continue with  dist-robust tune --resume --name {spec.name} "
              f"--storage {os.path.dirname(experiment_path.rstrip('/'))}", file=sys.stderr)
        return EXIT_INTERRUPTED
    errors = int((table["status"] == "error").sum())
    if tracking is not None:
        status = "FAILED" if len(table) and errors == len(table) else "FINISHED"
        sweep_runs.log_summary(tracking, spec, [trial_record(row, spec) for _, row in table.iterrows()],
                               None if best is None else trial_record(best, spec), status)
    return 1 if errors else 0


def main() -> None:
    sys.exit(tune_main())


if __name__ == "__main__":
    main()
