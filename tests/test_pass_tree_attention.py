"""Unit tests of the tree-attention FX pass on Dynamo-captured (and hand-built) graphs.

No Inductor here: graphs are captured with a recording backend, rewritten with the pass and run
eagerly, so the file stays fast.
"""
from __future__ import annotations

import logging
import math
import operator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import propd_compile.kernels  # noqa: F401
from propd_compile.backend import propd_backend
from propd_compile.passes import PassReport, pass_names, run_passes
from propd_compile.passes.tree_attention import tree_attention_pass

SDPA = torch._C._nn.scaled_dot_product_attention
TREE = torch.ops.propd.tree_attention.default
LOGGER = "propd_compile.passes.tree_attention"


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Transformers' repeat_kv, verbatim."""
    b, h, s, d = x.shape
    if n_rep == 1:
        return x
    x = x[:, :, None, :, :].expand(b, h, n_rep, s, d)
    return x.reshape(b, h * n_rep, s, d)


def capture(fn, *args, dynamic: bool = False) -> tuple[torch.fx.GraphModule, list]:
    """Dynamo's torch-level graph of fn(*args) and its example inputs (fresh compile)."""
    box: dict = {}

    def recorder(gm, example_inputs):
        box["gm"], box["ex"] = gm, list(example_inputs)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=recorder, fullgraph=True, dynamic=dynamic)(*args)
    return box["gm"], box["ex"]


def count(gm: torch.fx.GraphModule, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.target == target)


def tree_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.target is TREE]


def qkv(b=2, hq=4, hkv=2, t=5, s=9, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, t, d, generator=g)
    k = torch.randn(b, hkv, s, d, generator=g)
    v = torch.randn(b, hkv, s, d, generator=g)
    mask = torch.rand(b, 1, t, s, generator=g) > 0.3
    mask[..., 0] = True
    return q, k, v, mask


def hf_attention(q, k, v, mask):
    n_rep = q.shape[1] // k.shape[1]
    return SDPA(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attn_mask=mask, dropout_p=0.0, scale=0.3,
                is_causal=False)


# --------------------------------------------------------------------------------------------
def test_pass_list_and_report_type():
    assert pass_names() == ["tree_attention", "early_prune"]
    q, k, v, mask = qkv()
    gm, _ = capture(hf_attention, q, k, v, mask)
    reports = run_passes(gm, {})
    assert [r.name for r in reports] == ["tree_attention", "early_prune"] and isinstance(reports[0], PassReport)
    assert not reports[1].enabled  # no `prune` option: no prune point
    assert reports[0].rewritten == 1 and reports[0].changed
    gm2, _ = capture(hf_attention, q, k, v, mask)
    assert run_passes(gm2, {"tree_attention": False})[0].enabled is False
    assert count(gm2, SDPA) == 1 and not tree_nodes(gm2)


def test_repeat_kv_folded_and_equal():
    q, k, v, mask = qkv(hq=6, hkv=2)
    gm, ex = capture(hf_attention, q, k, v, mask)
    assert count(gm, "expand") == 2 and count(gm, "reshape") == 2
    report = tree_attention_pass(gm)
    assert report.rewritten == 1 and report.erased == 6 and not report.skipped
    (node,) = tree_nodes(gm)
    # K/V are read un-repeated, straight from the placeholders; nothing of repeat_kv is left.
    assert node.args[1].op == "placeholder" and node.args[2].op == "placeholder"
    assert count(gm, SDPA) == 0 and count(gm, "expand") == 0 and count(gm, "reshape") == 0
    assert node.args[4] == 0.3
    torch.testing.assert_close(gm(*ex)[0], hf_attention(q, k, v, mask), atol=1e-6, rtol=1e-5)


def test_idempotent():
    q, k, v, mask = qkv()
    gm, ex = capture(hf_attention, q, k, v, mask)
    assert tree_attention_pass(gm).rewritten == 1
    code = gm.code
    again = tree_attention_pass(gm)
    assert again.rewritten == 0 and again.erased == 0 and not again.skipped and not again.changed
    assert gm.code == code


def test_graph_without_attention_unchanged():
    def f(x, w):
        y = x[:, :, None].expand(2, 3, 4, 5).reshape(2, 12, 5)  # repeat_kv-like, but no attention
        return torch.relu(y @ w).sum(-1)

    gm, _ = capture(f, torch.randn(2, 3, 5), torch.randn(5, 5))
    code, n = gm.code, len(gm.graph.nodes)
    report = tree_attention_pass(gm)
    assert report.rewritten == 0 and report.erased == 0 and not report.skipped
    assert gm.code == code and len(gm.graph.nodes) == n


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"dropout_p": 0.1}, "dropout_p=0.1"),
        ({"is_causal": True}, "is_causal=True"),
    ],
)
def test_unprovable_sdpa_left_alone_and_logged(kwargs, reason, caplog):
    q, k, v, _ = qkv(hkv=4, t=5, s=5)
    mask = None if kwargs.get("is_causal") else torch.ones(2, 1, 5, 5, dtype=torch.bool)

    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs)

    gm, _ = capture(f, q, k, v)
    code = gm.code
    caplog.set_level(logging.INFO, logger=LOGGER)
    report = tree_attention_pass(gm)
    assert report.rewritten == 0 and len(report.skipped) == 1 and reason in report.skipped[0][1]
    assert gm.code == code and count(gm, SDPA) == 1
    assert any(reason in r.getMessage() and r.name == LOGGER for r in caplog.records)


def test_non_repeat_kv_reshape_not_folded():
    """Same getitem/expand as repeat_kv, but the reshape merges the repeat into the sequence dim:
    keys are repeated along S, not across heads, so folding would be wrong."""
    q, k, v, _ = qkv(hq=2, hkv=2, t=3, s=4)
    mask = torch.rand(2, 1, 3, 8) > 0.2
    mask[..., 0] = True

    def seq_repeat(x):
        b, h, s, d = x.shape
        return x[:, :, None, :, :].expand(b, h, 2, s, d).reshape(b, h, 2 * s, d)

    def f(q, k, v, mask):
        return SDPA(q, seq_repeat(k), seq_repeat(v), attn_mask=mask, scale=0.5)

    gm, ex = capture(f, q, k, v, mask)
    report = tree_attention_pass(gm)
    assert report.rewritten == 1 and report.erased == 0
    (node,) = tree_nodes(gm)
    assert node.args[1].target == "reshape" and node.args[2].target == "reshape"
    assert count(gm, "expand") == 2
    torch.testing.assert_close(gm(*ex)[0], f(q, k, v, mask), atol=1e-6, rtol=1e-5)


def test_repeat_kv_on_one_side_only_not_folded():
    q, k, v, mask = qkv(hq=4, hkv=2)
    v4 = torch.randn(2, 4, 9, 8)

    def f(q, k, v4, mask):
        return SDPA(q, repeat_kv(k, 2), v4, attn_mask=mask)

    gm, ex = capture(f, q, k, v4, mask)
    report = tree_attention_pass(gm)
    assert report.rewritten == 1 and report.erased == 0
    (node,) = tree_nodes(gm)
    assert node.args[1].target == "reshape"
    assert node.args[4] == pytest.approx(1 / math.sqrt(8))  # scale=None -> 1/sqrt(D)
    torch.testing.assert_close(gm(*ex)[0], f(q, k, v4, mask), atol=1e-6, rtol=1e-5)


def test_repeat_kv_with_other_users_kept():
    """A repeat_kv output that is also used elsewhere is folded for the op but not erased."""
    q, k, v, mask = qkv()

    def f(q, k, v, mask):
        kr = repeat_kv(k, 2)
        return SDPA(q, kr, repeat_kv(v, 2), attn_mask=mask), kr.sum()

    gm, ex = capture(f, q, k, v, mask)
    report = tree_attention_pass(gm)
    assert report.rewritten == 1 and report.erased == 3  # only V's chain
    (node,) = tree_nodes(gm)
    assert node.args[1].op == "placeholder" and count(gm, "reshape") == 1
    out, ksum = gm(*ex)
    ref, ref_ksum = f(q, k, v, mask)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ksum, ref_ksum)


def test_enable_gqa_kwarg_and_additive_mask():
    q, k, v, bmask = qkv(hq=8, hkv=2)
    amask = torch.zeros(bmask.shape).masked_fill(~bmask, torch.finfo(torch.float32).min)

    def f(q, k, v, m):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)

    gm, ex = capture(f, q, k, v, amask)
    report = tree_attention_pass(gm)
    assert report.rewritten == 1
    (node,) = tree_nodes(gm)
    assert node.args[1].op == "placeholder"
    torch.testing.assert_close(gm(*ex)[0], f(q, k, v, amask), atol=1e-6, rtol=1e-5)


def test_kv_write_survives():
    """In-place cache writes without users must stay (no blanket dead-code elimination)."""
    cache_k, cache_v = torch.zeros(1, 2, 8, 4), torch.zeros(1, 2, 8, 4)

    def f(q, k, v, mask):
        torch.ops.propd.kv_write(cache_k, k, 3)
        torch.ops.propd.kv_write(cache_v, v, 3)
        return SDPA(q, repeat_kv(cache_k, 2), repeat_kv(cache_v, 2), attn_mask=mask)

    q, k, v = torch.randn(1, 4, 2, 4), torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4)
    mask = torch.zeros(1, 1, 2, 8, dtype=torch.bool)
    mask[..., :5] = True
    gm, ex = capture(f, q, k, v, mask)
    kv_write = (torch.ops.propd.kv_write, torch.ops.propd.kv_write.default)
    writes = [n.name for n in gm.graph.nodes if n.target in kv_write]
    assert len(writes) == 2
    assert tree_attention_pass(gm).rewritten == 1
    assert [n.name for n in gm.graph.nodes if n.target in kv_write] == writes
    cache_k.zero_(), cache_v.zero_()
    out = gm(*ex)[0]
    assert torch.equal(cache_k[:, :, 3:5], k) and torch.equal(cache_v[:, :, 3:5], v)
    torch.testing.assert_close(out, f(q, k, v, mask), atol=1e-6, rtol=1e-5)


def test_dynamic_shapes_fold():
    """Under dynamic=True the expand/reshape sizes are SymInts; the shape proof still holds."""
    q, k, v, mask = qkv(b=2, hq=4, hkv=2, t=3, s=6)  # b == hkv: Dynamo unifies their symbols
    gm, _ = capture(hf_attention, q, k, v, mask, dynamic=True)
    report = tree_attention_pass(gm)
    assert report.rewritten == 1 and report.erased >= 6
    (node,) = tree_nodes(gm)
    assert count(gm, "expand") == 0 and count(gm, "reshape") == 0
    assert node.args[1].op == "placeholder"

    # Same through the backend (eager hand-off) on several shapes of one dynamic compile.
    torch._dynamo.reset()
    compiled = torch.compile(hf_attention, backend=propd_backend, options={"inductor": False}, dynamic=True)
    for b, hq, hkv, t, s in [(2, 4, 2, 3, 6), (3, 6, 3, 5, 9), (2, 8, 2, 4, 4)]:
        q, k, v, mask = qkv(b=b, hq=hq, hkv=hkv, t=t, s=s, seed=b + t)
        torch.testing.assert_close(compiled(q, k, v, mask), hf_attention(q, k, v, mask), atol=1e-6, rtol=1e-5)


# ---- hand-built graphs: cases Dynamo would refuse to trace -----------------------------------
def _graph(q, k, v, mask, **kwargs):
    g = torch.fx.Graph()
    nodes = []
    for name, val in (("q", q), ("k", k), ("v", v), ("mask", mask)):
        n = g.placeholder(name)
        n.meta["val"] = val
        nodes.append(n)
    out = g.call_function(SDPA, tuple(nodes[:3]), {"attn_mask": nodes[3], **kwargs})
    g.output(out)
    return torch.fx.GraphModule(torch.nn.Module(), g)


@pytest.mark.parametrize(
    "case, reason",
    [
        ("float64 mask", "attn_mask dtype"),
        ("int mask", "attn_mask dtype"),
        ("3-D query", "3-D"),
        ("unknown kwarg", "unknown kwargs"),
        ("dropout node", "non-constant dropout_p"),
    ],
)
def test_hand_built_unprovable(case, reason, caplog):
    q, k, v, mask = qkv(hkv=4)
    kwargs = {}
    if case == "float64 mask":
        mask = mask.double()
    elif case == "int mask":
        mask = mask.int()
    elif case == "3-D query":
        q, k, v = q[0], k[0], v[0]
    elif case == "unknown kwarg":
        kwargs = {"bogus": 1}
    gm = _graph(q, k, v, mask, **kwargs)
    if case == "dropout node":
        p = gm.graph.placeholder("p")
        sdpa = next(n for n in gm.graph.nodes if n.target is SDPA)
        sdpa.kwargs = {**sdpa.kwargs, "dropout_p": p}
        gm.recompile()
    code = gm.code
    caplog.set_level(logging.INFO, logger=LOGGER)
    report = tree_attention_pass(gm)
    assert report.rewritten == 0 and reason in report.skipped[0][1], report
    assert gm.code == code
    assert any(reason in r.getMessage() for r in caplog.records)


# ---- property: any bool/additive mask, scale, GQA ratio ---------------------------------------
@settings(deadline=None, max_examples=30)
@given(
    b=st.integers(1, 3), hkv=st.sampled_from([1, 2, 3]), n_rep=st.sampled_from([1, 2, 4]),
    t=st.integers(1, 7), s_extra=st.integers(0, 6), d=st.sampled_from([4, 8, 16]),
    scale=st.one_of(st.none(), st.floats(0.05, 2.0)), additive=st.booleans(),
    mask_heads=st.sampled_from([1, "hq"]), seed=st.integers(0, 2**16),
)
def test_property_rewrite_matches_sdpa(b, hkv, n_rep, t, s_extra, d, scale, additive, mask_heads, seed):
    """The rewritten graph (run eagerly) equals SDPA on random shapes and masks, HF-style GQA."""
    hq, s = hkv * n_rep, t + s_extra
    q, k, v, _ = qkv(b, hq, hkv, t, s, d, seed)
    g = torch.Generator().manual_seed(seed + 1)
    mask = torch.rand(b, 1 if mask_heads == 1 else hq, t, s, generator=g) > 0.4
    mask[..., 0] = True
    if additive:
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)

    def ref(q, k, v, mask):
        return F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attn_mask=mask,
                                              scale=scale)

    gm, ex = capture(ref, q, k, v, mask)
    report = tree_attention_pass(gm)
    assert report.rewritten == 1 and not report.skipped
    assert count(gm, "expand") == 0
    (node,) = tree_nodes(gm)
    assert node.args[4] == pytest.approx(scale if scale is not None else 1 / math.sqrt(d))
    torch.testing.assert_close(gm(*ex)[0], ref(q, k, v, mask), atol=1e-5, rtol=1e-5)
