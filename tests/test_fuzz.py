"""Property-based fuzzing of everything a user types or points the trainer at.

Run files, ds_configs, sweep files and data files (TSV, JSONL, XTREME, raw bytes) are generated
by ``hypothesis``; each must load or fail with the project's own error (``ConfigError``,
``SpaceError``, ``DataFileError``: a message naming the key or file:line and what is
accepted), never a traceback from inside YAML, JSON, DeepSpeed, Ray or the readers. Inputs
that load must be usable: a config that validates resolves its ds_config; every row read has
both sentences and a known label.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dist_robust.config.parsing import Parser
from dist_robust.config.parsing import add_run_arguments, config_from_args
from dist_robust.config.run_config import RunConfig, ConfigError
from dist_robust.config.validation import validate
from dist_robust.data.readers import PAWSX_LABELS, DataFileError, read_pairs
from dist_robust.config.ds_config import resolve_ds_config
from dist_robust.tuning.space import SpaceError, load_space

CASES = int(os.environ.get("DIST_ROBUST_FUZZ_CASES", "100"))  # per test; CI runs 100
FUZZ = settings(max_examples=CASES, deadline=None, suppress_health_check=list(HealthCheck), database=None,
               derandomize="DIST_ROBUST_FUZZ_CASES" not in os.environ)  # CI: the same cases every run
WORK = tempfile.mkdtemp(prefix="dist-robust-fuzz-")

SECTIONS = [f.name for f in dataclasses.fields(RunConfig) if f.name not in ("ds_config", "ds_config_path")]
KEYS = sorted({f.name for s in SECTIONS for f in dataclasses.fields(type(getattr(RunConfig(), s)))})
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 10 ** 6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["auto", "pgd", "none", "en", "1e-3", "-1", "nan", ""]))
values = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=5), scalars, max_size=2))


def _write(name: str, content: str | bytes) -> str:
    path = os.path.join(WORK, name)
    with open(path, "wb") as f:
        f.write(content.encode("utf-8", "surrogatepass") if isinstance(content, str) else content)
    return path


def _config(argv: list[str]) -> RunConfig:
    parser = Parser(prog="fuzz")
    add_run_arguments(parser)
    cfg = config_from_args(parser.parse_args(argv))
    validate(cfg, 2)
    return cfg


run_files = st.one_of(
    st.text(max_size=300),
    st.dictionaries(st.sampled_from([*SECTIONS, "bogus"]),
                    st.one_of(values, st.dictionaries(st.sampled_from([*KEYS, "bogus"]), values, max_size=4)),
                    max_size=4).map(lambda d: yaml.safe_dump(d, allow_unicode=True)))


@FUZZ
@given(run_files, st.sampled_from(["run.yaml", "run.json"]))
def test_run_files(text, name):
    try:
        cfg = _config(["--config", _write(name, text)])
    except ConfigError:
        return
    resolve_ds_config(cfg, 2)


ds_configs = st.fixed_dictionaries({}, optional={
    "zero_optimization": st.one_of(values, st.fixed_dictionaries({}, optional={"stage": values, "offload_optimizer": values})),
    "train_batch_size": values, "train_micro_batch_size_per_gpu": values, "gradient_accumulation_steps": values,
    "fp16": st.one_of(values, st.fixed_dictionaries({}, optional={"enabled": values})),
    "bf16": st.one_of(values, st.fixed_dictionaries({}, optional={"enabled": values})),
    "optimizer": st.one_of(values, st.fixed_dictionaries({}, optional={"type": values, "params": values})),
    "scheduler": st.one_of(values, st.fixed_dictionaries({}, optional={"type": values, "params": values})),
    "gradient_clipping": values,
})


@FUZZ
@given(st.one_of(ds_configs.map(json.dumps), st.text(max_size=100)))
def test_ds_configs(text):
    try:
        cfg = _config(["--deepspeed", _write("ds.json", text)])
    except ConfigError:
        return
    resolve_ds_config(cfg, 2)


sweeps = st.one_of(
    st.text(max_size=200),
    st.fixed_dictionaries({}, optional={
        "name": values, "metric": values, "mode": values, "num_samples": values, "scheduler": values,
        "base": st.one_of(values, st.fixed_dictionaries({}, optional={"flags": st.lists(st.text(max_size=12), max_size=4)})),
        "params": st.one_of(values, st.dictionaries(st.sampled_from(["objective.epsilon", "train.lr", "bogus.key",
                                                                     "objective.name", "train.seed"]),
                                                    st.one_of(values, st.fixed_dictionaries(
                                                        {"type": st.sampled_from(["choice", "uniform", "loguniform",
                                                                                  "randint", "grid", "bogus"])},
                                                        optional={"values": values, "low": values, "high": values})),
                                                    max_size=3)),
        "bogus": values,
    }).map(lambda d: yaml.safe_dump(d, allow_unicode=True)))


@FUZZ
@given(sweeps)
def test_sweep_files(text):
    try:
        load_space(_write("sweep.yaml", text))
    except SpaceError:
        pass


cells = st.one_of(st.text(alphabet=st.characters(blacklist_characters="\t\n\r"), max_size=12),
                  st.sampled_from(["0", "1", "2", "", "paraphrase", "id", "label", "sentence1", "sentence2"]))
tsv_rows = st.lists(st.lists(cells, min_size=0, max_size=6).map("\t".join), max_size=8)


@FUZZ
@given(st.one_of(
    st.tuples(st.just("pairs.tsv"), st.one_of(
        tsv_rows.map(lambda rows: "\n".join(["id\tsentence1\tsentence2\tlabel", *rows])), tsv_rows.map("\n".join))),
    st.tuples(st.just("pairs.jsonl"), st.lists(st.one_of(
        st.fixed_dictionaries({}, optional={"id": values, "sentence1": values, "sentence2": values, "label": values}
                              ).map(json.dumps), st.text(max_size=30)), max_size=6).map("\n".join)),
    st.tuples(st.just("pairs.xtreme"), tsv_rows.map("\n".join)),
    st.tuples(st.sampled_from(["pairs.tsv", "pairs.jsonl", "pairs.parquet"]), st.binary(max_size=200)),
))
def test_data_files(case):
    name, content = case
    fmt = "xtreme" if name.endswith(".xtreme") else "auto"
    try:
        result = read_pairs(_write(name, content), PAWSX_LABELS, "en", fmt=fmt)
    except DataFileError as err:
        assert name.split(".")[0] in str(err)  # the message names the file
        return
    for ex in result.examples:
        assert ex.sentence1.strip() and ex.sentence2.strip() and ex.label in (0, 1)
