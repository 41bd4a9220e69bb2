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
from models_tiny import VOCAB, hf_greedy, left_padded, q4_1_weights, tiny_model, tree_steps, twin_caches
from propd_compile import ProPDConfig, accelerate, restore
from propd_compile.cache import TreeKVCache
from propd_compile.decoding import eager_forward
from propd_compile.runtime_compile import KEPT_PACKAGES, MAX_BATCH, _evict_stale, manifest_path, package_key

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _builds() -> int:
    return counters["propd"]["packages_built"]


@settings(max_examples=25, **SETTINGS)
@given(step=tree_steps(), last=st.booleans())
def test_the_package_computes_the_eager_forward(compiled_llama, step, last):
    """Every step shape, dense or ragged, and a dense step's last-position logits (a prefill's)."""
    model, config = compiled_llama
    ids, mask, pos, nodes, seed = step
    last_only = last and nodes is None
    forward = model.propd.forward(config, hidden=True)
    eager = eager_forward(model, hidden=True)
    B, S = ids.shape[0], mask.shape[-1]
    caches = twin_caches(model, B, S + 3, seed)
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


@settings(max_examples=15, **SETTINGS)
@given(rows=st.lists(st.lists(st.integers(6, VOCAB - 1), min_size=1, max_size=14), min_size=1, max_size=4))
def test_a_packed_prefill_computes_the_padded_one(compiled_llama, rows):
    """The prefill runs the prompts' real tokens only (no padding): the package and the eager
    forward on that packing give the last-position logits and the cache of the padded prefill."""
    from propd_compile.decoding import _prefill_mask

    model, config = compiled_llama
    ids, attention = left_padded(rows)
    valid = attention.bool()
    mask, pos = _prefill_mask(valid), (valid.long().cumsum(1) - 1).clamp(min=0)
    B, P = ids.shape
    padded, packed = twin_caches(model, B, P + 3, 0)
    eager_packed = twin_caches(model, B, P + 3, 0)[0]
    padded.begin_step(mask)
    ref_logits, _ = eager_forward(model, hidden=True)(ids, mask, pos, padded, True)
    for cache, forward in ((packed, model.propd.forward(config, hidden=True)), (eager_packed, eager_forward(model, hidden=True))):
        cache.begin_step(mask, valid)
        assert (cache.ragged is not None) == (not bool(valid.all()))
        logits, _ = forward(ids, mask, pos, cache, True)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
        assert torch.equal(logits.argmax(-1), ref_logits.argmax(-1))
        for a, b in zip(cache.keys + cache.values, padded.keys + padded.values):  # the prompts' entries
            prompt = lambda buf: buf[:, :, :P].transpose(1, 2)[valid]  # [real tokens, heads, dim]
            torch.testing.assert_close(prompt(a), prompt(b), rtol=1e-4, atol=1e-5)


def test_long_prompts_prefill_on_eager_kernels_on_cpu(compiled_llama, monkeypatch):
    """A prefill of more than EAGER_PREFILL_TOKENS real tokens runs eager; shorter ones the package
    (a Forward that is not a block-format package: the fp32 threshold)."""
    from propd_compile import runtime_compile
    from propd_compile.decoding import _prefill_mask

    model, config = compiled_llama
    model.propd.forward(config)  # built first: a build checks its package against the eager forward
    calls = []

    def compiled(*args, **kwargs):
        calls.append("package")
        return model.propd.forward(config)(*args, **kwargs)

    def eager(m, hidden=False, taps=()):
        inner = eager_forward(m, hidden=hidden, taps=taps)
        return lambda *a, **k: (calls.append("eager"), inner(*a, **k))[1]

    monkeypatch.setattr(runtime_compile, "eager_forward", eager)
    monkeypatch.setattr(runtime_compile, "EAGER_PREFILL_TOKENS", 10)

    def routes(rows) -> str:
        prefill = runtime_compile.prefill_forward(model, compiled, hidden=False)
        ids, attention = left_padded(rows)
        cache = TreeKVCache.for_model(model, ids.shape[0], ids.shape[1] + 2)
        cache.begin_step(_prefill_mask(attention.bool()), attention.bool())
        prefill(ids, _prefill_mask(attention.bool()), (attention.cumsum(1) - 1).clamp(min=0), cache, last_only=True)
        return calls[-1]

    for rows, expected in (([[7] * 4, [8] * 5], "package"), ([[7] * 4, [8] * 7], "eager"), ([[9] * 11], "eager")):
        assert routes(rows) == expected, rows
    compiled.block_linear = True  # a block-format package keeps its own threshold
    monkeypatch.setattr(runtime_compile, "BLOCK_EAGER_PREFILL_TOKENS", 6)
    for rows, expected in (([[7] * 3, [8] * 3], "package"), ([[7] * 4, [8] * 5], "eager"), ([[9] * 11], "eager")):
        assert routes(rows) == expected, rows


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
    """The manifest says what the passes did (after the block-format swap): on CPU the tree-attention rewrite is off (its
    custom op would call back into Python every layer), elsewhere it rewrote every attention."""
    model, config = compiled_llama
    manifest = json.loads(manifest_path(package_key(model, config).path()).read_text())
    layers = model.config.num_hidden_layers
    key = package_key(model, config)
    expected = "tree_attention: disabled" if key.device == "cpu" else f"tree_attention: rewritten={layers} "
    assert manifest["passes"][1].startswith(expected)
    assert manifest["compile_seconds"] > 0 and manifest["package_bytes"] > 0


def test_the_package_reads_the_decoder_weights_in_their_block_format(compiled_llama):
    """Decoder linears whose weights are Q4_1 values call propd::block_linear on the packed
    weights; the fp32 LM head is left to Inductor's GEMMs, and the manifest says why."""
    from propd_compile.kernels.block_linear import available

    model, config = compiled_llama
    manifest = json.loads(manifest_path(package_key(model, config).path()).read_text())
    if not available():
        assert manifest["block_linears"] == 0
        return
    n = 7 * model.config.num_hidden_layers
    assert manifest["block_linears"] == n
    assert manifest["passes"][0].startswith(f"block_linear: swapped={n} {{'q4_1': {n}}}") and "skipped=1" in manifest["passes"][0]


def test_a_fresh_process_loads_the_package_instead_of_compiling(compiled_llama, tmp_path):
    model, _ = compiled_llama
    code = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from torch._dynamo.utils import counters
        from models_tiny import q4_1_weights, tiny_model, hf_greedy, left_padded
        import propd_compile
        torch.set_num_threads({torch.get_num_threads()})
        model = q4_1_weights(tiny_model("llama", seed=1))
        propd_compile.accelerate(model, propd_compile.ProPDConfig(max_tree_nodes=12))  # compile="auto"
        ids, mask = left_padded([[7, 8, 9, 7, 8, 9], [10, 11]])
        out = model.generate(ids, attention_mask=mask, max_new_tokens=20)
        assert model.propd.compiled(hidden=True), "no package found"
        assert counters["propd"]["packages_built"] == 0
        assert torch.equal(out, hf_greedy(model, ids, mask, 20))
        print("ok")
    """)
    # run outside the checkout, as a user's process would: with the repository root on sys.path its
    # top-level `kernels/` folder shadows Hugging Face's `kernels` package, which transformers imports
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_changed_weights_never_use_stale_constants(compiled_llama):
    _, config = compiled_llama
    model = q4_1_weights(tiny_model("llama", seed=1))  # the same weights: the package is found
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


def test_the_exported_attention_reads_the_cache_without_repeating_it():
    """Every attention of the exported verification graph takes K/V with the model's KV heads and
    the query heads folded into the query length, so Inductor never repeats the cache slices
    (its CPU flash-attention lowering copies K/V once per query group otherwise)."""
    from propd_compile.runtime_compile import export_verification

    model = tiny_model("llama", seed=1)
    accelerate(model, ProPDConfig(compile=False))
    try:
        with torch.no_grad():
            ep = export_verification(model, hidden=True)
    finally:
        restore(model)
    sdpa = [n for n in ep.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    kv_heads = model.config.num_key_value_heads
    assert kv_heads < model.config.num_attention_heads and len(sdpa) == model.config.num_hidden_layers
    for node in sdpa:
        q, k, v = (a.meta["val"] for a in node.args[:3])
        assert q.shape[1] == k.shape[1] == v.shape[1] == kv_heads
        assert not node.kwargs.get("enable_gqa", False)


def test_building_a_package_removes_the_least_recently_used_of_its_model(tmp_path):
    """Packages of the same model, kind, device and threads beyond KEPT_PACKAGES go, oldest use
    first, with their manifests; other models' packages and partial builds stay."""
    import os

    def package(name: str, age: int) -> Path:
        p = tmp_path / f"{name}.pt2"
        p.write_bytes(b"x")
        manifest_path(p).write_text("{}")
        os.utime(p, (1000 - age, 1000 - age))
        return p

    same = [package(f"tiny-hidden-cpu2t-{i:04x}", age=i) for i in range(KEPT_PACKAGES + 2)]
    others = [package("tiny-hidden-t0-cpu2t-aaaa", 50), package("tiny-hidden-cpu1t-bbbb", 50), package("other-hidden-cpu2t-cccc", 50)]
    partial = tmp_path / "tiny-hidden-cpu2t-dddd.partial.pt2"
    partial.write_bytes(b"x")
    _evict_stale(same[0])
    assert [p.exists() for p in same] == [True] * KEPT_PACKAGES + [False] * 2
    assert [manifest_path(p).exists() for p in same] == [True] * KEPT_PACKAGES + [False] * 2
    assert all(p.exists() for p in others) and partial.exists()
