"""What a finished run leaves behind: results.json, generalized.csv, the printed report, MLflow's final records.

Called on rank 0 only, with the results the trainer assembled; nothing here touches the engine.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys

from dist_robust.run import evaluate as E
from dist_robust.run.plots import log_run_plots
from dist_robust.run.tracking import Tracker

log = logging.getLogger(__name__)


def write_outputs(put, tracker: Tracker, results: dict, step: int) -> None:
    """Print the report, log the final metrics and artifacts, write results.json (and generalized.csv).

    ``put(relative path, text)`` writes a file of the output directory (publishing it when remote).
    """
    print_report(results)
    tracker.log_params({"eval_split": results["eval_split"]})  # compare marks rows of different splits
    tracker.log_metrics(final_metrics(results, step), step=step)
    tracker.log_dict(results["config"], "run_config.json")
    tracker.log_dict(results, "results.json")
    try:
        log_run_plots(tracker, results)
    except Exception as err:  # a plot must never fail a finished training run
        log.warning("could not log the run's plots: %s", err)
    if results["generalized"]:
        tracker.log_text(E.matrix_csv(results["generalized"]), "generalized.csv")
    for name, columns in tables(results).items():
        tracker.log_table(columns, name)
    if hasattr(tracker, "ui_link"):
        print(f"MLflow: {tracker.ui_link()}", flush=True)
    put("results.json", json.dumps(results, indent=2))
    if results["generalized"]:
        put("generalized.csv", E.matrix_csv(results["generalized"]))


def tables(results: dict) -> dict[str, dict[str, list]]:
    """The per-language accuracies and the generalized matrix as column -> values tables, in percent."""
    langs = list(results["per_language"])
    out = {"per_language.json": {"language": langs,
                                 "accuracy (%)": [round(100 * results["per_language"][lang], 2) for lang in langs]}}
    matrix = results["generalized"]
    if matrix:
        out["generalized_matrix.json"] = {"sentence1 language": langs,
                                          **{b: [round(100 * matrix[a][b], 2) for a in langs] for b in langs}}
    return out


def final_metrics(results: dict, step: int) -> dict[str, float]:
    """Final accuracies under their MLflow names, plus the last dev evaluation's."""
    final = {f"acc.{lang}": a for lang, a in results["per_language"].items()}
    final.update({f"gen.{a}.{b}": v for a, row in results["generalized"].items() for b, v in row.items()})
    final.update({k: results[k] for k in ("source_acc", "standard_avg", "all_avg", "generalized_avg")
                  if k in results})
    if results["dev_history"]:
        last = results["dev_history"][-1]
        final.update({f"dev_acc.{lang}": a for lang, a in last["per_language"].items()})
        final.update({f"dev_{k}": v for k, v in last.items() if k not in ("step", "per_language")})
    final.update(certify_metrics(results.get("certify"), results.get("source_language", "en")))
    final["skipped_steps"] = results["skipped_steps"]
    final["step"] = step
    return final


def certify_metrics(certify: dict | None, source: str) -> dict[str, float]:
    """``cert.<lang>`` (certified accuracy at the reference threshold), ``smoothed.<lang>``,
    ``abstain.<lang>``, ``cert.<lang>.<threshold>``, and target-language / off-diagonal averages."""
    if not certify:
        return {}
    ref = certify["reference"]
    out: dict[str, float] = {}
    for lang, cell in certify["per_language"].items():
        out[f"cert.{lang}"] = cell["certified"][ref]
        out[f"smoothed.{lang}"] = cell["accuracy"]
        out[f"abstain.{lang}"] = cell["abstain"]
        out.update({f"cert.{lang}.{k}": v for k, v in cell["certified"].items()})
    targets = [lang for lang in certify["per_language"] if lang != source]
    if targets:
        out["certified_standard_avg"] = sum(out[f"cert.{lang}"] for lang in targets) / len(targets)
        out["smoothed_standard_avg"] = sum(out[f"smoothed.{lang}"] for lang in targets) / len(targets)
    off = [cell["certified"][ref] for a, row in certify.get("generalized", {}).items()
           for b, cell in row.items() if a != b]
    if off:
        out["certified_generalized_avg"] = sum(off) / len(off)
    return out


def format_certify(certify: dict) -> str:
    """The certification table: smoothed accuracy, abstentions and certified accuracy per threshold."""
    names = certify["thresholds"]
    head = f"{'':<10}{'smoothed':>9}{'abstain':>9}" + "".join(f"{n:>9}" for n in names)
    lines = [head]
    for lang, cell in certify["per_language"].items():
        lines.append(f"{lang:<10}{100 * cell['accuracy']:9.2f}{100 * cell['abstain']:9.2f}"
                     + "".join(f"{100 * cell['certified'][n]:9.2f}" for n in names))
    return "\n".join(lines)


def print_report(results: dict) -> None:
    """The per-language table and the generalized matrix, on stdout."""
    cfg = results.get("config") or {}
    if cfg.get("train", {}).get("eval_only") and not results["best_step"]:  # `dist-robust eval` of a model
        print(f"\n{results['task']}: {results['eval_split']} accuracy of {cfg['model']['name']} as loaded")
    else:
        print(f"\n{results['task']} / {results['objective']}: {results['eval_split']} accuracy of the model "
              f"selected at step {results['best_step']}")
    summary = {k: results[k] for k in ("standard_avg", "all_avg", "generalized_avg") if k in results}
    print(E.format_table(results["per_language"], summary))
    if results["generalized"]:
        k = results.get("generalized_examples")
        subset = f"; off-diagonal cells on {k} evenly spaced ids" if k else ""
        print(f"\ngeneralized (sentence1 language x sentence2 language{subset}):")
        print(E.format_matrix(results["generalized"]))
    c = results.get("certify")
    if c:
        what = (f"L2 radius in sigma's units, sigma = {c['sigma']:g}" if c["method"] == "gaussian"
                else "d: at most d words substituted; all: every substitutable word")
        print(f"\ncertified accuracy (%), {c['method']} smoothing, n0 = {c['selection']}, n = {c['samples']}, "
              f"alpha = {c['alpha']:g}, {c['examples'] or 'all'} example(s) per set ({what}):")
        print(format_certify(c))
    print(flush=True)


def command_line() -> str:
    """The command this process runs, as a user would type it (a launcher's --local_rank left out), masked."""
    from dist_robust.infra.redaction import redact

    args = [a for a in sys.argv if not a.startswith("--local_rank")]
    return redact(" ".join(shlex.quote(a) for a in ["python", *args]))


def model_card(results: dict, labels: list[str] | None = None) -> str:
    """The exported folder's README.md (a Hugging Face model card): what the model is, how well it transfers,
    and how it was made."""
    cfg = results.get("config") or {}
    model, data, objective, train = (cfg.get(k, {}) for k in ("model", "data", "objective", "train"))
    per = results["per_language"]
    langs, source = list(per), results.get("source_language", "en")
    knobs = {"pgd": ("epsilon", "alpha", "adv_steps", "norm"), "freelb": ("epsilon", "alpha", "adv_steps", "norm"),
             "gaussian": ("sigma", "noise_samples"),
             "smart": ("smart_lambda", "epsilon", "alpha", "adv_steps")}.get(results["objective"], ())
    settings = ", ".join(f"{k} {objective.get(k)}" for k in knobs) + (f", perturbation sizes {objective.get('scale')}"
                                                                     if knobs else "")
    augment = f", with {data.get('augment')} augmentation (p {data.get('synonym_prob')})" \
        if data.get("augment", "none") != "none" else ""
    front = ["---", f"language: [{', '.join(langs)}]", "library_name: transformers", "pipeline_tag: text-classification",
             f"tags: [dist-robust, {results['task']}, {results['objective']}, zero-shot-cross-lingual-transfer]",
             f"base_model: {model.get('name')}", "---", ""]
    split = results["eval_split"]
    table = ["| language | accuracy (%) |", "|---|---:|"] + [f"| {lang}{' (trained on)' if lang == source else ''} | "
                                                            f"{100 * a:.2f} |" for lang, a in per.items()]
    averages = ", ".join(f"{k.replace('_', ' ')} {100 * results[k]:.2f}" for k in ("standard_avg", "generalized_avg",
                                                                                    "all_avg") if k in results)
    lines = [*front, f"# {model.get('name')} fine-tuned on {results['task']} with {results['objective']}", "",
             f"A sequence-pair classifier trained on {source} pairs only and evaluated zero-shot in "
             f"{len(langs) - 1} other language(s): `{results['objective']}`{f' ({settings})' if settings else ''}"
             f"{augment}, trained with dist-robust on "
             f"`{data.get('train_file') or results['task'] + ' (' + source + ' train)'}`, seed {train.get('seed')}, "
             f"{len(results.get('train_losses', []))} optimizer steps; the checkpoint with the best {source} dev "
             f"accuracy (step {results.get('best_step')}) is this one.", "",
             f"## Accuracy ({split} sets)", "", *table, "", f"Averages: {averages} (standard: the languages other "
             f"than {source}; generalized: pairs whose two sentences are in different languages).", ""]
    if results.get("generalized"):
        lines += ["Generalized (rows: sentence 1's language, columns: sentence 2's):", "",
                  "| | " + " | ".join(langs) + " |", "|---|" + "---:|" * len(langs)]
        lines += [f"| {a} | " + " | ".join(f"{100 * results['generalized'][a][b]:.2f}" for b in langs) + " |"
                  for a in langs]
        lines.append("")
    lines += ["## Use", "", "```python", "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
              "", 'tokenizer = AutoTokenizer.from_pretrained("PATH")',
              'model = AutoModelForSequenceClassification.from_pretrained("PATH")',
              'batch = tokenizer(["sentence 1"], ["sentence 2"], return_tensors="pt")',
              "label = model.config.id2label[model(**batch).logits.argmax(-1).item()]", "```", ""]
    if labels:
        lines += [f"Labels: {', '.join(labels)}.", ""]
    lines += ["## How it was made", "", "```bash", results.get("command", ""), "```", "",
              f"World size {cfg.get('world_size')}, ZeRO stage "
              f"{(cfg.get('ds_config') or {}).get('zero_optimization', {}).get('stage', 0)}, optimizer "
              f"{cfg.get('optimizer')}, learning rate {train.get('lr')}, micro-batch {train.get('micro_batch_size')}, "
              f"max length {model.get('max_length')}. `results.json` beside this folder holds every number above, "
              f"the loss of every step and the full configuration.", ""]
    return "\n".join(lines)
