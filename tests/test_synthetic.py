"""The synthetic benchmark's lexicon: what the misalignment knob puts into a built-in model."""

from __future__ import annotations

import pytest
import torch

from dist_robust.config.run_config import DataConfig
from dist_robust.data import synthetic
from dist_robust.data.tasks import get_task
from dist_robust.model.build import align_word_embeddings, build_model, train_tokenizer, word_embeddings


@pytest.fixture(scope="module")
def lexicon(tmp_path_factory):
    data = get_task(DataConfig(synthetic_train_size=16, synthetic_eval_size=16, synthetic_misalignment=0.8))
    tok = train_tokenizer(data.tokenizer_corpus(), 4000, str(tmp_path_factory.mktemp("tok")), data.words)
    return data, tok


def _row(tok, model, word):
    (token,) = tok(word, add_special_tokens=False)["input_ids"]
    return word_embeddings(model).weight[token].detach()


def test_every_word_is_one_token(lexicon):
    data, tok = lexicon
    assert all(len(tok(w, add_special_tokens=False)["input_ids"]) == 1 for w in data.words)
    # a sentence is its words, one token each, then the end mark
    e = data.dev["zh"][0]
    assert tok.tokenize(e.sentence1) == ["\u2581" + w for w in e.sentence1.split(" ")]


def test_target_words_start_at_the_chosen_distance_from_english(lexicon):
    data, tok = lexicon
    world = synthetic.SyntheticWorld()
    model = build_model("tiny", synthetic.LABELS, tok, seed=3)
    aligned, skipped = align_word_embeddings(model, tok, data.anchors, seed=3)
    assert skipped == 0 and aligned == len(data.anchors)
    for lang in ("de", "zh"):
        own = [c for c in range(len(world.lexicon["en"])) if not world.cognate[lang][c]][:20]
        for c in own:
            en, tgt = _row(tok, model, world.lexicon["en"][c]), _row(tok, model, world.lexicon[lang][c])
            assert ((tgt - en).norm() / en.norm()).item() == pytest.approx(0.8 * synthetic.DISTANCE[lang], rel=1e-5)
    shared = next(c for c in range(len(world.lexicon["en"])) if world.cognate["de"][c])
    assert world.lexicon["de"][shared] == world.lexicon["en"][shared]  # cognates are English tokens
    # English words spread around their class vector; synonyms near their concept's word
    c = world.cues_pos[0]
    en, cls = _row(tok, model, world.lexicon["en"][c]), _row(tok, model, "POSITIVE")
    assert ((en - cls).norm() / cls.norm()).item() == pytest.approx(synthetic.WORD_SPREAD, rel=1e-5)
    syn = _row(tok, model, world.synonyms[c][0])
    assert ((syn - en).norm() / en.norm()).item() == pytest.approx(synthetic.SYNONYM_DISTANCE, rel=1e-5)
    assert set(world.neighbors()[world.lexicon["en"][c]]) == set(world.synonyms[c])


def test_zero_misalignment_is_an_aligned_lexicon_and_the_draw_is_seeded(tmp_path):
    data = get_task(DataConfig(synthetic_train_size=16, synthetic_eval_size=16, synthetic_misalignment=0.0))
    tok = train_tokenizer(data.tokenizer_corpus(), 4000, str(tmp_path), data.words)
    world = synthetic.SyntheticWorld()
    models = []
    for _ in range(2):
        model = build_model("tiny", synthetic.LABELS, tok, seed=5)
        align_word_embeddings(model, tok, data.anchors, seed=5)
        models.append(model)
    c = next(c for c in range(len(world.lexicon["en"])) if not world.cognate["fr"][c])
    assert torch.equal(_row(tok, models[0], world.lexicon["fr"][c]), _row(tok, models[0], world.lexicon["en"][c]))
    assert torch.equal(word_embeddings(models[0]).weight, word_embeddings(models[1]).weight)
