"""Early predictors: logit lens, trained early head, persistence, recall, config resolution."""
from __future__ import annotations

import pytest
import torch

import propd_compile

from models_tiny import VOCAB, tiny_model
from propd_compile import ProPDConfig
from propd_compile.early_head import (
    EarlyHead,
    collect,
    logit_lens,
    prune_options,
    recall_table,
    topk_recall,
    train_early_head,
)
from propd_compile.kernels.early_prune import get_predictor


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=2, layers=4)


@pytest.fixture(scope="module")
def data(model):
    g = torch.Generator().manual_seed(0)
    seqs = [(torch.randint(6, VOCAB, (5,), generator=g).tolist(), torch.randint(6, VOCAB, (30,), generator=g).tolist())
            for _ in range(24)]
    return collect(model, seqs, [1, 2])


def test_collect_targets_are_the_final_argmax(model, data):
    assert data["hidden"][1].shape == (24 * 30, 32) and data["target"].shape == (24 * 30,)
    out = model(input_ids=torch.ones(1, 3, dtype=torch.long), output_hidden_states=True)
    lens = logit_lens(model)
    # the last hidden state is already normed: the lens on the pre-norm output of the last layer
    # reproduces the model's logits (what the lens computes at an early layer)
    pre_norm = model.model.layers[-1].register_forward_hook(lambda m, a, o: setattr(m, "_out", o))
    model(input_ids=torch.ones(1, 3, dtype=torch.long))
    pre_norm.remove()
    last = model.model.layers[-1]._out
    last = last[0] if isinstance(last, tuple) else last
    torch.testing.assert_close(lens(last), out.logits)


def test_fresh_head_is_the_logit_lens_and_training_beats_it(model, data):
    h, t = data["hidden"][1].float(), data["target"]
    fresh = EarlyHead.for_model(model, 1)
    torch.testing.assert_close(fresh.predictor(model)(h), logit_lens(model)(h))
    head = train_early_head(model, h, t, layer=1, epochs=30, batch_size=64, lr=3e-3, negatives=16)
    with torch.no_grad():
        ce_lens = torch.nn.functional.cross_entropy(logit_lens(model)(h), t)
        ce_head = torch.nn.functional.cross_entropy(head.predictor(model)(h), t)
    # full-vocabulary loss, though trained with sampled negatives (the random model's next-token
    # distributions are nearly flat: the attainable gain is small, the lens is at 3.91 here)
    assert ce_head < ce_lens - 0.1
    assert topk_recall(head.predictor(model), h, t, (1,))[1] >= topk_recall(logit_lens(model), h, t, (1,))[1]
    assert topk_recall(logit_lens(model), h, t, (VOCAB,))[VOCAB] == 1.0
    table = recall_table(model, data, {1: head}, torch.arange(h.shape[0]) % 2 == 0, (1, 5))
    assert set(table) == {1, 2} and set(table[1]) == {"logit_lens", "early_head"} and set(table[2]) == {"logit_lens"}


def test_save_load_round_trip_and_wrong_model_refused(model, tmp_path):
    head = EarlyHead.for_model(model, 2)
    torch.nn.init.normal_(head.block.linear.weight, std=0.02)
    head.save(tmp_path, {"note": "test"})
    back = EarlyHead.load(tmp_path, model)
    assert back.layer == 2
    h = torch.randn(3, 32)
    torch.testing.assert_close(back.predictor(model)(h), head.predictor(model)(h), rtol=1e-3, atol=1e-3)  # fp16 on disk
    with pytest.raises(ValueError, match="does not fit"):
        EarlyHead.load(tmp_path, tiny_model("llama", seed=9, layers=4))
    with pytest.raises(FileNotFoundError):
        EarlyHead.load(tmp_path / "nothing")


def test_shortlist_head_scores_its_tokens_and_round_trips(model, tmp_path):
    head = EarlyHead.for_model(model, 1)
    torch.nn.init.normal_(head.block.linear.weight, std=0.02)
    head.vocab = torch.tensor([3, 7, 8, 40])
    h = torch.randn(5, 32)
    full = head.predictor(model, shortlist=False)(h)
    torch.testing.assert_close(head.predictor(model)(h), full[:, head.vocab])
    head.save(tmp_path)
    back = EarlyHead.load(tmp_path, model)
    assert torch.equal(back.vocab, head.vocab)
    opts = prune_options(model, ProPDConfig(compile=True, prune=True, prune_head=str(tmp_path)))
    assert torch.equal(get_predictor(opts["predictor"]).vocab, head.vocab)


def test_prune_options_resolve_head_layer_and_topk(model, tmp_path):
    propd_compile.accelerate(model)  # the resolved predictor is kept in the model's state
    lens = prune_options(model, ProPDConfig(compile=True, prune=True, prune_head="lens", prune_layer=1, prune_topk=5))
    assert lens["layer"] == 1 and get_predictor(lens["predictor"]).topk == 5
    again = prune_options(model, ProPDConfig(compile=True, prune=True, prune_head="lens", prune_layer=1, prune_topk=9))
    assert again == lens and get_predictor(lens["predictor"]).topk == 9  # k changes, the graph key does not
    EarlyHead.for_model(model, 2).save(tmp_path)
    assert prune_options(model, ProPDConfig(compile=True, prune=True, prune_head=str(tmp_path)))["layer"] == 2
    with pytest.raises(ValueError, match="reads layer 2"):
        prune_options(model, ProPDConfig(compile=True, prune=True, prune_head=str(tmp_path), prune_layer=1))


def test_config_validation():
    with pytest.raises(ValueError, match="compile=True"):
        ProPDConfig(prune=True)
    with pytest.raises(ValueError, match="prune_topk"):
        ProPDConfig(compile=True, prune=True, prune_topk=0)
    assert not ProPDConfig().prune
