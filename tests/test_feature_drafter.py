"""The feature drafter: drafting equals the trained unroll, tree expansion invariants, batching,
persistence and refusals, and lossless decoding (greedy against HF, sampling by chi-square)."""
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import LogitsProcessorList

import propd_compile
from models_tiny import EOS, PAD, VOCAB, hf_greedy, left_padded, tiny_model
from propd_compile import ProPDConfig
from propd_compile.decoding import tree_generate
from propd_compile.distill_data import teacher_forced
from propd_compile.drafters import FusedDrafter, NGramDrafter, build_drafter
from propd_compile.feature_drafter import (
    FeatureDraftModel, FeatureDrafter, drafter_config, load_drafter, save_drafter, tokenizer_identity,
)
from propd_compile.sampling import sampling_rule

ARCHS = ("llama", "qwen2", "mistral")
TAPS = (0, 1, 2)


def random_draft(model, seed=0, vocab=None, scale=0.3):
    torch.manual_seed(seed)
    vocab = torch.arange(6, VOCAB) if vocab is None else vocab
    draft = FeatureDraftModel(model, TAPS, vocab)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * scale)
    return draft.eval()


@pytest.fixture(scope="module")
def drafter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("drafters")
    out = {}
    for arch in ARCHS:
        for seed in range(2):
            model = tiny_model(arch, seed=seed)
            out[arch, seed] = save_drafter(random_draft(model, seed), root / f"{arch}-{seed}", drafter_config(model), torch.float32)
    return out


def _drafter_after(draft, model, seq, **kw):
    """A drafter that has verified seq[:-1] (features) and emitted seq[-1] (the root)."""
    feats, _ = teacher_forced(model, torch.tensor([seq]), TAPS)
    drafter = FeatureDrafter(draft, **kw)
    drafter.start([seq[:-1]])
    drafter.advance(0, [seq[-1]])
    drafter.set_features([0], [feats[0, : len(seq) - 1]])
    return drafter


# --- drafting is what training trains ------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_drafted_values_are_the_training_unroll_probabilities(arch):
    """Each tree node's value is its parent's times the unrolled training-time-test probability
    of its token (step j reads the drafted path as its tokens): drafting at decode time is the
    computation the trainer optimises, positions, masks and the draft KV included."""
    model = tiny_model(arch, seed=1)
    draft = random_draft(model, seed=1)
    seq = [7, 8, 9, 10, 11, 12, 13]
    drafter = _drafter_after(draft, model, seq, max_depth=3, topk=4, frontier=4, min_value=0.0)
    tree = drafter.propose(0, 40)
    assert len(tree) > 8 and max(tree.depths) == 3
    feats, _ = teacher_forced(model, torch.tensor([seq]), TAPS)
    vocab = draft.draft_vocab.tolist()
    t = len(seq) - 2  # the last verified position: its entry pairs feature t with the root
    for i in range(1, len(tree)):
        path = [tree.tokens[j] for j in tree.path(i)][1:]  # drafted tokens below the root
        tokens = torch.tensor([seq + path[:-1]])
        f = torch.cat([feats, torch.zeros(1, tokens.shape[1] - feats.shape[1], feats.shape[2])], 1)
        with torch.no_grad():
            logits = draft.unrolled(f, tokens, len(path))[len(path) - 1][0, t]
        p = logits.softmax(-1)[vocab.index(path[-1])]
        assert tree.scores[i] == pytest.approx(tree.scores[tree.parents[i]] * float(p), rel=1e-4, abs=1e-7)


def test_rows_draft_in_one_batch_as_they_would_alone():
    model = tiny_model("llama", seed=0)
    draft = random_draft(model)
    seqs = [[7, 8, 9, 10, 11], [20, 21], [30, 31, 32, 33, 34, 35, 36, 37]]
    alone = [_drafter_after(draft, model, s, max_depth=4, topk=3, frontier=3).propose(0, 20) for s in seqs]
    together = FeatureDrafter(draft, max_depth=4, topk=3, frontier=3)
    together.start([s[:-1] for s in seqs])
    feats = [teacher_forced(model, torch.tensor([s]), TAPS)[0][0, : len(s) - 1] for s in seqs]
    for b, s in enumerate(seqs):
        together.advance(b, [s[-1]])
    together.set_features([0, 1, 2], feats)
    for b, tree in enumerate(alone):
        got = together.propose(b, 20)
        assert got.tokens == tree.tokens and got.parents == tree.parents
        assert got.scores == pytest.approx(tree.scores, rel=1e-4, abs=1e-7)


@settings(deadline=None, max_examples=30)
@given(
    seed=st.integers(0, 3), budget=st.integers(1, 40), depth=st.integers(0, 6), topk=st.integers(1, 6),
    frontier=st.integers(1, 6), scale=st.sampled_from([0.05, 0.3, 1.0, 3.0]), min_value=st.sampled_from([0.0, 0.01, 0.2]),
)
def test_expanded_trees_are_ancestor_closed_within_budget_and_values_never_grow(seed, budget, depth, topk, frontier, scale, min_value):
    model = tiny_model("llama", seed=seed % 2)
    draft = random_draft(model, seed, scale=scale)
    drafter = _drafter_after(draft, model, [7, 8, 9, 10, 11], max_depth=depth, topk=topk, frontier=frontier, min_value=min_value)
    tree = drafter.propose(0, budget)  # TokenTree checks parents precede children, siblings distinct
    assert 1 <= len(tree) <= budget and tree.tokens[0] == 11
    assert max(tree.depths) <= depth
    vocab = set(draft.draft_vocab.tolist())
    for i in range(1, len(tree)):
        assert 0.0 <= tree.scores[i] <= tree.scores[tree.parents[i]]
        assert tree.tokens[i] in vocab
    children = [sum(1 for p in tree.parents if p == i) for i in range(len(tree))]
    assert max(children) <= topk
    smaller = drafter.propose(0, max(1, budget // 2))  # a smaller budget keeps the best nodes
    assert len(smaller) <= max(1, budget // 2)
    if len(smaller) > 1:
        assert min(smaller.scores[1:]) >= max([s for s in tree.scores[1:] if s not in smaller.scores[1:]], default=0.0) - 1e-9


def test_drafting_time_is_recorded_per_depth():
    model = tiny_model("llama")
    drafter = _drafter_after(random_draft(model), model, [7, 8, 9, 10], max_depth=4, min_value=0.0)
    drafter.propose(0, 30)
    assert len(drafter.seconds_per_depth) == 4 and all(s > 0 for s in drafter.seconds_per_depth)
    assert drafter.steps == 1 and drafter.seconds >= sum(drafter.seconds_per_depth[1:])


# --- persistence and refusals --------------------------------------------------------------------
def test_save_load_round_trip_and_refusals(tmp_path):
    from propd_compile import models as _  # noqa: F401  (keeps the import graph of the CLI)

    owner = tiny_model("llama", seed=0)
    owner.name_or_path = "org/tiny-llama-a"
    draft = random_draft(owner, vocab=torch.tensor([6, 9, 17, 30, 41]))
    save_drafter(draft, tmp_path, drafter_config(owner), torch.float32, accuracy={"acceptance": [0.5]})
    loaded, cfg = load_drafter(tmp_path, owner)
    assert torch.equal(loaded.draft_vocab, draft.draft_vocab) and cfg["taps"] == list(TAPS)
    f, tok = torch.randn(1, 5, 96), torch.randint(0, VOCAB, (1, 5))
    with torch.no_grad():
        assert torch.equal(loaded.unrolled(f, tok, 2)[1], draft.unrolled(f, tok, 2)[1])
    assert json.loads((tmp_path / "accuracy.json").read_text())["acceptance"] == [0.5]

    other = tiny_model("qwen2", seed=0)
    other.name_or_path = "org/tiny-qwen-b"
    with pytest.raises(ValueError, match=r"tiny-llama-a.*tiny-qwen-b.*train-drafter"):
        load_drafter(tmp_path, other)
    reweighted = tiny_model("llama", seed=1)
    reweighted.name_or_path = "org/tiny-llama-c"
    with pytest.raises(ValueError, match="different weights"):
        build_drafter(ProPDConfig(drafter=str(tmp_path), drafters=("feature",)), reweighted)

    class Tok:  # two tokenizers with different vocabularies
        def __init__(self, name, vocab):
            self.name_or_path, self._v = name, vocab

        def get_vocab(self):
            return self._v

    save_drafter(draft, tmp_path / "tok", drafter_config(owner, Tok("tok-a", {"a": 0, "b": 1})), torch.float32)
    with pytest.raises(ValueError, match=r"tok-a.*tok-b"):
        load_drafter(tmp_path / "tok", owner, Tok("tok-b", {"a": 0, "c": 1}))
    assert tokenizer_identity(Tok("x", {"a": 0}))["vocab_hash"] != tokenizer_identity(Tok("x", {"b": 0}))["vocab_hash"]

    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "draft_vocab_size": 7}))
    with pytest.raises(ValueError, match="draft vocabulary"):
        load_drafter(tmp_path, owner)
    (tmp_path / "drafter.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="unreadable.*train-drafter"):
        load_drafter(tmp_path, owner)
    with pytest.raises(FileNotFoundError, match="train-drafter"):
        load_drafter(tmp_path / "missing", owner)
    with pytest.raises(ValueError, match="train-drafter"):
        build_drafter(ProPDConfig(drafters=("feature", "ngram")), owner)  # none shipped for a tiny model


def test_models_without_llama_style_layers_are_refused_clearly():
    with pytest.raises(NotImplementedError, match="ngram"):
        FeatureDraftModel(tiny_model("gpt2"), TAPS, torch.arange(6, VOCAB))


def test_default_drafters_prefer_the_feature_drafter(drafter_dirs):
    model = tiny_model("llama", seed=0)
    fused = build_drafter(ProPDConfig(drafter=str(drafter_dirs["llama", 0])), model)
    assert isinstance(fused, FusedDrafter) and fused.feature_layers == TAPS
    assert [type(d) for d in fused.drafters] == [FeatureDrafter, NGramDrafter]
    assert isinstance(build_drafter(ProPDConfig(), model), NGramDrafter)  # no drafter, no heads: n-gram


# --- losslessness --------------------------------------------------------------------------------
@st.composite
def prompts(draw):
    B = draw(st.integers(1, 4))
    base = draw(st.lists(st.integers(6, VOCAB - 1), min_size=3, max_size=6))
    return [
        [base[i % len(base)] if draw(st.booleans()) else draw(st.integers(6, VOCAB - 1)) for i in range(draw(st.integers(1, 12)))]
        for _ in range(B)
    ]


@pytest.mark.parametrize("arch", ARCHS)
@settings(deadline=None, max_examples=15, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    rows=prompts(), fused=st.booleans(), budget=st.integers(1, 24), seed=st.integers(0, 1), new=st.integers(1, 24),
    depth=st.integers(1, 6), topk=st.integers(1, 8),
)
def test_feature_drafter_decoding_equals_hf_greedy(drafter_dirs, arch, rows, fused, budget, seed, new, depth, topk):
    model = tiny_model(arch, seed=seed)
    ids, mask = left_padded(rows)
    ref = hf_greedy(model, ids, mask, new)
    config = ProPDConfig(
        drafter=str(drafter_dirs[arch, seed]), drafters=("feature", "ngram") if fused else ("feature",),
        max_tree_nodes=budget, max_depth=depth, drafter_topk=topk,
    )
    drafter = build_drafter(config, model)
    out, stats = tree_generate(
        model, ids, mask, max_new_tokens=new, eos_token_ids=[EOS], pad_token_id=PAD, drafter=drafter, max_tree_nodes=budget,
    )
    assert torch.equal(out, ref), (out, ref)
    assert all(1 <= n <= budget for n in stats.tree_sizes)


@pytest.mark.parametrize("tree", ["dynamic", "fixed"])
def test_accelerate_with_the_feature_drafter_is_identical(drafter_dirs, tree):
    model = tiny_model("qwen2", seed=1)
    rows = [[7, 8, 9, 10, 7, 8], [11, 12], [20, 21, 22], [30]]
    ids, mask = left_padded(rows)
    ref = hf_greedy(model, ids, mask, 40)
    propd_compile.accelerate(model, ProPDConfig(drafter=str(drafter_dirs["qwen2", 1]), max_tree_nodes=12, tree=tree))
    try:
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False), ref)
    finally:
        propd_compile.restore(model)


def test_compiled_decoding_with_the_feature_drafter_is_lossless(drafter_dirs):
    """The compiled verification forward also returns the tapped features, without recompiling."""
    from torch._dynamo.utils import counters

    from propd_compile.runtime_compile import warm_up

    torch._dynamo.reset()
    model = tiny_model("llama", seed=1)
    config = ProPDConfig(compile=True, drafter=str(drafter_dirs["llama", 1]), max_tree_nodes=10)
    propd_compile.accelerate(model, config)
    warm_up(model, config)
    before = counters["stats"]["unique_graphs"]
    for rows, new in (([[7, 8, 9, 7, 8]], 20), ([[11, 12], [20, 21, 22, 23]], 25)):
        ids, mask = left_padded(rows)
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=new), hf_greedy(model, ids, mask, new))
    assert counters["stats"]["unique_graphs"] == before, "decoding recompiled after warm-up"


@pytest.mark.parametrize("warp", ["t1", "t0.7"])
def test_sampling_through_the_feature_drafter_draws_the_models_distribution(warp):
    from test_sampling import PROMPT, V, WARPERS, _chi_square_p_value, _exact_joint, _peaky_model

    model = _peaky_model()
    drafter = FeatureDrafter(random_draft(model, vocab=torch.arange(V), scale=0.05), max_depth=3, topk=V, frontier=4)
    n = 3000
    ids = torch.tensor([PROMPT] * n)
    rule = sampling_rule(LogitsProcessorList(WARPERS[warp]), torch.Generator().manual_seed(2))
    out, stats = tree_generate(
        model, ids, torch.ones_like(ids), max_new_tokens=3, eos_token_ids=[], pad_token_id=PAD,
        drafter=drafter, max_tree_nodes=12, accept=rule,
    )
    assert stats.mean_accepted > 1.2  # the drafts were used
    assert _chi_square_p_value(out[:, len(PROMPT):], _exact_joint(model, WARPERS[warp])) > 1e-3


@pytest.mark.real_model
def test_shipped_drafter_is_the_default_for_the_embedded_model_and_lossless():
    from propd_compile import models
    from propd_compile.feature_drafter import SHIPPED_DIR, shipped_drafter_for
    from propd_compile.prompts import chat_prompt, mt_bench_sample

    model, tok = models.load()
    if shipped_drafter_for(model) is None:
        pytest.skip(f"no drafter shipped in {SHIPPED_DIR}")
    load_drafter(shipped_drafter_for(model), model, tok)  # trained with this tokenizer
    default = build_drafter(ProPDConfig(), model)
    assert isinstance(default, FusedDrafter) and isinstance(default.drafters[0], FeatureDrafter)
    assert not any(d.needs_hidden for d in default.drafters)  # the Medusa heads stay out of the default
    heads = build_drafter(ProPDConfig(drafters=("heads", "ngram")), model)
    assert heads.needs_hidden and not heads.feature_layers  # still available as the baseline
    texts = [chat_prompt(tok, q.turns[0]) for q in mt_bench_sample(1)[:3]]
    for batch in (texts[:1], texts[1:]):
        enc = tok(batch, return_tensors="pt", padding=True)
        ref = hf_greedy(model, enc.input_ids, enc.attention_mask, 40)
        propd_compile.accelerate(model, ProPDConfig())
        try:
            out = model.generate(**enc, max_new_tokens=40)
            assert model.propd.stats.mean_accepted > 1.5
        finally:
            propd_compile.restore(model)
        assert torch.equal(out, ref), tok.batch_decode(torch.cat([out, ref])[:, enc.input_ids.shape[1]:])
