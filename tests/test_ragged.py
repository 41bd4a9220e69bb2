"""Ragged verification steps: a packed step computes what the padded step computes at every real
node, writes the cache only at real nodes, and decoding with per-row tree sizes and rows that
finish early stays identical to HF greedy; the attention switch leaves HF's own generate alone."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import propd_compile
from models_tiny import ARCHS, hf_greedy, left_padded, tiny_model, tree_steps, twin_caches
from propd_compile import ProPDConfig
from propd_compile.decoding import eager_forward

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def accelerated():
    """One accelerated tiny model per architecture (attention switched to propd's)."""
    models = {}
    for arch in ARCHS:
        models[arch] = tiny_model(arch, seed=0)
        propd_compile.accelerate(models[arch], ProPDConfig(compile=False))
    yield models
    for model in models.values():
        propd_compile.restore(model)


@pytest.mark.parametrize("arch", ARCHS)
@settings(max_examples=25, **SETTINGS)
@given(step=tree_steps(ragged=True))
def test_a_ragged_step_equals_the_padded_step_at_real_nodes(accelerated, arch, step):
    model = accelerated[arch]
    ids, mask, pos, nodes, seed = step
    forward = eager_forward(model, hidden=True)
    B, S = ids.shape[0], mask.shape[-1]
    caches = twin_caches(model, B, S + 2, seed)
    before = [k.clone() for k in caches[0].keys + caches[0].values]
    caches[0].begin_step(mask, nodes)
    caches[1].begin_step(mask)
    (logits, hidden), (ref_logits, ref_hidden) = forward(ids, mask, pos, caches[0]), forward(ids, mask, pos, caches[1])
    torch.testing.assert_close(logits[nodes], ref_logits[nodes], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden[nodes], ref_hidden[nodes], rtol=1e-5, atol=1e-6)
    assert not logits[~nodes].any(), "padding and finished rows come back as zeros"
    W = S - ids.shape[1]
    for got, ref, old in zip(caches[0].keys + caches[0].values, caches[1].keys + caches[1].values, before):
        step_slots = got[:, :, W : W + ids.shape[1]].transpose(1, 2)  # [B, T, H, D]
        torch.testing.assert_close(step_slots[nodes], ref[:, :, W : W + ids.shape[1]].transpose(1, 2)[nodes])
        assert torch.equal(step_slots[~nodes], old[:, :, W : W + ids.shape[1]].transpose(1, 2)[~nodes])
        assert torch.equal(got[:, :, :W], old[:, :, :W])


@pytest.mark.parametrize("arch", ARCHS)
@settings(max_examples=10, **SETTINGS)
@given(
    rows=st.lists(st.lists(st.integers(6, 20), min_size=1, max_size=10), min_size=2, max_size=4),
    budget=st.integers(2, 16), new=st.integers(4, 30), stop_at=st.integers(0, 6),
)
def test_ragged_decoding_with_rows_finishing_apart_equals_hf_greedy(accelerated, arch, rows, budget, new, stop_at):
    """Rows draft trees of their own sizes (repetitive prompts: the n-gram drafter finds long
    drafts for some rows, none for others), and an end token taken from one row's greedy answer
    makes that row stop while the others go on."""
    model = accelerated[arch]
    ids, mask = left_padded(rows)
    free = hf_greedy(model, ids, mask, new)[0, ids.shape[1] :].tolist()
    eos = free[min(stop_at, len(free) - 1)]
    ref = hf_greedy(model, ids, mask, new, eos_token_id=eos, pad_token_id=0)
    model.propd.config = ProPDConfig(compile=False, max_tree_nodes=budget)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_generate_is_unchanged_by_the_attention_switch(arch):
    """accelerate switches attention to propd's (HF's own on calls without a packing): HF's
    generate on the accelerated model, sampling or not, is what it was before."""
    model = tiny_model(arch, seed=1)
    ids, mask = left_padded([[7, 8, 9, 10], [11, 12]])
    torch.manual_seed(0)
    greedy, sampled = hf_greedy(model, ids, mask, 12), type(model).generate(
        model, ids, attention_mask=mask, max_new_tokens=12, do_sample=True, top_k=8
    )
    propd_compile.accelerate(model, ProPDConfig(compile=False))
    assert model.config._attn_implementation.startswith("propd_")
    torch.manual_seed(0)
    assert torch.equal(hf_greedy(model, ids, mask, 12), greedy)
    assert torch.equal(
        type(model).generate(model, ids, attention_mask=mask, max_new_tokens=12, do_sample=True, top_k=8), sampled
    )
    propd_compile.restore(model)
    assert not model.config._attn_implementation.startswith("propd_")


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 3), kv_heads=st.integers(1, 3), groups=st.integers(2, 4), T=st.integers(1, 9),
    S=st.integers(1, 20), seed=st.integers(0, 2**16), head_mask=st.booleans(),
)
def test_grouped_sdpa_is_hf_sdpa_without_repeating_kv(batch, kv_heads, groups, T, S, seed, head_mask):
    """Folding each KV head's query heads into the query length computes HF's sdpa attention
    (which repeats K/V) for any mask shared by the heads, fully masked rows included; masks per
    head, calls without a mask and arguments HF handles specially stay with HF."""
    import types

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from propd_compile.ragged import grouped_sdpa, grouped_sdpa_applies

    g = torch.Generator().manual_seed(seed)
    module = types.SimpleNamespace(num_key_value_groups=groups, is_causal=True)
    q = torch.randn(batch, kv_heads * groups, T, 8, generator=g)
    k, v = (torch.randn(batch, kv_heads, S, 8, generator=g) for _ in range(2))
    mask = torch.rand(batch, kv_heads * groups if head_mask else 1, T, S, generator=g) > 0.4
    kwargs = {"scaling": 0.3, "sliding_window": None}
    assert grouped_sdpa_applies(module, q, mask, kwargs) is not head_mask
    assert not grouped_sdpa_applies(module, q, None, kwargs)
    assert not grouped_sdpa_applies(module, q, mask[:, :1], {**kwargs, "softcap": 30.0})
    if not head_mask:
        ref, _ = sdpa_attention_forward(module, q, k, v, mask, **kwargs)
        out, _ = grouped_sdpa(module, q, k, v, mask, **kwargs)
        torch.testing.assert_close(out, ref, equal_nan=True, rtol=1e-5, atol=1e-6)
        assert out.shape == (batch, T, kv_heads * groups, 8) and out.is_contiguous()
