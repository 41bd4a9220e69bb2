"""The compiled verification package: the eager forward's values for every step shape, lossless
decoding with nothing compiled while decoding, reuse across processes, never stale weights."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

import propd_compile
from models_tiny import VOCAB, hf_greedy, left_padded, tiny_model
from propd_compile import ProPDConfig, accelerate, restore
from propd_compile.cache import TreeKVCache
from propd_compile.decoding import eager_forward
from propd_compile.runtime_compile import MAX_BATCH, manifest_path, package_key

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _builds() -> int:
    return counters["propd"]["packages_built"]


@st.composite
def steps(draw):
    """A verification step: B rows, one random tree of T nodes each, a KV prefix with holes, and
    which nodes are real (rows verifying fewer nodes, finished rows: a ragged step), or all; a
    dense step may want its last position's logits only (what a prefill asks)."""
    B, T, prefix = draw(st.integers(1, 4)), draw(st.integers(1, 12)), draw(st.integers(1, 30))
    parents = [-1] + [draw(st.integers(0, i - 1)) for i in range(1, T)]
    anc = torch.eye(T, dtype=torch.bool)
    for i in range(1, T):
        anc[i] |= anc[parents[i]]
    valid = torch.tensor(draw(st.lists(st.lists(st.booleans(), min_size=prefix, max_size=prefix), min_size=B, max_size=B)))
    valid[:, -1] = True
    mask = torch.cat([valid[:, None, :].expand(B, T, prefix), anc.repeat(B, 1, 1)], 2)[:, None]
    ids = torch.tensor(draw(st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=T, max_size=T), min_size=B, max_size=B)))
    depth = anc.sum(1) - 1
    sizes = draw(st.lists(st.integers(0, T), min_size=B, max_size=B))
    nodes = (torch.arange(T)[None] < torch.tensor(sizes)[:, None]) if draw(st.booleans()) else None
    last_only = nodes is None and draw(st.booleans())
    return ids, mask, (prefix + depth).repeat(B, 1), draw(st.integers(0, 2**31 - 1)), nodes, last_only


@settings(max_examples=25, **SETTINGS)
@given(step=steps())
def test_the_package_computes_the_eager_forward(compiled_llama, step):
    model, config = compiled_llama
    ids, mask, pos, seed, nodes, last_only = step
    forward = model.propd.forward(config, hidden=True)
    eager = eager_forward(model, hidden=True)
    B, S = ids.shape[0], mask.shape[-1]
    caches = [TreeKVCache.for_model(model, B, S + 3) for _ in range(2)]
    g = torch.Generator().manual_seed(seed)
    for a, b in zip(caches[0].keys + caches[0].values, caches[1].keys + caches[1].values):
        a.normal_(generator=g)
        b.copy_(a)
    for c in caches:
        c.begin_step(mask, nodes)
    got, ref = forward(ids, mask, pos, caches[0], last_only), eager(ids, mask, pos, caches[1], last_only)
    (logits, hidden), (ref_logits, ref_hidden) = got, ref
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(hidden, ref_hidden, rtol=1e-4, atol=1e-5)
    real = torch.ones_like(ids, dtype=torch.bool) if nodes is None else nodes
    if last_only:
        real = real[:, -1:]
    assert torch.equal(logits.argmax(-1)[real], ref_logits.argmax(-1)[real])
    for a, b in zip(caches[0].keys + caches[0].values, caches[1].keys + caches[1].values):  # written in place
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@settings(max_examples=12, **SETTINGS)
@given(
    rows=st.lists(st.lists(st.integers(6, VOCAB - 1), min_size=1, max_size=14), min_size=1, max_size=4),
    new=st.integers(1, 40),
)
def test_compiled_decoding_is_lossless_and_compiles_nothing(compiled_llama, rows, new):
    model, config = compiled_llama
    ids, mask = left_padded(rows)
    before, graphs = _builds(), counters["stats"]["unique_graphs"]
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new)
    assert torch.equal(out, hf_greedy(model, ids, mask, new))
    assert _builds() == before and counters["stats"]["unique_graphs"] == graphs, "decoding compiled something"


def test_the_package_records_its_passes_and_build(compiled_llama):
    """The manifest says what the passes did: on CPU the tree-attention rewrite is off (its
    custom op would call back into Python every layer), elsewhere it rewrote every attention."""
    model, config = compiled_llama
    manifest = json.loads(manifest_path(package_key(model, config).path()).read_text())
    layers = model.config.num_hidden_layers
    key = package_key(model, config)
    expected = "tree_attention: disabled" if key.device == "cpu" else f"tree_attention: rewritten={layers} "
    assert manifest["passes"][0].startswith(expected)
    assert manifest["compile_seconds"] > 0 and manifest["package_bytes"] > 0


def test_a_fresh_process_loads_the_package_instead_of_compiling(compiled_llama):
    model, _ = compiled_llama
    code = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from torch._dynamo.utils import counters
        from models_tiny import tiny_model, hf_greedy, left_padded
        import propd_compile
        torch.set_num_threads({torch.get_num_threads()})
        model = tiny_model("llama", seed=1)
        propd_compile.accelerate(model, propd_compile.ProPDConfig(max_tree_nodes=12))  # compile="auto"
        ids, mask = left_padded([[7, 8, 9, 7, 8, 9], [10, 11]])
        out = model.generate(ids, attention_mask=mask, max_new_tokens=20)
        assert model.propd.compiled(hidden=True), "no package found"
        assert counters["propd"]["packages_built"] == 0
        assert torch.equal(out, hf_greedy(model, ids, mask, 20))
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_changed_weights_never_use_stale_constants(compiled_llama):
    _, config = compiled_llama
    model = tiny_model("llama", seed=1)  # the same weights: the package is found
    accelerate(model, config.with_(compile="auto"))
    try:
        assert model.propd.compiled(hidden=True)
        ids, mask = left_padded([[7, 8, 9, 7, 8, 9, 7]])
        with torch.no_grad():
            model.model.layers[0].mlp.up_proj.weight.mul_(1.5)  # in place: same tensor, new values
        assert not model.propd.compiled(hidden=True)  # no package for these weights: eager
        before = _builds()
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=25), hf_greedy(model, ids, mask, 25))
        assert _builds() == before
    finally:
        restore(model)


def test_auto_is_eager_until_built_and_true_builds():
    model = tiny_model("qwen2", seed=7)
    accelerate(model)  # compile="auto"
    try:
        assert not model.propd.compiled() and not model.propd.compiled(hidden=True)
        ids, mask = left_padded([[7, 8, 9, 7, 8]])
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=10), hf_greedy(model, ids, mask, 10))
    finally:
        restore(model)


def test_batches_over_the_limit_are_refused_clearly(compiled_llama):
    model, config = compiled_llama
    forward = model.propd.forward(config)
    B = MAX_BATCH + 1
    cache = TreeKVCache.for_model(model, B, 4)
    mask = torch.ones(B, 1, 1, 2, dtype=torch.bool)
    cache.begin_step(mask)
    with pytest.raises(ValueError, match=f"up to {MAX_BATCH} rows"):
        forward(torch.zeros(B, 1, dtype=torch.long), mask, torch.ones(B, 1, dtype=torch.long), cache)
