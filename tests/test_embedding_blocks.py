"""The word embedding in row blocks (ZeRO-3's default with trainable embeddings): exact, and invisible outside.

Unit checks against one ``nn.Embedding`` (outputs and gradients equal to the bit), then real
2-rank launches with trainable embeddings: ZeRO-3 in 8 blocks must train the trajectory ZeRO-2
trains with one matrix, export a model under the plain parameter names that equals ZeRO-2's,
resume on one rank from its 2-rank checkpoint (through DeepSpeed's universal format, which names
the blocks) on the same trajectory, and refuse a resume that would hold the embedding otherwise.
"""

from __future__ import annotations

import json

import pytest
import torch

from dist_robust.config.run_config import ConfigError, RunConfig
from dist_robust.config.ds_config import load_ds_config
from dist_robust.model.build import (RowBlockEmbedding, embedding_block_count, join_word_embedding_blocks,
                                split_word_embeddings, word_embeddings)
from dist_robust.config.validation import validate
from tests.launch import REPO, TINY, deepspeed, results, rewind, train_process

STEPS = 4


def _classifier(vocab: int = 103, pad: int = 1):
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    torch.manual_seed(0)
    cfg = XLMRobertaConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, pad_token_id=pad, max_position_embeddings=pad + 20,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return XLMRobertaForSequenceClassification(cfg)


@pytest.mark.parametrize("pad", [1, 13, 102])  # the padding row inside a block, at a block's start, in the last
def test_blocks_compute_what_one_embedding_computes(pad):
    import copy

    whole = _classifier(pad=pad)
    split = copy.deepcopy(whole)
    assert split_word_embeddings(split, 8, {}) == 8
    blocks = word_embeddings(split)
    assert isinstance(blocks, RowBlockEmbedding) and blocks.bounds == [0, 13, 26, 39, 52, 64, 77, 90, 103]
    ids = torch.randint(0, 103, (4, 12), generator=torch.Generator().manual_seed(pad))
    ids[:, -3:] = pad
    ids[0, :8] = torch.tensor([0, 12, 13, 25, 26, 89, 90, 102])  # every block's edges
    labels = torch.tensor([0, 1, 0, 1])
    for model in (whole, split):
        model(input_ids=ids, labels=labels).loss.backward()
    assert torch.equal(word_embeddings(whole)(ids), blocks(ids))
    assert torch.equal(word_embeddings(whole).weight.grad, torch.cat([b.weight.grad for b in blocks.blocks]))
    assert word_embeddings(whole).weight.grad[pad].abs().sum() == 0  # the padding row still gets no gradient
    grads = join_word_embedding_blocks(split, {name: p.grad for name, p in split.named_parameters()})
    for name, p in whole.named_parameters():
        assert torch.equal(p.grad, grads[name]), name


def test_joined_state_dict_loads_as_the_plain_model(tmp_path):
    from transformers import XLMRobertaForSequenceClassification

    whole = _classifier()
    split = _classifier()
    split_word_embeddings(split, 5, {})
    state = join_word_embedding_blocks(split, split.state_dict())
    assert set(state) == set(whole.state_dict())
    split.save_pretrained(tmp_path, state_dict=state, safe_serialization=True)
    loaded = XLMRobertaForSequenceClassification.from_pretrained(tmp_path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in whole.state_dict().items())
    assert embedding_block_count(loaded) == 1 and embedding_block_count(split) == 5


def test_more_blocks_than_rows_and_frozen_embeddings():
    model = _classifier(vocab=6)
    word_embeddings(model).weight.requires_grad_(False)
    assert split_word_embeddings(model, 8, {}) == 6  # one row each at most
    assert all(not p.requires_grad for p in word_embeddings(model).parameters())


def test_embeddings_that_are_not_plain_stay_one_matrix():
    class Scaled(torch.nn.Embedding):  # as some models scale their word embeddings' output
        def forward(self, ids):
            return super().forward(ids) * 2.0

    model = _classifier()
    model.set_input_embeddings(Scaled(103, 16, padding_idx=1))
    assert split_word_embeddings(model, 8, {}) == 1 and type(word_embeddings(model)) is Scaled
    model.set_input_embeddings(torch.nn.Embedding(103, 16, max_norm=1.0))
    assert split_word_embeddings(model, 8, {}) == 1 and embedding_block_count(model) == 1


def test_blocks_outside_zero3_fail_before_start():
    cfg = RunConfig(ds_config=load_ds_config(str(REPO / "ds_configs" / "zero2.json")))
    cfg.ds_config_path = "ds_configs/zero2.json"
    cfg.model.embedding_blocks = 4
    with pytest.raises(ConfigError, match=r"model.embedding_blocks \(--embedding-blocks\) = 4: only ZeRO-3 .*"
                                          r"ds_configs/zero2.json is stage 2"):
        validate(cfg, 2)
    cfg.model.embedding_blocks = 0
    with pytest.raises(ConfigError, match=r"model.embedding_blocks \(--embedding-blocks\) = 0: must be >= 1"):
        validate(cfg, 2)


FLAGS = [*TINY, "--no-freeze-embeddings", "--max-steps", str(STEPS), "--save-steps", "2", "--eval-steps", "0",
         "--no-generalized", "--epsilon", "0.5", "--alpha", "0.2", "--adv-steps", "1"]


@pytest.fixture(scope="module")
def block_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("blocks")
    deepspeed([str(root / "straight"), "--ds-configs", *(str(REPO / "ds_configs" / f"{c}.json")
                                                          for c in ("zero2", "zero3")),
               "--objectives", "pgd", "--", *FLAGS], script="tests/engine_runs.py")
    run = root / "straight" / "zero3" / "pgd"
    rewound, refused = root / "one" / "zero3" / "pgd", root / "refused"
    rewind(run, rewound, "step-00000002")
    rewind(run, refused, "step-00000002")

    def one_rank(out, *extra):
        return train_process([*FLAGS, "--deepspeed", str(REPO / "ds_configs" / "zero3.json"), "--objective", "pgd",
                              "--output-dir", str(out), "--resume", "auto", *extra])

    resumed = one_rank(rewound)
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    return {"root": root, "zero2": results(root / "straight" / "zero2" / "pgd"), "zero3": results(run),
            "one": results(rewound), "one_log": resumed.stdout + resumed.stderr,
            "refused": one_rank(refused, "--embedding-blocks", "1")}


@pytest.mark.launcher
def test_zero3_in_blocks_trains_zero2s_trajectory(block_runs):
    root = block_runs["root"] / "straight"
    layouts = {c: json.loads((root / c / "pgd" / "checkpoints" / "step-00000002" / "layout.json").read_text())
               for c in ("zero2", "zero3")}
    assert layouts["zero3"]["embedding_blocks"] == 8 and layouts["zero2"]["embedding_blocks"] == 1
    losses = block_runs["zero3"]["train_losses"]
    assert len(losses) == STEPS
    assert losses == pytest.approx(block_runs["zero2"]["train_losses"], abs=1e-5)
    assert block_runs["zero3"]["per_language"] == pytest.approx(block_runs["zero2"]["per_language"], abs=1e-9)


@pytest.mark.launcher
def test_exported_model_has_the_plain_names_and_zero2s_weights(block_runs):
    from safetensors.torch import load_file

    root = block_runs["root"] / "straight"
    exported = {c: load_file(str(root / c / "pgd" / "model" / "model.safetensors")) for c in ("zero2", "zero3")}
    assert set(exported["zero3"]) == set(exported["zero2"])
    assert not [k for k in exported["zero3"] if ".blocks." in k]
    name = next(k for k in exported["zero3"] if k.endswith("word_embeddings.weight"))
    assert exported["zero3"][name].shape == exported["zero2"][name].shape  # all 8 blocks joined
    for key, value in exported["zero2"].items():
        assert torch.allclose(exported["zero3"][key].float(), value.float(), atol=1e-5), key


@pytest.mark.launcher
def test_one_rank_resumes_the_blocks_of_a_two_rank_run(block_runs):
    assert "written by 2 rank(s), continuing on 1" in block_runs["one_log"]
    assert block_runs["one"]["train_losses"] == pytest.approx(block_runs["zero3"]["train_losses"], abs=1e-6)
    assert block_runs["one"]["per_language"] == pytest.approx(block_runs["zero3"]["per_language"], abs=1e-9)


@pytest.mark.launcher
def test_resume_with_other_blocks_is_refused_with_the_fix(block_runs):
    refused = block_runs["refused"]
    assert refused.returncode != 0
    assert ("model.embedding_blocks (--embedding-blocks) = 1: the checkpoint" in refused.stderr
            and "holds the word embedding in 8 block(s); resume with --embedding-blocks 8" in refused.stderr)


@pytest.mark.parametrize("config, frozen, asked, expected", [
    ("zero3", False, None, 8),  # the shipped ZeRO-3 releases layers after use
    ("zero3", True, None, 1),  # frozen embeddings have no gradient to split
    ("zero3", False, 3, 3),
    ("zero3_offload", False, None, 1),  # DeepSpeed's default limits keep layers gathered: blocks would only cost
    ("zero2", False, None, 1),
])
def test_default_blocks_follow_the_ds_config(config, frozen, asked, expected):
    from dist_robust.config.ds_config import embedding_blocks

    cfg = RunConfig(ds_config=load_ds_config(str(REPO / "ds_configs" / f"{config}.json")))
    cfg.model.embedding_blocks = asked
    assert embedding_blocks(cfg, cfg.ds_config, frozen) == expected
