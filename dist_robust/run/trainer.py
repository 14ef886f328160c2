"""The one training loop: setup -> resume -> fit -> evaluate -> save.

Every entry point (``train.py``, ``dist-robust train``, Ray Tune trials) calls :func:`run`.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Sequence

import torch

from dist_robust.config.ds_config import embedding_blocks
from dist_robust.config.run_config import ConfigError, RunConfig
from dist_robust.config.validation import validate
from dist_robust.data.augment import SynonymAugmenter
from dist_robust.data.cache import encode_cached
from dist_robust.data.pipeline import (Collator, batches_per_epoch, continue_batch_index, encode, micro_batch_number,
                                       to_device, train_batch_indices)
from dist_robust.data.tasks import TaskData, get_task
from dist_robust.infra import distributed as D
from dist_robust.infra import quiet, storage
from dist_robust.infra.clock import StartupClock
from dist_robust.infra.redaction import redact, redact_tree
from dist_robust.infra.zero import (chunked_zero_grad_norm, forget_zero3_module, norm_overflow_check, optimizer_name,
                                    share_zero3_master_weights, zero3_context)
from dist_robust.model.build import (align_word_embeddings, build_model, count_parameters, embedding_block_count,
                                     is_builtin, load_tokenizer, split_word_embeddings, train_tokenizer,
                                     word_embeddings)
from dist_robust.objectives import EmbeddingPerturbation, StepContext, build_objective
from dist_robust.objectives.smart import precision_caveat
from dist_robust.run import evaluate as E
from dist_robust.run import progress, run_folder
from dist_robust.run.callbacks import Callback, Callbacks, TrackMetrics
from dist_robust.run.checkpointing import CheckpointStore, export_model, load_tag
from dist_robust.run.faults import FaultInjection
from dist_robust.run.final import certify_final, check_final_sets, final_evaluation
from dist_robust.run.outputs import command_line, final_metrics, model_card, write_outputs
from dist_robust.run.plan import ResumePoint, resolve
from dist_robust.run.preflight import check_inputs
from dist_robust.run.stability import BadStepMonitor, fp16_loss_scale, guard_plain_optimizer
from dist_robust.run.state import Setup, State
from dist_robust.run.stopping import PREEMPTION, Preempted, preemption_window
from dist_robust.run.tags import BEST, LATEST, best_tag, step_tag
from dist_robust.run.tracking import ResilientTracker, describe_run, flatten, resolve_experiment, resolve_uri

log = logging.getLogger(__name__)

STOP_KEY = "_stop"  # in a step's reduced statistics: some rank got a preemption signal


def run(cfg: RunConfig, callbacks: Sequence[Callback] = ()) -> dict | None:
    """Train and evaluate one configured run. Returns the results on rank 0 (None elsewhere).

    ``callbacks`` (:mod:`dist_robust.run.callbacks`) add what surrounds the loop: a Ray Tune trial
    reports its metrics and checkpoints through one. Tracking and, when planned, fault injection
    are added here.
    """
    setup = _setup(cfg)
    try:
        state = _resume(setup)
        _start_tracking(setup, state)
        hooks = Callbacks([TrackMetrics(setup.tracker), *filter(None, [FaultInjection.wanted()]), *callbacks])
        hooks.on_start(setup)
        error = None
        try:
            if cfg.train.eval_only:
                state.best_step = state.step  # evaluate the weights as they are
            else:
                _fit(setup, state, hooks)
            results = final_evaluation(setup, state)
            if cfg.certify.method != "none":
                results["certify"] = certify_final(setup)
            _save_outputs(setup, state, results)
            hooks.on_checkpoint(final_metrics(results, state.step), None)
        except BaseException as err:  # a stop (Ctrl+C, SIGTERM, a preemption) is KILLED, the rest FAILED
            error = err
            setup.tracker.finish("KILLED" if isinstance(err, (KeyboardInterrupt, Preempted)) else "FAILED")
            raise
        finally:
            hooks.on_end(error)
    finally:
        _release(setup)
    setup.tracker.finish()
    return results if D.is_main() else None


def _release(setup: Setup) -> None:
    """Give back what the run holds, so a later run in this process starts from nothing.

    DeepSpeed's gradient hooks live on autograd's C++ nodes and point back at the engine: a
    reference cycle Python's collector cannot see, so without ``destroy()`` every engine (its
    model, gradients and optimizer states, on the host or the GPU) outlives its run.
    """
    try:
        setup.perturbation.remove()
        setup.engine.destroy()
        if setup.zero3.handle is not None:
            forget_zero3_module(setup.engine.module)
    except Exception as e:  # never in place of the run's own error, or of its results
        log.warning("the engine was not released (%s: %s); its memory stays taken until this process ends",
                    type(e).__name__, e)
    finally:
        setup.zero3.close()


def _setup(cfg: RunConfig) -> Setup:
    import deepspeed

    clock = StartupClock()
    D.setup_logging()  # first: what loading the data says (a split it reports instead) reaches the user
    quiet.set_verbose(cfg.train.verbose)
    validate(cfg, D.world_size())
    check_inputs(cfg)  # the model, languages and files the config names, before anything is loaded
    run_folder.check(cfg)  # before anything is written: another run's outputs stay as they are
    # Data errors (bad rows, leakage) surface before any process group.
    data = get_task(cfg.data, train=not cfg.train.eval_only)
    check_final_sets(cfg, data)
    augmenter = SynonymAugmenter.from_config(cfg.data, cfg.train.seed, data.synonyms)
    clock.mark("data")
    with quiet.printed_aside():  # (DeepSpeed prints a line per rank when it loads its compiled op)
        D.init_process_group(cfg.train.dist_timeout)
    store = CheckpointStore(cfg.train.output_dir, cfg.train.staging_dir, cfg.train.save_total_limit,
                            cfg.train.publish_timeout)
    if D.is_main():
        run_folder.claim(cfg, store.publisher.publish_text)
    D.barrier()
    quiet.to_file(quiet.log_path(store.publisher.mirror, D.rank()))
    plan = resolve(cfg, store, store.detect_node_local())
    cfg, ds = plan.cfg, plan.ds_config  # from here on, read-only
    clock.mark("process group and checkpoint store")
    tokenizer = _tokenizer(cfg, data, store)
    collator = Collator(tokenizer)
    clock.mark("tokenizer")
    train_set = encode_cached([] if cfg.train.eval_only else data.train, tokenizer, cfg.model.max_length,
                              cfg.data.cache_dir)  # collective under a cache_dir: every rank calls it
    dev_sets = data.dev if cfg.train.dev_languages == "all" else \
        {lang: rows for lang, rows in data.dev.items() if lang == cfg.data.source_language}
    dev = E.prepare(dev_sets, tokenizer, cfg.model.max_length, cfg.data.cache_dir)
    clock.mark("encoding")
    zero3 = zero3_context(plan.engine_config())
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model.name, data.label_names, tokenizer, cfg.model.dropout, cfg.train.seed)
    frozen = _pretrained_lexicon(cfg, data, tokenizer, model)
    blocks = split_word_embeddings(model, embedding_blocks(cfg, ds, frozen), plan.engine_config())
    _check_resume_blocks(plan.resume, blocks)
    if blocks > 1:
        log.info("word embedding: %d blocks of rows, each gathered and reduced on its own (ZeRO-3; "
                 "--embedding-blocks 1 keeps one matrix)", blocks)
    clock.mark("model")
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                     if p.requires_grad], config=plan.engine_config())
    if cfg.train.compile:
        engine.compile()  # torch.compile of the module in place: engine(...) and engine.module(...) alike
    clock.mark("engine")
    log.info(clock.line())
    spared = share_zero3_master_weights(engine)
    if spared:
        log.info("ZeRO-3 master weights: the fp32 parameter partitions themselves (%.1f MB per rank spared)",
                 spared / 1e6)
    if chunked_zero_grad_norm(engine):
        log.debug("ZeRO gradient norm: float32 norms instead of float64 copies of every gradient")
    checked = norm_overflow_check(engine)
    if checked:
        log.debug("%s: a step's overflow is read from the global gradient norm, not a scan of every tensor", checked)
    guard_plain_optimizer(engine)
    # Training mode (dropout on): from_pretrained hands a model over in eval mode, and nothing
    # else would switch it; evaluation restores whichever mode it found.
    engine.train()
    log.info("%s: %.1fM parameters, %d rank(s), ZeRO stage %d, optimizer %s, objective %s, %d training pairs",
             cfg.model.name, count_parameters(engine.module) / 1e6, D.world_size(),
             engine.zero_optimization_stage(), optimizer_name(engine), cfg.objective.name, len(train_set))
    perturbation = EmbeddingPerturbation(word_embeddings(engine.module))
    objective = build_objective(cfg.objective)
    caveat = precision_caveat(objective, ds)
    if caveat and D.is_main():
        log.warning(caveat)
    return Setup(plan, data, tokenizer, collator, train_set, dev, engine, objective, perturbation, store, zero3,
                 clock, augmenter)


def _pretrained_lexicon(cfg: RunConfig, data: TaskData, tokenizer, model) -> bool:
    """Built-in models on a task with anchors (the synthetic one) start from its aligned lexicon,
    frozen unless ``--no-freeze-embeddings``; ``--freeze-embeddings`` freezes any model's.
    Returns whether the embeddings are frozen."""
    builtin = is_builtin(cfg.model.name)
    if builtin and data.anchors:
        aligned, skipped = align_word_embeddings(model, tokenizer, data.anchors, cfg.train.seed)
        log.info("word embeddings: %d word(s) start at their English translation's (misalignment %g)%s",
                 aligned, cfg.data.synthetic_misalignment,
                 f"; {skipped} not single tokens, left random" if skipped else "")
    freeze = cfg.model.freeze_embeddings
    if freeze is None:
        freeze = builtin and bool(data.anchors)
    if freeze:  # the whole embedding layer: trainable positions would soon drown fixed word vectors
        getattr(model.base_model, "embeddings", word_embeddings(model)).requires_grad_(False)
    return bool(freeze)


def _check_resume_blocks(resume: ResumePoint | None, blocks: int) -> None:
    """A checkpoint names its embedding's parameters by its blocks: resume with as many."""
    if resume is None or resume.layout is None:
        return
    held = resume.layout.get("embedding_blocks", 1)  # (checkpoints from before blocks existed: 1)
    if held != blocks:
        where = " on a ZeRO-3 ds_config" if held > 1 else ""
        raise ConfigError([f"model.embedding_blocks (--embedding-blocks) = {blocks}: the checkpoint {resume.root}/"
                           f"{resume.tag} holds the word embedding in {held} block(s); resume with "
                           f"--embedding-blocks {held}{where}"])


def _layout(setup: Setup) -> dict:
    """What a resume on another world size needs to know about this run's batches."""
    return {"world_size": D.world_size(), "micro_batch_size": setup.ds_config["train_micro_batch_size_per_gpu"],
            "grad_accum": setup.plan.batches_per_step,
            "zero_stage": setup.engine.zero_optimization_stage(), "train_size": len(setup.train_set),
            "embedding_blocks": embedding_block_count(setup.engine.module)}


def _save(setup: Setup, state: State, tag: str, pointer: str = LATEST) -> str:
    start = time.monotonic()
    local = setup.store.save(setup.engine, tag, _client_state(state), pointer=pointer, layout=_layout(setup))
    setup.save_seconds = time.monotonic() - start  # what a checkpoint costs, for a preemption's grace period
    return local


def _tokenizer(cfg: RunConfig, data: TaskData, store: CheckpointStore):
    """The run's tokenizer: given, the model's own, or trained here on rank 0 and shared."""
    if cfg.model.tokenizer:
        return load_tokenizer(cfg.model.tokenizer)
    if not is_builtin(cfg.model.name):
        return load_tokenizer(cfg.model.name)
    saved = storage.join(cfg.train.output_dir, "tokenizer")
    local = os.path.join(os.path.dirname(store.local_root), "tokenizer")
    with D.main_first(local=True):
        if not os.path.exists(os.path.join(local, "tokenizer.json")):
            if storage.exists(storage.join(saved, "tokenizer.json")):  # a resumed remote run reuses it
                storage.download_dir(saved, local)
            elif D.local_rank() == 0:
                train_tokenizer(data.tokenizer_corpus(), cfg.model.tokenizer_vocab_size, local, data.words)
                store.publisher.publish_dir("tokenizer")
    return load_tokenizer(local)


def _resume(setup: Setup) -> State:
    point = setup.plan.resume
    if point is None:
        return State()
    client_state = load_tag(setup.engine, point.local_root, point.tag, point.layout)
    state = State(**client_state["dist_robust"])
    old_world = point.layout["world_size"] if point.layout else D.world_size()
    if old_world != D.world_size() and not setup.cfg.train.eval_only:  # (evaluation reads no training data)
        n, micro = len(setup.train_set), setup.ds_config["train_micro_batch_size_per_gpu"]
        state.batch_index, repeated = continue_batch_index(n, micro, old_world, D.world_size(), state.batch_index)
        if repeated:
            log.warning("the checkpoint stopped inside a row of %d micro-batches: %d micro-batch(es) are read again",
                        D.world_size(), repeated)
    log.info("resumed from %s/%s at step %d (written by %d rank(s), continuing on %d)", point.root, point.tag,
             state.step, old_world, D.world_size())
    goes_on = state.step < setup.cfg.train.max_steps and not setup.cfg.train.eval_only
    if goes_on and state.best_step == state.step and setup.store.agreed(BEST) != best_tag(state.step):
        # The run ended at its best step (the last one gets no separate best checkpoint) and now
        # goes on: these weights are that best model, so keep them before training changes them.
        _save(setup, state, best_tag(state.step), pointer=BEST)
    return state


def _start_tracking(setup: Setup, state: State) -> None:
    cfg = setup.cfg
    uri = resolve_uri(cfg.tracking.mlflow_uri)
    if D.is_main() and uri is not None:
        _open_run(setup, state, uri)
    # Every rank's checkpoint carries the same state: on node-local disks each node writes the model
    # states file, and its manifest entry must hold for every node's copy.
    state.mlflow_run_id = D.from_main(state.mlflow_run_id)


def _open_run(setup: Setup, state: State, uri: str) -> None:
    """Rank 0: the MLflow run (a resumed run's own), with the config as its params."""
    cfg = setup.cfg
    name, description = describe_run(cfg, setup.plan.engine_config(), D.world_size())
    journal_dir = os.path.dirname(setup.store.local_root)  # the output directory, or its local staging
    setup.tracker = ResilientTracker(journal_dir, uri, resolve_experiment(cfg.tracking.experiment),
                                     cfg.tracking.run_name or name, run_id=cfg.tracking.run_id or state.mlflow_run_id,
                                     tags={"task": cfg.data.task, "objective": cfg.objective.name,
                                           "mlflow.note.content": description,
                                           **dict(t.partition("=")[::2] for t in cfg.tracking.tags)})
    state.mlflow_run_id = setup.tracker.run_id
    params = flatten({k: v for k, v in cfg.to_dict().items() if k not in ("ds_config",)})
    params.update(flatten(setup.plan.engine_config(), "ds."))
    params["world_size"] = D.world_size()
    params["optimizer"] = optimizer_name(setup.engine)
    setup.tracker.log_params(redact_tree(params))


def _seed_for(seed: int, stream: int, micro_batch: int) -> int:
    """A seed per (run seed, stream, micro-batch number of the run): resume needs no RNG state,
    and a batch gets the same dropout masks and perturbations on any number of ranks."""
    return (seed * 1_000_003 + stream * 7_919 + micro_batch) % (2 ** 63)


def _train_step(setup: Setup, state: State) -> dict[str, float]:
    """One optimizer step: ``grad_accum`` data batches, each through the objective."""
    cfg, engine = setup.cfg, setup.engine
    per_batch: list[dict[str, float]] = []
    for _ in range(setup.plan.batches_per_step):
        batch = to_device(_train_batch(setup, state.batch_index), engine.device)
        position = micro_batch_number(len(setup.train_set), setup.ds_config["train_micro_batch_size_per_gpu"],
                                      D.world_size(), D.rank(), state.batch_index)
        # Dropout draws from the device's generator (CPU and CUDA masks differ); perturbations
        # come from this CPU generator, so they are the same on every device.
        dropout_seed = _seed_for(cfg.train.seed, 0, position)
        torch.manual_seed(dropout_seed)
        gen = torch.Generator(device="cpu").manual_seed(_seed_for(cfg.train.seed, 1, position))
        ctx = StepContext(setup.perturbation, engine.module.config.hidden_size, gen, fp16_loss_scale(engine),
                          state.step, dropout_seed)
        per_batch.append(setup.objective.train_step(engine, batch, ctx))
        state.batch_index += 1
    state.step += 1
    if engine.global_steps != state.step:
        raise RuntimeError(f"engine took {engine.global_steps} optimizer steps, expected {state.step}: "
                           "the ds_config's gradient_accumulation_steps does not match the run")
    keys = sorted(per_batch[0])
    local = torch.stack([torch.stack([s[k].float() for s in per_batch]).mean() for k in keys])  # on the device
    # A preemption signal on any rank travels with the losses: every rank learns of it after the same step.
    stop = torch.tensor([float(PREEMPTION.requested())], device=local.device)
    *means, stop = D.mean_over_ranks(torch.cat([local, stop]))  # one collective, one host read per step
    return {**dict(zip(keys, means)), STOP_KEY: stop}


def _train_batch(setup: Setup, batch_index: int) -> dict:
    """This rank's data batch number ``batch_index``, freshly augmented when RS-DA is on."""
    n, micro = len(setup.train_set), setup.ds_config["train_micro_batch_size_per_gpu"]
    idx = train_batch_indices(n, micro, D.world_size(), D.rank(), setup.cfg.train.seed, batch_index)
    if setup.augmenter is None:
        return setup.collator(setup.train_set, idx)
    epoch = batch_index // batches_per_epoch(n, micro, D.world_size())
    rows = setup.augmenter.batch([setup.data.train[i] for i in idx], epoch)  # new substitutes every epoch
    return setup.collator(encode(rows, setup.tokenizer, setup.cfg.model.max_length), list(range(len(rows))))


def _fit(setup: Setup, state: State, hooks: Callback) -> None:
    cfg = setup.cfg.train
    monitor = BadStepMonitor(setup.engine, cfg.max_bad_steps)
    bar = progress.bar(cfg, cfg.max_steps, "train", "step", initial=state.step)
    lines = progress.ProgressLines(cfg.log_interval, cfg.max_steps, state.step) if bar is None and D.is_main() else None
    times: list[float] = []
    with preemption_window(enabled=cfg.preempt_grace > 0):
        _loop(setup, state, hooks, monitor, bar, lines, times)
    if bar is not None:
        bar.close()
    if times:
        state.seconds_per_step = statistics.median(times[1:] or times)


def _loop(setup: Setup, state: State, hooks: Callback, monitor: BadStepMonitor, bar, lines,
          times: list[float]) -> None:
    cfg = setup.cfg.train
    while state.step < cfg.max_steps:
        hooks.on_step_start(state.step + 1)
        t0 = time.perf_counter()
        stats = _train_step(setup, state)
        stop = stats.pop(STOP_KEY) > 0
        elapsed = time.perf_counter() - t0
        if not times:
            log.info("first step done %.1f s after %s (the step itself %.2f s)", setup.clock.elapsed(),
                     setup.clock.since, elapsed)
        times.append(elapsed)
        state.train_losses.append(stats["loss"])
        state.max_delta_norm = max(state.max_delta_norm, stats.get("delta_norm", 0.0))
        if monitor.check(state.step, stats["loss"]):
            state.skipped_steps += 1
            stats["skipped_steps"] = float(state.skipped_steps)
        hooks.on_step_end(state.step, _step_metrics(setup, stats, elapsed))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.4f}")
        if lines is not None:
            lines.step(state.step, stats["loss"], elapsed)
        last = state.step == cfg.max_steps
        metrics, checkpoint = {}, None
        if (cfg.eval_steps and state.step % cfg.eval_steps == 0) or last:
            metrics = _evaluate_dev(setup, state, hooks)
        wanted = hooks.wants_checkpoint(state.step)  # (collective: asked at every step)
        if (cfg.save_steps and state.step % cfg.save_steps == 0) or last or wanted:
            checkpoint = _save(setup, state, step_tag(state.step))
        if metrics or checkpoint:
            hooks.on_checkpoint({**metrics, "step": state.step, "train/loss": stats["loss"]}, checkpoint)
        if stop:  # (at the last step too: its checkpoint is saved, and the rerun only evaluates)
            _preempt(setup, state, checkpoint is not None)


def _preempt(setup: Setup, state: State, saved: bool) -> None:
    """After a preemption signal: checkpoint this step if the grace period allows (rank 0 judges, from its own
    clock and this run's last checkpoint time), then raise :class:`Preempted` on every rank."""
    grace = setup.cfg.train.preempt_grace
    waited = time.monotonic() - PREEMPTION.at if PREEMPTION.at is not None else 0.0
    need = setup.save_seconds
    verdict = D.from_main((PREEMPTION.signal_name or "a preemption signal on another rank",
                           saved or (grace > 0 and (need is None or waited + 1.5 * need < grace)), waited, need))
    name, fits, waited, need = verdict
    tag = step_tag(state.step)
    if fits and not saved:
        start = time.monotonic()
        _save(setup, state, tag)
        detail = f"checkpoint {tag} saved in {time.monotonic() - start:.1f} s, {waited:.1f} s after the signal"
    elif saved:
        detail = f"checkpoint {tag} was due at this step and is saved"
    else:
        tag = None
        detail = (f"no checkpoint: --preempt-grace {grace:g} s leaves too little time (the step ended {waited:.1f} s "
                  f"after the signal; a checkpoint took {need or 0:.1f} s)")
    resume = tag or setup.store.agreed(LATEST)
    raise Preempted(name, state.step, tag, resume, detail)


def _step_metrics(setup: Setup, stats: dict[str, float], elapsed: float) -> dict[str, float]:
    """What a step reports: its rank-mean statistics, the learning rate, gradient norm and throughput."""
    engine = setup.engine
    metrics = {f"train/{k}": v for k, v in stats.items()}
    metrics["train/lr"] = engine.get_lr()[0]
    norm = engine.get_global_grad_norm()
    if norm is not None:
        metrics["train/grad_norm"] = float(norm)
    metrics["train/samples_per_s"] = setup.ds_config["train_batch_size"] / max(elapsed, 1e-9) / \
        (setup.objective.micro_steps or 1)
    return metrics


def _client_state(state: State) -> dict:
    return {"dist_robust": dict(state.__dict__)}


def _evaluate_dev(setup: Setup, state: State, hooks: Callback) -> dict[str, float]:
    """Dev accuracy in every language; keep the best checkpoint by source-language accuracy."""
    cfg = setup.cfg
    hooks.on_evaluation_start(state.step)
    acc = E.accuracy(setup.engine, setup.dev, setup.collator, cfg.train.eval_batch_size)
    summary = E.summarize(acc, None, cfg.data.source_language)
    state.dev_history.append({"step": state.step, "per_language": acc, **summary})
    setup.dev_measured[state.step] = dict(acc)
    metrics = {f"dev_acc.{lang}": a for lang, a in acc.items()}
    metrics.update({f"dev_{k}": v for k, v in summary.items()})
    hooks.on_evaluation(state.step, metrics)
    log.info("step %d dev: %s", state.step, "  ".join(f"{k} {100 * v:.2f}" for k, v in acc.items()))
    improved = summary["source_acc"] > state.best_score
    if improved:
        state.best_score, state.best_step = summary["source_acc"], state.step
    last = state.step == cfg.train.max_steps
    if improved and not last:
        _save(setup, state, best_tag(state.step), pointer=BEST)
    return metrics


def _save_outputs(setup: Setup, state: State, results: dict) -> None:
    """Export the model (every rank: ZeRO-3 gathers it), then write results and logs on rank 0."""
    t, publisher = setup.cfg.train, setup.store.publisher
    publisher.publish_all()  # checkpoints still waiting for the store, if it was away
    if t.export_model:
        results["model_uri"] = redact(export_model(setup.engine, setup.tokenizer, setup.store))
    if D.is_main():
        results["command"] = command_line()
        if t.export_model:  # the folder goes out as users share models: a card, and in MLflow as a pyfunc
            publisher.publish_text("model/README.md", model_card(results, list(setup.data.label_names)))
        write_outputs(publisher.publish_text, setup.tracker, results, state.step)
        if t.export_model and t.log_model:
            setup.tracker.log_model(os.path.join(publisher.mirror, "model"))
        publisher.check_published()
