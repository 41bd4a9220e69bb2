"""The feature-drafter trainer: data, resume, what training teaches, and the shipped drafter."""
import json

import pytest
import torch

from models_tiny import EOS, PAD, hf_greedy, left_padded, tiny_model
from propd_compile import ProPDConfig
from propd_compile.decoding import tree_generate
from propd_compile.distill_data import default_taps, fixed_text_sequences
from propd_compile.drafters import build_drafter
from propd_compile.feature_drafter import FeatureDraftModel, load_drafter
from propd_compile.train_drafter import (
    DrafterSettings, _batch, bf16_autocast_available, evaluate, train_drafter, unrolled_loss,
)


def _greedy_sequences(model, n=12, new=24):
    """The tiny model's own greedy answers to short prompts: (prompt + answer, answer start)."""
    out = []
    for i in range(n):
        prompt = [7 + i % 20, 8 + (3 * i) % 20, 9 + (5 * i) % 20]
        ids, mask = left_padded([prompt])
        seq = hf_greedy(model, ids, mask, new, eos_token_id=None)[0].tolist()
        out.append((seq, len(prompt)))
    return out


def _settings(**kw):
    base = dict(draft_vocab=40, ttt_steps=3, epochs=2, batch_seqs=3, lr=3e-3, checkpoint_every=2, save_dtype="float32")
    return DrafterSettings(**{**base, **kw})


def test_default_taps_are_distinct_low_middle_high():
    assert default_taps(30) == (2, 15, 27)
    for layers in (1, 2, 3, 4, 8):
        taps = default_taps(layers)
        assert len(taps) == 3 and all(0 <= t < layers for t in taps) and list(taps) == sorted(taps)


def test_training_resumes_where_it_stopped(tmp_path, monkeypatch):
    """A run interrupted mid-training and rerun ends with the same weights as an uninterrupted
    run; the cached features are not recomputed."""
    model = tiny_model("llama", seed=0)
    seqs = _greedy_sequences(model)
    train_drafter(model, tmp_path / "straight", settings=_settings(), sequences=seqs)

    calls = {"n": 0}
    clip = torch.nn.utils.clip_grad_norm_

    def interrupt(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return clip(*a, **kw)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train_drafter(model, tmp_path / "resumed", settings=_settings(), sequences=seqs)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    shards = sorted((tmp_path / "resumed" / "work" / "given").glob("*.pt"))
    mtimes = [p.stat().st_mtime_ns for p in shards]
    report = train_drafter(model, tmp_path / "resumed", settings=_settings(), sequences=seqs)
    assert [p.stat().st_mtime_ns for p in shards] == mtimes
    a, _ = load_drafter(tmp_path / "straight", model)
    b, _ = load_drafter(tmp_path / "resumed", model)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert report["training"]["optimizer_steps"] == len(report["training"]["history"]) * 2
    acc = json.loads((tmp_path / "resumed" / "accuracy.json").read_text())
    assert len(acc["held_out"]["acceptance"]) == 3 and acc["draft_vocab"]["size"] == 40
    with pytest.raises(ValueError, match="other settings"):
        train_drafter(model, tmp_path / "resumed", settings=_settings(seq_len=128), sequences=seqs)


def test_training_teaches_the_drafter_the_greedy_chain(tmp_path):
    """On the model's own greedy answers the trained drafter's chain acceptance beats a fresh
    drafter's, and the trained drafter decodes losslessly."""
    model = tiny_model("llama", seed=1)
    seqs = _greedy_sequences(model, n=10, new=28)
    report = train_drafter(model, tmp_path, settings=_settings(epochs=25, batch_seqs=4), sequences=seqs)
    from propd_compile.distill_data import load_shards

    data = load_shards([tmp_path / "work" / "given"])
    fresh = evaluate(FeatureDraftModel(model, default_taps(2), load_drafter(tmp_path, model)[0].draft_vocab), data, 3)
    trained = evaluate(load_drafter(tmp_path, model)[0], data, 3)
    history = report["training"]["history"]
    assert history[-1]["loss_per_step"][0] < history[0]["loss_per_step"][0]
    assert trained["chain_tau"] > fresh["chain_tau"] + 0.3 and trained["acceptance"][0] > 0.3
    ids, mask = left_padded([s[:3] for s, _ in seqs[:3]])
    config = ProPDConfig(drafter=str(tmp_path), drafters=("feature",), max_tree_nodes=12)
    out, stats = tree_generate(
        model, ids, mask, max_new_tokens=24, eos_token_ids=[EOS], pad_token_id=PAD,
        drafter=build_drafter(config, model), max_tree_nodes=12,
    )
    assert torch.equal(out, hf_greedy(model, ids, mask, 24)) and stats.mean_accepted > 1.2


def test_mixed_precision_loss_tracks_fp32_and_trains_every_weight(tmp_path):
    """bf16 autocast changes the draft forward's rounding only: the unrolled loss stays within
    bf16 error of the fp32 loss, and every drafter weight still gets a finite gradient."""
    if not bf16_autocast_available(torch.device("cpu")):
        pytest.skip("no fast bf16 on this CPU: the trainer runs fp32 here")
    from propd_compile.distill_data import feature_shards, load_shards

    model = tiny_model("llama", seed=2)
    seqs = _greedy_sequences(model, n=4)
    feature_shards(model, [s for s, _ in seqs], [st for _, st in seqs], default_taps(2), tmp_path)
    batch = _batch(load_shards([tmp_path]), torch.device("cpu"))
    draft = FeatureDraftModel(model, default_taps(2), torch.arange(40))
    with torch.no_grad():  # away from the identity init, so every weight matters
        for p in draft.parameters():
            p.add_(0.05 * torch.randn_like(p))
    full, full_steps = unrolled_loss(draft, model, batch, 3, 0.8, mixed_precision=False)
    half, half_steps = unrolled_loss(draft, model, batch, 3, 0.8, mixed_precision=True)
    assert half.dtype == torch.float32
    assert abs(float(half.detach()) - float(full.detach())) < 0.02 * float(full.detach()), (full_steps, half_steps)
    half.backward()
    for name, p in draft.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.real_model
def test_fixed_text_is_chunked_into_chat_answers_and_benchmark_text_is_dropped():
    from propd_compile import models
    from propd_compile.train_heads import BenchmarkFilter

    _, tok = models.load()
    close = "Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural experiences."
    texts = ["Lists are mutable sequences, typically used to store collections of homogeneous items. " * 20, close * 3]
    seqs, starts, stats = fixed_text_sequences(tok, 10_000, 96, BenchmarkFilter([close]), texts=texts)
    assert stats["dropped_close_to_benchmark"] >= 1 and all(len(s) <= 96 for s in seqs) and seqs
    assert all(0 < st < len(s) for s, st in zip(seqs, starts))
    assert not any("Hawaii" in tok.decode(s[st:]) for s, st in zip(seqs, starts))
    assert "Lists are mutable" in tok.decode(seqs[0][starts[0]:])
