"""Block-format linears: a format is used only when it rebuilds every weight bit for bit, the
kernel computes the fp32 product with those weights, and the swap for an export is undone."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models_tiny import q4_1_weights, tiny_model
from propd_compile.kernels import block_linear as bl

pytestmark = pytest.mark.skipif(not bl.available(), reason="the block-format kernel needs x86 AVX2 and a C++ compiler")


def _exact(fmt: str, n: int, k: int, seed: int, scale: float) -> torch.Tensor:
    """A random [n, k] weight that `fmt` represents exactly (what a GGUF dequantization or a bf16
    checkpoint gives)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * scale
    if fmt == "q4_1":
        return q4_1_weights(_linear(w), ("",)).weight.detach()
    if fmt == "q8_0":
        b = w.reshape(n, -1, 32)
        d = (b.abs().amax(-1, keepdim=True) / 127).half().float()
        return (d * (b / d).round()).reshape(n, k)
    return w.bfloat16().float()


def _linear(w: torch.Tensor) -> torch.nn.Linear:
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


shapes = st.tuples(st.integers(1, 6).map(lambda t: 16 * t), st.integers(1, 5).map(lambda b: 32 * b))


@settings(max_examples=60, deadline=None)
@given(fmt=st.sampled_from(bl.FORMATS), shape=shapes, seed=st.integers(0, 2**16), scale=st.sampled_from([1e-3, 0.05, 1.0, 40.0]))
def test_a_format_is_chosen_only_when_it_rebuilds_every_weight(fmt, shape, seed, scale):
    w = _exact(fmt, *shape, seed, scale)
    bw, why = bl.block_weight(w)
    assert bw is not None, why
    assert bl.FORMATS.index(bw.format) <= bl.FORMATS.index(fmt)  # this one or a narrower one
    assert torch.equal(bl.rebuild(bw), w)
    assert bw.nbytes < w.numel() * 4


@settings(max_examples=30, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16), flip=st.integers(0, 10**6))
def test_one_weight_off_its_grid_keeps_the_layer_fp32(shape, seed, flip):
    w = _exact("q4_1", *shape, seed, 0.05)
    w.view(-1)[flip % w.numel()] += 1e-5  # no longer d * q + m, nor a bf16 value
    bw, why = bl.block_weight(w)
    assert bw is None and "exactly" in why


def test_shapes_and_dtypes_the_kernel_does_not_take_are_refused_with_the_reason():
    assert "multiple of 16" in bl.block_weight(torch.zeros(24, 64))[1]
    assert "multiple of 16" in bl.block_weight(torch.zeros(32, 48))[1]
    assert "fp32" in bl.block_weight(torch.zeros(32, 64, dtype=torch.float64))[1]


@settings(max_examples=80, deadline=None)
@given(fmt=st.sampled_from(bl.FORMATS), shape=shapes, rows=st.integers(0, 40), lead=st.sampled_from([(), (2,), (1, 3)]),
       seed=st.integers(0, 2**16), transposed=st.booleans(), isa=st.sampled_from(bl.isas() if bl.available() else ("avx2",)))
def test_the_kernel_is_the_fp32_product_with_the_rebuilt_weights(fmt, shape, rows, lead, seed, transposed, isa):
    """Every instruction set this CPU has, every row count (AVX2: 1-4 multiply straight from
    registers, more run over a rebuilt panel in passes; AVX-512: passes of up to 16 rows), leading
    batch dims and non-contiguous inputs: x @ W^T up to summation order."""
    w = _exact(fmt, *shape, seed, 0.05)
    bw, _ = bl.block_weight(w)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*lead, shape[1], rows, generator=g).transpose(-1, -2) if transposed else torch.randn(*lead, rows, shape[1], generator=g)
    with bl.use_isa(isa):
        got = bl.block_linear(x, bw)
    ref = x.double() @ w.double().T
    assert got.shape == ref.shape and got.dtype == torch.float32
    bound = 1e-5 * (x.abs().double() @ w.abs().double().T) + 1e-30  # fp32 rounding in any summation order
    assert bool(((got.double() - ref).abs() <= bound).all())


def test_bad_inputs_to_the_op_name_the_problem():
    bw, _ = bl.block_weight(_exact("q4_1", 32, 64, 0, 0.05))
    with pytest.raises(RuntimeError, match="float32"):
        bl.block_linear(torch.zeros(2, 64, dtype=torch.float64), bw)
    with pytest.raises(RuntimeError, match="features"):
        bl.block_linear(torch.zeros(2, 96), bw)


def test_an_instruction_set_the_cpu_lacks_is_refused_and_nothing_changes():
    before = bl.isa()
    assert before in bl.isas() and "avx2" in bl.isas()
    with pytest.raises(RuntimeError, match="unknown instruction set"):
        torch.ops.propd.block_linear_isa("sse2")
    if "avx512" not in bl.isas():
        with pytest.raises(RuntimeError, match="no AVX-512"):
            bl.use_isa("avx512").__enter__()
    assert bl.isa() == before


def test_the_swap_packs_each_weight_once_skips_what_it_cannot_prove_and_is_undone():
    model = q4_1_weights(tiny_model("llama", seed=3))
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, and not exact: stays fp32
    extra = torch.nn.Linear(32, 32, bias=True)
    model.model.layers[0].mlp.extra = extra
    before = {n: m for n, m in model.named_modules()}
    x = torch.randint(6, 60, (2, 7))
    ref = model(x).logits
    with bl.block_linears(model) as report:
        swapped = {n for n, m in model.named_modules() if isinstance(m, bl.BlockLinear)}
        assert swapped == set(report.swapped) and len(swapped) == 7 * len(model.model.layers)
        assert report.skipped["lm_head"].startswith("no block format")
        assert report.skipped["model.layers.0.mlp.extra"] == "has a bias"
        assert report.bytes_after * 5 < report.bytes_before
        got = model(x).logits
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4) and torch.equal(got.argmax(-1), ref.argmax(-1))
    assert {n: m for n, m in model.named_modules()} == before


def test_tied_exact_weights_are_packed_once():
    model = torch.nn.Sequential(_linear(_exact("q8_0", 32, 64, 0, 0.05)), torch.nn.ReLU(), torch.nn.Linear(32, 32, bias=False))
    model[2].weight = model[0].weight
    with bl.block_linears(model) as report:
        assert model[0] is model[2] and report.bytes_before == 32 * 64 * 4 and len(report.swapped) == 2
