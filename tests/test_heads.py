"""Medusa draft heads: persistence, identity checks, trees, the trainer, and losslessness."""
import itertools
import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import propd_compile
from models_tiny import ARCHS, EOS, PAD, VOCAB, hf_greedy, left_padded, tiny_model
from propd_compile import ProPDConfig
from propd_compile.decoding import tree_generate
from propd_compile.drafters import FusedDrafter, HeadsDrafter, build_drafter
from propd_compile.heads import MedusaHeads, rank_paths
from propd_compile.train_heads import BenchmarkFilter, TrainSettings, clean_prompt, dedupe, train_heads
from propd_compile.tree import TokenTree

RANK_ACC = [[0.6, 0.2, 0.1, 0.05], [0.4, 0.2, 0.1], [0.3, 0.1], [0.2, 0.1]]


def random_heads(model, num_heads=4, seed=0, scale=0.5, root_token=False):
    torch.manual_seed(seed)
    heads = MedusaHeads.for_model(model, num_heads, root_token=root_token)
    for blk in heads.blocks:
        for p in blk.parameters():
            torch.nn.init.normal_(p, std=scale)
    return heads


@pytest.fixture(scope="module")
def heads_dirs(tmp_path_factory):
    """Saved heads (random and fresh) with calibrated accuracies, per architecture and seed."""
    root = tmp_path_factory.mktemp("heads")
    out = {}
    for arch in ARCHS:
        for seed in range(2):
            model = tiny_model(arch, seed=seed)
            for kind in ("random", "fresh", "root"):
                heads = (
                    random_heads(model, seed=seed, root_token=kind == "root") if kind != "fresh"
                    else MedusaHeads.for_model(model, 4)
                )
                out[arch, seed, kind] = heads.save(root / f"{arch}-{seed}-{kind}", accuracy={"rank_accuracy": RANK_ACC})
    return out


# --- the heads module -------------------------------------------------------------------------
def test_fresh_heads_repeat_the_base_next_token_prediction():
    model = tiny_model("llama")
    heads = MedusaHeads.for_model(model, 3)
    h = torch.randn(5, 32)
    out = heads(h, model.get_output_embeddings())
    assert out.shape == (5, 3, VOCAB)
    base = model.get_output_embeddings()(h)
    for k in range(3):  # equal up to the GEMM's summation order, which depends on shape and threads
        torch.testing.assert_close(out[:, k], base, rtol=1e-6, atol=1e-6)
        assert torch.equal(out[:, k].argmax(-1), base.argmax(-1))


def test_fresh_root_token_heads_repeat_the_base_prediction_and_read_the_root():
    model = tiny_model("llama")
    heads = MedusaHeads.for_model(model, 2, root_token=True)
    h, lm, emb = torch.randn(5, 32), model.get_output_embeddings(), model.get_input_embeddings()
    e = emb(torch.tensor([3, 4, 5, 6, 7]))
    assert torch.equal(heads(h, lm, root=e)[:, 1], lm(h))
    with pytest.raises(ValueError, match="root"):
        heads(h, lm)
    trained = random_heads(model, 2, root_token=True)
    assert not torch.allclose(trained(h, lm, root=e), trained(h, lm, root=emb(torch.tensor([8, 9, 10, 11, 12]))))


@pytest.mark.parametrize("root_token", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_save_load_round_trip(tmp_path, dtype, root_token):
    model = tiny_model("qwen2")
    heads = random_heads(model, 3, root_token=root_token)
    heads.save(tmp_path, dtype=dtype, accuracy={"rank_accuracy": RANK_ACC[:3], "top1": [0.5, 0.4, 0.3]})
    loaded = MedusaHeads.load(tmp_path, model)
    expected = heads
    if dtype != torch.float32:  # the stored weights are rounded; the loaded heads compute in fp32
        expected = MedusaHeads.for_model(model, 3, root_token=root_token)
        expected.load_state_dict({k: v.to(dtype).float() for k, v in heads.state_dict().items()})
    h = torch.randn(7, 32)
    e = model.get_input_embeddings()(torch.arange(7)) if root_token else None
    lm = model.get_output_embeddings()
    assert loaded.root_token == root_token
    assert torch.equal(loaded(h, lm, root=e), expected(h, lm, root=e))
    assert loaded.accuracy["top1"] == [0.5, 0.4, 0.3]
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["num_heads"] == 3 and cfg["hidden_size"] == 32 and cfg["vocab_size"] == VOCAB
    assert {"name", "config_hash", "architecture", "probe"} <= set(cfg["base_model"])


def test_draft_vocabulary_restricts_the_drafts_and_round_trips(tmp_path):
    model = tiny_model("llama")
    heads = random_heads(model, 2, root_token=True)
    vocab = torch.tensor([5, 9, 17, 30, 41])
    heads.draft_vocab = vocab
    heads.save(tmp_path, dtype=torch.float16)
    loaded = MedusaHeads.load(tmp_path, model)
    assert torch.equal(loaded.draft_vocab, vocab)
    h, lm, emb = torch.randn(3, 32), model.get_output_embeddings(), model.get_input_embeddings()
    e = emb(torch.tensor([1, 2, 3]))
    logits, ids = loaded.draft_logits(h, lm, root=e)
    assert torch.equal(ids, vocab)
    assert torch.allclose(logits, loaded(h, lm, root=e)[..., vocab], atol=1e-5)  # the same logits, fewer columns
    drafter = HeadsDrafter(loaded, lm, max_depth=2, topk=3, embed=emb)
    drafter.start([[4, 5, 6]])
    drafter.set_hidden([0], h[:1])
    tree = drafter.propose(0, 10)
    assert len(tree) == 10 and set(tree.tokens[1:]) <= set(vocab.tolist())


@pytest.mark.parametrize("root_token", [True, False])
def test_packed_draft_logits_follow_the_heads_and_decode_losslessly(root_token):
    from propd_compile.kernels.block_linear import available

    if not available():
        pytest.skip("the block-format kernel cannot be built on this machine")
    model = tiny_model("llama", seed=2)
    heads = random_heads(model, 3, root_token=root_token)
    heads.draft_vocab = torch.arange(6, VOCAB, 2)[:27]  # 27 rows: the packed LM-head rows are padded to whole tiles
    lm, emb = model.get_output_embeddings(), model.get_input_embeddings()
    h, e = torch.randn(5, 32), emb(torch.tensor([1, 2, 3, 4, 5]))

    def close(a, b):  # Q8_0 rounds each weight to 1/254 of its block's largest magnitude
        return torch.allclose(a, b, rtol=0.0, atol=0.03 * float(b.abs().max()))

    with torch.no_grad():
        fp32, ids = heads.draft_logits(h, lm, root=e)
        packed, packed_ids = heads.draft_logits(h, lm, root=e, packed=True)
        assert heads._draft_weight[4], "the packed path did not run"
        assert torch.equal(ids, packed_ids) and packed.shape == fp32.shape and close(packed, fp32)
        assert not torch.equal(packed, fp32)
        fewer, _ = heads.draft_logits(h, lm, num_heads=2, root=e, packed=True)  # the drafter's useful depth
        assert torch.allclose(fewer, packed[:, :2], atol=1e-5)
        heads.blocks[1].linear.weight.mul_(3.0)  # the heads change: the packed copies follow
        fp32_new, _ = heads.draft_logits(h, lm, root=e)
        packed_new, _ = heads.draft_logits(h, lm, root=e, packed=True)
        assert close(packed_new, fp32_new) and not close(packed_new, packed)
    rows = [[7, 8, 9, 10, 7, 8], [11, 12], [20, 21, 22, 23]]
    ids, mask = left_padded(rows)
    drafter = HeadsDrafter(heads, lm, max_depth=3, topk=4, embed=emb)
    out, _ = tree_generate(model, ids, mask, max_new_tokens=24, eos_token_ids=[EOS], pad_token_id=PAD, drafter=drafter, max_tree_nodes=10)
    assert torch.equal(out, hf_greedy(model, ids, mask, 24))


def test_own_projection_round_trip(tmp_path):
    model = tiny_model("llama")
    heads = MedusaHeads.for_model(model, 2, own_projection=True)
    h = torch.randn(3, 32)
    assert torch.allclose(heads(h)[:, 1], model.get_output_embeddings()(h), atol=1e-6)
    heads.save(tmp_path, dtype=torch.float32)
    assert torch.equal(MedusaHeads.load(tmp_path, model)(h), heads(h))


def test_heads_for_another_model_are_rejected(tmp_path):
    owner = tiny_model("llama", seed=0)
    owner.name_or_path = "org/tiny-llama-a"
    MedusaHeads.for_model(owner, 2).save(tmp_path)
    other_arch = tiny_model("qwen2", seed=0)
    other_arch.name_or_path = "org/tiny-qwen-b"
    with pytest.raises(ValueError, match=r"tiny-llama-a.*tiny-qwen-b") as e:
        MedusaHeads.load(tmp_path, other_arch)
    assert "config hash" in str(e.value)
    other_weights = tiny_model("llama", seed=1)
    other_weights.name_or_path = "org/tiny-llama-c"
    with pytest.raises(ValueError, match=r"tiny-llama-a.*tiny-llama-c.*different weights"):
        build_drafter(ProPDConfig(heads=str(tmp_path)), other_weights)
    MedusaHeads.load(tmp_path, owner)  # the right model is fine


def test_missing_heads_are_explained(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(FileNotFoundError, match="train-heads"):
        build_drafter(ProPDConfig(heads=str(tmp_path)), model)
    with pytest.raises(ValueError, match="train-heads"):
        build_drafter(ProPDConfig(drafters=("heads",)), model)
    with pytest.raises(ValueError, match="train-heads"):
        build_drafter(ProPDConfig(tree="medusa"), model)
    assert type(build_drafter(ProPDConfig(), model)).__name__ == "NGramDrafter"  # no heads: n-gram


def test_medusa_tree_needs_calibrated_accuracies(tmp_path):
    model = tiny_model("llama")
    MedusaHeads.for_model(model, 2).save(tmp_path)
    with pytest.raises(ValueError, match="accuracy"):
        build_drafter(ProPDConfig(heads=str(tmp_path), tree="medusa"), model)


# --- trees ---------------------------------------------------------------------------------------
prob_tables = st.integers(1, 4).flatmap(
    lambda depth: st.lists(
        st.lists(st.floats(0.0, 1.0), min_size=1, max_size=6),  # any order: calibrated rank accuracies need not fall
        min_size=depth, max_size=depth,
    )
)


@settings(deadline=None, max_examples=200)
@given(table=prob_tables, budget=st.integers(1, 40))
def test_heads_tree_is_ancestor_closed_within_budget_and_best(table, budget):
    tokens = [[100 * d + r for r in range(len(row))] for d, row in enumerate(table)]
    paths = rank_paths(table, budget)
    tree = TokenTree.from_rank_paths(7, paths, tokens)  # validates parents precede children
    assert len(tree) <= budget
    for i in range(1, len(tree)):
        assert tree.scores[i] <= tree.scores[tree.parents[i]]
        d = tree.depths[i]
        assert tree.tokens[i] // 100 == d - 1  # depth d holds head d-1's candidates
    # the kept nodes are the best ones: nothing left out scores above the worst kept node
    everything = [
        math.prod(table[d][r] for d, r in enumerate(p))
        for n in range(1, len(table) + 1)
        for p in itertools.product(*[range(len(row)) for row in table[:n]])
    ]
    if len(tree) < budget:
        assert len(tree) - 1 == len(everything)
    elif budget > 1:
        worst = min(tree.scores[1:])
        assert sorted(everything, reverse=True)[budget - 2] == pytest.approx(worst, abs=1e-12)


@settings(deadline=None, max_examples=100)
@given(
    paths=st.lists(
        st.tuples(st.lists(st.integers(0, 4), min_size=1, max_size=4), st.floats(0.0, 1.0)), min_size=0, max_size=8
    ),
    split=st.integers(0, 8),
    budget=st.integers(1, 20),
)
def test_merged_tree_is_ancestor_closed_within_budget(paths, split, budget):
    total = sum(s for _, s in paths) or 1.0
    a = TokenTree.from_paths(3, [(p, s / total) for p, s in paths[:split]], 30)
    b = TokenTree.from_paths(3, [(p, s / total) for p, s in paths[split:]], 30)
    merged = TokenTree.merge([a, b], budget)
    assert len(merged) <= budget
    for i in range(1, len(merged)):
        assert merged.scores[i] <= merged.scores[merged.parents[i]] + 1e-12
    # every kept path was drafted by one of the sources
    sources = {tuple(t.tokens[j] for j in t.path(i)) for t in (a, b) for i in range(len(t))}
    for i in range(len(merged)):
        assert tuple(merged.tokens[j] for j in merged.path(i)) in sources


def test_merge_combines_scores_of_shared_paths():
    a = TokenTree((1, 2, 3), (-1, 0, 1), (1.0, 0.5, 0.5))
    b = TokenTree((1, 2, 4), (-1, 0, 1), (1.0, 0.5, 0.2))
    m = TokenTree.merge([a, b], 10)
    assert m.tokens == (1, 2, 3, 4) and m.parents == (-1, 0, 1, 1)
    assert m.scores[1] == pytest.approx(0.75) and m.scores[2] == pytest.approx(0.5)


def test_heads_drafter_proposes_head_top_k_per_depth():
    model = tiny_model("llama")
    heads = random_heads(model, 3)
    drafter = HeadsDrafter(heads, model.get_output_embeddings(), max_depth=6, topk=4)
    drafter.start([[9, 10, 11]])
    assert drafter.propose(0, 8) == TokenTree.root_only(11)  # no hidden state yet
    h = torch.randn(1, 32)
    drafter.set_hidden([0], h)
    tree = drafter.propose(0, 12)
    with torch.no_grad():
        top = heads(h, model.get_output_embeddings())[0].softmax(-1).topk(4)
    assert len(tree) == 12 and tree.tokens[0] == 11
    for i in range(1, len(tree)):
        d = tree.depths[i]
        assert tree.tokens[i] in top.indices[d - 1].tolist()
        parent = tree.parents[i]
        rank = top.indices[d - 1].tolist().index(tree.tokens[i])
        assert tree.scores[i] == pytest.approx(tree.scores[parent] * float(top.values[d - 1, rank]), rel=1e-5)
    drafter.advance(0, [12])
    assert drafter.propose(0, 8) == TokenTree.root_only(12)  # stale until the next hidden state


# --- losslessness --------------------------------------------------------------------------------
@st.composite
def prompts(draw):
    B = draw(st.integers(1, 3))
    base = draw(st.lists(st.integers(6, VOCAB - 1), min_size=3, max_size=6))
    rows = []
    for _ in range(B):
        n = draw(st.integers(1, 12))
        rows.append([base[i % len(base)] if draw(st.booleans()) else draw(st.integers(6, VOCAB - 1)) for i in range(n)])
    return rows


CONFIGS = {
    "heads": lambda d, budget: ProPDConfig(heads=d, drafters=("heads",), max_tree_nodes=budget),
    "heads+ngram": lambda d, budget: ProPDConfig(heads=d, drafters=("heads", "ngram"), max_tree_nodes=budget),
    "default": lambda d, budget: ProPDConfig(heads=d, max_tree_nodes=budget),
    "medusa": lambda d, budget: ProPDConfig(heads=d, tree="medusa", max_tree_nodes=budget),
    "shallow": lambda d, budget: ProPDConfig(heads=d, drafters=("heads", "ngram"), max_tree_nodes=budget, max_depth=2),
}


@pytest.mark.parametrize("arch", ARCHS)
@settings(deadline=None, max_examples=20, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    rows=prompts(), mode=st.sampled_from(sorted(CONFIGS)), kind=st.sampled_from(["random", "fresh", "root"]),
    budget=st.integers(1, 24), seed=st.integers(0, 1), new=st.integers(1, 24),
)
def test_heads_decoding_equals_hf_greedy(heads_dirs, arch, rows, mode, kind, budget, seed, new):
    model = tiny_model(arch, seed=seed)
    ids, mask = left_padded(rows)
    ref = hf_greedy(model, ids, mask, new)
    config = CONFIGS[mode](str(heads_dirs[arch, seed, kind]), budget)
    drafter = build_drafter(config, model)
    if budget > 1:  # a one-node budget is plain decoding: nothing is drafted
        assert drafter.needs_hidden
        assert isinstance(drafter, FusedDrafter) == (mode in ("heads+ngram", "default", "shallow"))
    out, stats = tree_generate(
        model, ids, mask, max_new_tokens=new, eos_token_ids=[EOS], pad_token_id=PAD, drafter=drafter,
        max_tree_nodes=budget,
    )
    assert torch.equal(out, ref), (out, ref)
    assert all(1 <= n <= budget for n in stats.tree_sizes)
    if mode == "medusa":
        assert all(n == min(budget, 1 + len(rank_paths(RANK_ACC, budget))) for n in stats.tree_sizes)


def test_accelerate_with_heads_is_identical_and_accepts_more(heads_dirs):
    model = tiny_model("llama", seed=0)
    rows = [[7, 8, 9, 10, 7, 8], [11, 12], [20, 21, 22]]
    ids, mask = left_padded(rows)
    ref = hf_greedy(model, ids, mask, 40)
    # a fixed tree: the heads draft every step (a dynamic one may rightly find drafting on a
    # model this small not worth its time: test_planner covers that)
    propd_compile.accelerate(model, ProPDConfig(heads=str(heads_dirs["llama", 0, "fresh"]), tree="fixed", max_tree_nodes=12))
    try:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False)
        assert torch.equal(out, ref)
        assert model.propd.stats.mean_accepted > 1.0
    finally:
        propd_compile.restore(model)


# --- the trainer ---------------------------------------------------------------------------------
def _tiny_settings(**kw):
    base = dict(
        num_heads=2, num_prompts=4, answer_tokens=16, gen_batch_size=2, epochs=2, batch_size=8, lr=3e-2, ranks=6,
        save_dtype="float32",
    )
    base.update(kw)
    return TrainSettings(**base)


def test_trainer_end_to_end_and_resume(tmp_path):
    model = tiny_model("llama", seed=0)
    prompt_ids = [[7, 8, 9, 10], [11, 12, 13], [20, 21, 22, 23, 24], [30, 31]]
    report = train_heads(model, tmp_path, settings=_tiny_settings(), prompt_ids=prompt_ids)
    for f in ("heads.safetensors", "config.json", "accuracy.json"):
        assert (tmp_path / f).exists()
    acc = json.loads((tmp_path / "accuracy.json").read_text())
    assert len(acc["rank_accuracy"]) == 2 and len(acc["rank_accuracy"][0]) == 6
    assert len(acc["top1"]) == len(acc["top5"]) == 2
    assert all(0 <= a <= b <= 1 for a, b in zip(acc["top1"], acc["top5"]))
    assert [h["epoch"] for h in acc["history"]] == [1, 2]
    assert acc["held_out_examples"] == 1 and acc["held_out_positions"] > 0
    heads = MedusaHeads.load(tmp_path, model)
    assert heads.num_heads == 2 and heads.accuracy["rank_accuracy"] == acc["rank_accuracy"]

    # resume: cached answers are reused, training continues from the last finished epoch
    shards = sorted((tmp_path / "work" / "answers").glob("*.pt"))
    mtimes = [p.stat().st_mtime_ns for p in shards]
    report2 = train_heads(model, tmp_path, settings=_tiny_settings(epochs=3), prompt_ids=prompt_ids)
    assert [p.stat().st_mtime_ns for p in shards] == mtimes
    assert [h["epoch"] for h in report2["history"]] == [1, 2, 3]
    assert report2["history"][:2] == report["history"]
    with pytest.raises(ValueError, match="other settings"):
        train_heads(model, tmp_path, settings=_tiny_settings(answer_tokens=8), prompt_ids=prompt_ids)

    # the trained heads decode losslessly, also as the static Medusa tree
    ids, mask = left_padded(prompt_ids)
    ref = hf_greedy(model, ids, mask, 20)
    for config in (ProPDConfig(heads=str(tmp_path)), ProPDConfig(heads=str(tmp_path), tree="medusa", max_tree_nodes=6)):
        out, _ = tree_generate(
            model, ids, mask, max_new_tokens=20, eos_token_ids=[EOS], pad_token_id=PAD,
            drafter=build_drafter(config, model), max_tree_nodes=config.max_tree_nodes,
        )
        assert torch.equal(out, ref)


def test_training_teaches_the_heads_the_greedy_continuation(tmp_path):
    """On the data it was trained on, head 0 beats the untrained head (the base next token)."""
    model = tiny_model("llama", seed=1)
    prompt_ids = [[7 + i, 8 + i, 9 + i] for i in range(6)]
    report = train_heads(
        model, tmp_path, settings=_tiny_settings(num_prompts=6, epochs=30, holdout=0.0, answer_tokens=24, batch_size=16),
        prompt_ids=prompt_ids,
    )
    fresh = report["history"][0]["top1"][0]
    assert report["top1"][0] >= fresh and report["top1"][0] > 0.5


def test_prompt_cleaning_dedupe_and_benchmark_filter():
    assert clean_prompt('Question: "How do I keep basil alive indoors?"\nMore text') == "How do I keep basil alive indoors?"
    assert clean_prompt("ok?") is None and clean_prompt("") is None
    texts = ["How do tides work?", "how do tides work", "How do tides really work?", "Why do tides change every day?"]
    assert dedupe(texts) == ["How do tides work?", "Why do tides change every day?"]
    f = BenchmarkFilter(["Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural experiences."])
    assert f.close("Write an engaging travel blog post about a recent trip to Hawaii.")
    assert not f.close("How often should I water a cactus in winter?")


@pytest.mark.real_model
def test_mt_bench_turns_are_filtered():
    f = BenchmarkFilter.mt_bench()
    from propd_compile.prompts import mt_bench

    assert all(f.close(turn) for q in mt_bench() for turn in q.turns)
    assert not f.close("What is a good way to store fresh ginger so that it lasts for weeks?")


@pytest.mark.real_model
def test_trainer_writes_its_own_prompts(tmp_path):
    """The self-prompting path with the real tokenizer and chat template, on a tiny random model."""
    from propd_compile import models

    _, tok = models.load()
    model = tiny_model("llama", vocab=len(tok))
    model.generation_config.eos_token_id = tok.eos_token_id
    report = train_heads(
        model, tmp_path, tokenizer=tok,
        settings=_tiny_settings(num_prompts=3, prompt_tokens=12, answer_tokens=8, gen_batch_size=4, epochs=1),
    )
    prompts = json.loads((tmp_path / "work" / "prompts.json").read_text())
    assert 1 <= len(prompts) <= 3 and report["prompts"]["count"] == len(prompts)
    assert (tmp_path / "heads.safetensors").exists()


def test_compiled_decoding_with_heads_is_lossless(heads_dirs, compiled_llama):
    """The compiled package also hands the hidden states to the heads (the same package: no build)."""
    from torch._dynamo.utils import counters

    model, _ = compiled_llama
    config = ProPDConfig(compile=True, heads=str(heads_dirs["llama", 1, "root"]), tree="fixed", max_tree_nodes=10)
    before = counters["propd"]["packages_built"]
    try:
        propd_compile.accelerate(model, config)
        assert model.propd.compiled(config, hidden=True)
        for rows, new in (([[7, 8, 9, 7, 8]], 20), ([[11, 12], [20, 21, 22, 23]], 25)):
            ids, mask = left_padded(rows)
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new)
            assert torch.equal(out, hf_greedy(model, ids, mask, new))
            assert model.propd.stats.mean_accepted > 1.0  # the heads drafted
    finally:
        propd_compile.accelerate(model, compiled_llama[1])
    assert counters["propd"]["packages_built"] == before


@pytest.mark.real_model
def test_shipped_heads_are_the_default_for_the_embedded_model():
    from propd_compile import models
    from propd_compile.heads import SHIPPED_DIR, shipped_heads_for
    from propd_compile.prompts import chat_prompt, mt_bench_sample

    model, tok = models.load()
    shipped = shipped_heads_for(model)
    if shipped is None:
        pytest.skip(f"no heads shipped in {SHIPPED_DIR}")
    assert isinstance(build_drafter(ProPDConfig(), model), FusedDrafter)
    assert isinstance(build_drafter(ProPDConfig(drafters=("ngram",)), model), type(build_drafter(ProPDConfig(tree="chain"), model)))
    texts = [chat_prompt(tok, q.turns[0]) for q in mt_bench_sample(1)[:2]]
    enc = tok(texts, return_tensors="pt", padding=True)
    ref = hf_greedy(model, enc.input_ids, enc.attention_mask, 32)
    for config in (ProPDConfig(), ProPDConfig(tree="medusa")):
        propd_compile.accelerate(model, config)
        try:
            out = model.generate(**enc, max_new_tokens=32)
        finally:
            propd_compile.restore(model)
        assert torch.equal(out, ref)
