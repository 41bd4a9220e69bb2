"""Early pruning (#5): the keep rule, the prune pass on captured graphs, and the compiled graph.

The compiled tests compile one tiny model once per configuration (dynamic=True, prune point after
layer 1 of 4, logit-lens predictor): the batch > 1 tree graph for the logits property, the batch-1
graphs for decoding. Hypothesis draws trees, batches and k for those compiles; k lives in the
predictor registry, so changing it never recompiles.
"""
from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.fx.experimental._config as fx_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

from models_tiny import VOCAB, hf_greedy, left_padded, tiny_model
from propd_compile import ProPDConfig, accelerate
from propd_compile.cache import TreeKVCache
from propd_compile.decoding import eager_forward
from propd_compile.early_head import logit_lens
from propd_compile.kernels.early_prune import get_predictor, prune_keep, register_predictor, tree_parents
from propd_compile.passes import run_passes
from propd_compile.passes.early_prune import early_prune_pass
from propd_compile.tree import TokenTree, TreeBatch

LAYERS, PRUNE_LAYER = 4, 1
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@st.composite
def trees(draw, max_nodes: int = 12) -> TokenTree:
    n = draw(st.integers(1, max_nodes))
    parents, tokens, used = [-1], [draw(st.integers(6, VOCAB - 1))], set()
    for i in range(1, n):
        p = draw(st.integers(0, i - 1))
        tok = draw(st.integers(6, VOCAB - 1).filter(lambda t, p=p: (p, t) not in used))
        used.add((p, tok))
        parents.append(p)
        tokens.append(tok)
    return TokenTree(tuple(tokens), tuple(parents), tuple([1.0] * n))


def reference_keep(batch: TreeBatch, logits: torch.Tensor, k: int) -> torch.Tensor:
    """Node by node, in tree order: the definition of the keep rule."""
    B, T = batch.tokens.shape
    keep = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        for c in range(T):
            p = int(batch.parents[b, c])
            if c == 0:
                keep[b, c] = True
            elif batch.valid[b, c] and p >= 0:
                top = logits[b, p].topk(min(k, logits.shape[-1])).indices
                keep[b, c] = bool(keep[b, p]) and int(batch.tokens[b, c]) in top.tolist()
    return keep


# ---- the keep rule -------------------------------------------------------------------------
@settings(max_examples=60, **SETTINGS)
@given(rows=st.lists(trees(), min_size=1, max_size=3), k=st.integers(1, VOCAB), seed=st.integers(0, 2**16))
def test_keep_rule_matches_definition_and_is_ancestor_closed(rows, k, seed):
    batch = TreeBatch.stack(rows)
    logits = torch.randn(*batch.tokens.shape, VOCAB, generator=torch.Generator().manual_seed(seed))
    keep = prune_keep(logits, batch.tokens, batch.ancestors, k)
    assert torch.equal(keep, reference_keep(batch, logits, k))
    # the op's form: logits only for the rows that have children
    needed = []
    lazy = prune_keep(lambda rows: needed.append(rows) or logits.reshape(-1, VOCAB)[rows], batch.tokens, batch.ancestors, k)
    assert torch.equal(lazy, keep)
    parents_rows = {b * batch.num_nodes + int(batch.parents[b, c]) for b, c in (batch.parents >= 0).nonzero().tolist()}
    assert set(needed[0].tolist()) == parents_rows
    assert torch.equal(tree_parents(batch.ancestors), batch.parents)
    # closed under descendants: a kept node's ancestors are all kept
    assert not (keep[:, :, None] & batch.ancestors & ~keep[:, None, :]).any()
    assert keep[:, 0].all() and not (keep & ~batch.valid).any()
    if k == VOCAB:
        assert torch.equal(keep, batch.valid)


@settings(max_examples=40, **SETTINGS)
@given(rows=st.lists(trees(), min_size=1, max_size=3), k=st.integers(1, 12), seed=st.integers(0, 2**16),
       size=st.integers(1, VOCAB))
def test_shortlist_keep_ranks_inside_the_shortlist_and_never_prunes_outside_it(rows, k, seed, size):
    batch = TreeBatch.stack(rows)
    g = torch.Generator().manual_seed(seed)
    vocab = torch.randperm(VOCAB, generator=g)[:size].sort().values
    full = torch.randn(*batch.tokens.shape, VOCAB, generator=g)
    keep = prune_keep(full[..., vocab], batch.tokens, batch.ancestors, k, vocab)
    expect = torch.zeros_like(keep)
    for b in range(batch.tokens.shape[0]):
        for c in range(batch.num_nodes):
            p, tok = int(batch.parents[b, c]), int(batch.tokens[b, c])
            if c == 0:
                expect[b, c] = True
            elif batch.valid[b, c] and p >= 0:
                inside = tok in vocab.tolist()
                rank = int((full[b, p, vocab] > full[b, p, tok]).sum())
                expect[b, c] = bool(expect[b, p]) and (not inside or rank < k)
    assert torch.equal(keep, expect)


# ---- the pass on captured graphs (no Inductor) ------------------------------------------------
def _capture(model, T: int, B: int = 2, layer: int = PRUNE_LAYER):
    """The tree-verification graph Dynamo hands the backend, and the run_passes reports on it
    (the rewritten graph then runs eagerly once)."""
    box = {}
    predictor = register_predictor(logit_lens(model), 4)

    def recorder(gm, example_inputs):
        box["gm"] = gm
        box["reports"] = run_passes(gm, {"prune": {"layer": layer, "predictor": predictor}})
        return gm.forward

    torch._dynamo.reset()
    f = torch.compile(eager_forward(model), backend=recorder, dynamic=True)
    cache, ids, mask, pos = _inputs(model, B, [TokenTree.root_only(7)] * B if T == 1 else None, T)
    with fx_config.patch(use_duck_shape=False), torch.no_grad():
        f(ids, mask, pos, cache)
    torch._dynamo.reset()
    return box["gm"], box["reports"]


def _inputs(model, B: int, rows: list[TokenTree] | None, T: int = 3, prefix: int = 6, seed: int = 0):
    rows = rows or [TokenTree(tuple(range(7, 7 + T)), tuple(range(-1, T - 1)), (1.0,) * T)] * B
    batch = TreeBatch.stack(rows)
    B, T = batch.tokens.shape
    cache = TreeKVCache.for_model(model, B, prefix + T + 2)
    g = torch.Generator().manual_seed(seed)
    for buf in (*cache.keys, *cache.values):
        buf.copy_(torch.randn(buf.shape, generator=g))
    cache.lengths = [prefix] * B
    visible = torch.rand(B, prefix, generator=g) > 0.2
    visible[:, -1] = True
    mask = torch.cat([visible[:, None, :].expand(B, T, prefix), batch.ancestors], 2)[:, None]
    cache.begin_step(mask)
    return cache, batch.tokens, mask, prefix + batch.depths


def test_pass_inserts_one_prune_point_and_gathers_rotary_and_mask():
    gm, reports = _capture(tiny_model("llama", layers=LAYERS), T=3)
    report = next(r for r in reports if r.name == "early_prune")
    assert report.rewritten > 0 and not report.skipped
    names = [getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes if n.op == "call_function"]
    assert names.count("prune_point") == 1
    assert names.count("gather_tokens") == 4  # residual stream, cos, sin, mask rows
    assert names.count("kv_scatter.default") == 2 * (LAYERS - PRUNE_LAYER - 1)
    assert names.count("scatter_tokens") == 1
    assert sum(n.target is torch.ops.propd.kv_write for n in gm.graph.nodes) == 2 * (PRUNE_LAYER + 1)
    again = early_prune_pass(gm, {"prune": {"layer": PRUNE_LAYER, "predictor": 0}})
    assert again.rewritten == 0 and "already has a prune point" in again.skipped[0][1]


@pytest.mark.parametrize(
    "case, reason",
    [("root_only", "not a tree-verification graph"), ("last_layer", "outside"), ("plain_hf", "keep_reset")],
)
def test_pass_leaves_unprovable_graphs_alone_and_logs(case, reason, caplog):
    caplog.set_level(logging.INFO, logger="propd_compile.passes.early_prune")
    model = tiny_model("llama", layers=LAYERS)
    if case == "plain_hf":
        box = {}

        def recorder(gm, example_inputs):
            box["reports"] = run_passes(gm, {"prune": {"layer": 1, "predictor": 0}})
            return gm.forward

        torch._dynamo.reset()
        torch.compile(lambda ids: model(input_ids=ids).logits, backend=recorder, dynamic=True)(torch.ones(2, 5, dtype=torch.long))
        torch._dynamo.reset()
        reports = box["reports"]
    else:
        reports = _capture(model, T=1 if case == "root_only" else 3, layer=LAYERS - 1 if case == "last_layer" else 1)[1]
    report = next(r for r in reports if r.name == "early_prune")
    assert report.rewritten == 0 and reason in report.skipped[0][1]
    assert any(reason in r.getMessage() for r in caplog.records)


# ---- the compiled graph ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def compiled():
    torch._dynamo.reset()
    model = tiny_model("llama", seed=3, layers=LAYERS)
    pid = register_predictor(logit_lens(model), 4)
    f = torch.compile(eager_forward(model), backend="propd", dynamic=True,
                      options={"prune": {"layer": PRUNE_LAYER, "predictor": pid}})
    cache, ids, mask, pos = _inputs(model, 2, None)
    with fx_config.patch(use_duck_shape=False), torch.no_grad():  # compile the batch > 1 tree graph
        f(ids, mask, pos, cache)
    return model, pid, f


@settings(max_examples=12, **SETTINGS)
@given(rows=st.lists(trees(), min_size=2, max_size=3), k=st.sampled_from([1, 2, 4, 16, VOCAB]), seed=st.integers(0, 99))
def test_survivors_equal_unpruned_logits_without_recompiles(compiled, rows, k, seed):
    model, pid, f = compiled
    if max(len(r) for r in rows) < 2:
        rows = rows + [TokenTree((9, 10), (-1, 0), (1.0, 1.0))]
    get_predictor(pid).topk = k
    cache, ids, mask, pos = _inputs(model, len(rows), rows, seed=seed)
    ref_cache = copy.deepcopy(cache)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=ref_cache, output_hidden_states=True)
    graphs = counters["stats"]["unique_graphs"]
    with fx_config.patch(use_duck_shape=False), torch.no_grad():
        out = f(ids, mask, pos, cache)
    assert counters["stats"]["unique_graphs"] == graphs, "a survivor count or tree size recompiled"
    batch = TreeBatch.stack(rows)
    keep = cache.keep[:, : ids.shape[1]]
    assert out.shape == ref.logits.shape and torch.isfinite(out).all()
    assert not (keep[:, :, None] & batch.ancestors & ~keep[:, None, :]).any()  # closed under descendants
    assert keep[:, 0].all() and not (keep & ~batch.valid).any()
    torch.testing.assert_close(out[keep], ref.logits[keep], rtol=1e-4, atol=1e-5)
    early = logit_lens(model)(ref.hidden_states[PRUNE_LAYER + 1])
    expect = prune_keep(early, ids, batch.ancestors, k)
    assert (keep != expect).float().mean() <= 0.1  # the same rule (up to near-ties of fp32 rounding)
    if k == VOCAB:
        assert torch.equal(keep, batch.valid)
        torch.testing.assert_close(out[batch.valid], ref.logits[batch.valid], rtol=1e-5, atol=1e-6)
    # the deep layers' KV of every survivor sits at its own slot, as without pruning
    W = mask.shape[-1] - ids.shape[1]
    for layer in range(LAYERS):
        for b in range(len(rows)):
            slots = W + keep[b].nonzero().flatten()
            torch.testing.assert_close(cache.keys[layer][b, :, slots], ref_cache.keys[layer][b, :, slots], rtol=1e-4, atol=1e-5)


# ---- decoding -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pruned_model():
    torch._dynamo.reset()
    model = tiny_model("qwen2", seed=11, layers=LAYERS)
    accelerate(model, ProPDConfig(compile=True, prune=True, prune_head="lens", prune_layer=PRUNE_LAYER, prune_topk=3,
                                  tree="fixed", max_tree_nodes=12,
                                  # frozen weights as in decoding, without autotuning (minutes per graph)
                                  backend_options={"inductor_config": {"freezing": True}}))
    return model


@settings(max_examples=10, **SETTINGS)
@given(rows=st.lists(st.lists(st.integers(6, 12), min_size=2, max_size=14), min_size=1, max_size=1),
       new=st.integers(1, 30))
def test_decoding_with_pruning_is_token_identical_to_hf_greedy(pruned_model, rows, new):
    ids, mask = left_padded(rows)
    out = pruned_model.generate(ids, attention_mask=mask, max_new_tokens=new)
    assert torch.equal(out, hf_greedy(pruned_model, ids, mask, new))
    assert 0.0 <= pruned_model.propd.stats.pruned_fraction <= 1.0


def test_decoding_really_prunes(pruned_model):
    ids, mask = left_padded([[7, 8, 9, 10, 7, 8, 9, 10, 7, 8, 9, 10, 7, 8]])
    out = pruned_model.generate(ids, attention_mask=mask, max_new_tokens=40)
    assert torch.equal(out, hf_greedy(pruned_model, ids, mask, 40))
    stats = pruned_model.propd.stats
    assert stats.pruned_nodes > 0 and stats.pruned_fraction == stats.pruned_nodes / sum(stats.tree_sizes)
