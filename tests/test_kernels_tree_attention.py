"""Tests of `propd::tree_attention` (kernels/tree_attention.py).

CPU op path vs the float64 reference and SDPA (property test), opcheck, torch.compile on CPU,
non-contiguous K/V cache slices, import without triton, and the Triton kernel itself run by the
interpreter (TRITON_INTERPRET=1, in a subprocess: `python tests/test_kernels_tree_attention.py
--interp [N]` runs that property test standalone).
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from propd_compile.kernels.tree_attention import (
    inductor_patches,
    tree_attention,
    tree_attention_reference,
)

HAS_TRITON = importlib.util.find_spec("triton") is not None
HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))

MASK_KINDS = ("none", "bool", "neg_inf", "finfo_min", "float_bias")
MASK_SHAPES = ("full", "b1", "11", "2d")


def tree_ancestor_mask(parents: list[int]) -> torch.Tensor:
    """[T, T] bool: node i attends to itself and its ancestors (parents[i] < i, -1 = root)."""
    t = len(parents)
    anc = torch.eye(t, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            anc[i] |= anc[p]
    return anc


@st.composite
def problems(draw, max_t=20, max_s=200, dims=(16, 32, 64)):
    b = draw(st.integers(1, 3))
    hkv = draw(st.integers(1, 3))
    group = draw(st.integers(1, 4))
    t = draw(st.integers(1, max_t))
    s = draw(st.integers(t, max_s))
    d = draw(st.sampled_from(dims))
    kind = draw(st.sampled_from(MASK_KINDS))
    shape = draw(st.sampled_from(MASK_SHAPES))
    tree = draw(st.booleans())
    parents = [-1] + [draw(st.integers(-1, i - 1)) for i in range(1, t)] if tree else None
    dead_rows = draw(st.lists(st.integers(0, t - 1), max_size=2)) if kind in ("bool", "neg_inf", "finfo_min") else []
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(b=b, hkv=hkv, group=group, t=t, s=s, d=d, kind=kind, shape=shape, parents=parents,
                dead_rows=dead_rows, seed=seed)


def make_inputs(p, dtype=torch.float32, slice_cache=False):
    g = torch.Generator().manual_seed(p["seed"])
    b, hkv, hq, t, s, d = p["b"], p["hkv"], p["hkv"] * p["group"], p["t"], p["s"], p["d"]
    q = torch.randn(b, hq, t, d, generator=g).to(dtype)
    if slice_cache:  # K/V as views of a longer preallocated cache (non-contiguous along S)
        k = torch.randn(b, hkv, s + 37, d, generator=g).to(dtype)[:, :, :s]
        v = torch.randn(b, hkv, s + 53, d, generator=g).to(dtype)[:, :, 5:5 + s]
    else:
        k = torch.randn(b, hkv, s, d, generator=g).to(dtype)
        v = torch.randn(b, hkv, s, d, generator=g).to(dtype)
    kind, shape = p["kind"], p["shape"]
    if kind == "none":
        return q, k, v, None
    lead = {"full": (b, hq), "b1": (b, 1), "11": (1, 1), "2d": ()}[shape]
    allow = torch.rand(*lead, t, s, generator=g) > 0.3
    if p["parents"] is not None:  # a token tree after a visible prefix
        allow[..., s - t:] = tree_ancestor_mask(p["parents"])
        allow[..., : s - t] = True
    for r in p["dead_rows"]:
        allow[..., r, :] = False
    if kind == "bool":
        return q, k, v, allow
    if kind == "float_bias":
        return q, k, v, torch.randn(*lead, t, s, generator=g).to(dtype)
    fill = float("-inf") if kind == "neg_inf" else torch.finfo(dtype).min
    return q, k, v, torch.zeros(allow.shape, dtype=dtype).masked_fill(~allow, fill)


def sdpa(q, k, v, m, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale, enable_gqa=True)


# ---------------------------------------------------------------------------------------------
# CPU op path
# ---------------------------------------------------------------------------------------------
@settings(deadline=None, max_examples=150, database=None, suppress_health_check=list(HealthCheck))
@given(p=problems(), slice_cache=st.booleans())
def test_op_cpu_matches_reference_and_sdpa(p, slice_cache):
    q, k, v, m = make_inputs(p, slice_cache=slice_cache)
    scale = p["d"] ** -0.5
    out = torch.ops.propd.tree_attention.default(q, k, v, m, scale)
    assert out.shape == q.shape and out.is_contiguous()
    ref = tree_attention_reference(q, k, v, m, scale)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out, sdpa(q, k, v, m, scale), atol=1e-6, rtol=1e-6)
    for r in p["dead_rows"]:
        if p["kind"] in ("bool", "neg_inf"):  # fully masked row: 0, as CPU SDPA gives
            assert torch.all(out[:, :, r] == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_op_cpu_low_precision(dtype):
    p = dict(b=2, hkv=2, group=3, t=9, s=77, d=64, kind="bool", shape="b1", parents=[-1, 0, 0, 1, 1, 2, 3, 6, 7],
             dead_rows=[4], seed=1)
    q, k, v, m = make_inputs(p, dtype=dtype)
    out = tree_attention(q, k, v, m, 0.125)
    assert out.dtype == dtype
    torch.testing.assert_close(out, tree_attention_reference(q, k, v, m, 0.125), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("kind", ["bool", "neg_inf", "none"])
def test_opcheck(kind):
    p = dict(b=2, hkv=2, group=2, t=5, s=40, d=16, kind=kind, shape="b1", parents=[-1, 0, 0, 1, 2],
             dead_rows=[], seed=0)
    q, k, v, m = make_inputs(p)
    torch.library.opcheck(torch.ops.propd.tree_attention.default, (q, k, v, m, 0.25))


@pytest.mark.parametrize("keep_extern", [True, False])
def test_compile_cpu(keep_extern):
    from torch._inductor.utils import run_and_get_code

    p = dict(b=1, hkv=2, group=2, t=5, s=40, d=16, kind="bool", shape="11", parents=[-1, 0, 0, 1, 2],
             dead_rows=[3], seed=3)
    q, k, v, m = make_inputs(p, slice_cache=True)

    def f(q, k, v, m):
        return torch.ops.propd.tree_attention.default(q * 2, k, v, m, 0.25) + 1

    torch._dynamo.reset()
    # keep_extern: what the backend does on CPU; otherwise the triton_op decomposes into its body,
    # which on CPU is SDPA (must work too).
    ctx = inductor_patches("cpu") if keep_extern else torch._functorch.config.patch(decompose_custom_triton_ops=True)
    with ctx:
        out, codes = run_and_get_code(torch.compile(f, backend="inductor", fullgraph=True), q, k, v, m)
    torch._dynamo.reset()
    torch.testing.assert_close(out, tree_attention_reference(q * 2, k, v, m, 0.25) + 1, atol=2e-5, rtol=1e-5)
    if keep_extern:
        assert "torch.ops.propd.tree_attention.default" in "\n".join(codes)


def test_inductor_patches():
    import contextlib

    assert isinstance(inductor_patches("cuda"), contextlib.nullcontext)
    with inductor_patches("cpu"):
        assert torch._functorch.config.decompose_custom_triton_ops is False


def test_noncontiguous_kv_cache_slice():
    b, hkv, g, t, s, d, cap = 2, 3, 3, 8, 100, 32, 256
    cache_k = torch.randn(b, hkv, cap, d)
    cache_v = torch.randn(b, hkv, cap, d)
    k, v = cache_k[:, :, :s], cache_v[:, :, :s]
    assert not k.is_contiguous()
    q = torch.randn(b, hkv * g, t, d)
    m = torch.ones(t, s, dtype=torch.bool)
    m[:, s - t:] = tree_ancestor_mask([-1, 0, 0, 1, 1, 2, 5, 6])
    out = tree_attention(q, k, v, m, d**-0.5)
    torch.testing.assert_close(out, tree_attention_reference(q, k, v, m, d**-0.5), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out, tree_attention(q, k.contiguous(), v.contiguous(), m, d**-0.5))


def test_import_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # any `import triton` raises ImportError
        "import torch\n"
        "from propd_compile.kernels.tree_attention import HAS_TRITON, tree_attention, tree_attention_reference\n"
        "import propd_compile.kernels\n"
        "assert not HAS_TRITON\n"
        "q = torch.randn(1, 4, 3, 16); k = torch.randn(1, 2, 10, 16); v = torch.randn(1, 2, 10, 16)\n"
        "m = torch.rand(1, 1, 3, 10) > 0.3\n"
        "out = torch.ops.propd.tree_attention.default(q, k, v, m, 0.25)\n"
        "torch.testing.assert_close(out, tree_attention_reference(q, k, v, m, 0.25), atol=2e-5, rtol=1e-5)\n"
        "torch.library.opcheck(torch.ops.propd.tree_attention.default, (q, k, v, m, 0.25))\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


# ---------------------------------------------------------------------------------------------
# Triton kernel under TRITON_INTERPRET=1 (subprocess: the env var must precede `import triton`)
# ---------------------------------------------------------------------------------------------
def _interp_main(n_examples: int) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from propd_compile.kernels.tree_attention import tree_attention_triton

    @settings(deadline=None, max_examples=n_examples, database=None, suppress_health_check=list(HealthCheck))
    @given(p=problems(max_t=20, max_s=200, dims=(16, 32, 64)), slice_cache=st.booleans(),
           num_splits=st.sampled_from([None, 1, 2, 3]), block_m=st.sampled_from([None, 16, 32, 64]))
    def prop(p, slice_cache, num_splits, block_m):
        q, k, v, m = make_inputs(p, slice_cache=slice_cache)
        scale = p["d"] ** -0.5
        out = tree_attention_triton(q, k, v, m, scale, num_splits=num_splits, block_m=block_m)
        assert out.shape == q.shape and out.is_contiguous()
        torch.testing.assert_close(out, tree_attention_reference(q, k, v, m, scale), atol=2e-5, rtol=1e-5)

    prop()

    # low precision and head dim 128, fixed cases (one and several splits)
    p = dict(b=2, hkv=2, group=3, t=9, s=150, d=64, kind="bool", shape="b1",
             parents=[-1, 0, 0, 1, 1, 2, 3, 6, 7], dead_rows=[4], seed=1)
    for dtype in (torch.float16, torch.bfloat16):
        q, k, v, m = make_inputs(p, dtype=dtype, slice_cache=True)
        for ns in (1, 3):
            out = tree_attention_triton(q, k, v, m, 0.125, num_splits=ns)
            assert out.dtype == dtype
            torch.testing.assert_close(out.float(), tree_attention_reference(q, k, v, m, 0.125).float(),
                                       atol=2e-2, rtol=2e-2)
    p = dict(p, d=128, kind="neg_inf", shape="full", hkv=1, group=4)
    q, k, v, m = make_inputs(p, slice_cache=True)
    for ns in (None, 1, 2):
        out = tree_attention_triton(q, k, v, m, 128**-0.5, num_splits=ns)
        torch.testing.assert_close(out, tree_attention_reference(q, k, v, m, 128**-0.5), atol=2e-5, rtol=1e-5)
    print("interp ok")


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_kernel_interpreted():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, HERE, "--interp", "60"], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=600)
    assert r.returncode == 0 and "interp ok" in r.stdout, (r.stdout + r.stderr)[-6000:]


def _fake_cuda_main() -> None:
    """Trace the op's CUDA body (the triton_op decomposition Inductor sees) on fake CUDA tensors
    with symbolic T and S, without a GPU: triton's driver is stubbed with an sm90 target so the
    kernels' TTIR (used to find which arguments they mutate) can be generated."""
    import triton
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    from triton.backends.compiler import GPUTarget

    class _StubDriver:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    triton.runtime.driver.set_active(_StubDriver())

    def f(q, k, v, m):
        return torch.ops.propd.tree_attention.default(q, k, v, m, 0.125) * 2

    for dynamic, mask_dtype in ((False, torch.bool), (True, torch.bool), (True, torch.float16)):
        env = ShapeEnv()

        def sym(name, hint):
            return env.create_symintnode(env.create_symbol(hint, ConstantSource(name)), hint=hint) if dynamic else hint

        with FakeTensorMode(shape_env=env):
            t, s = sym("T", 5), sym("S", 3000)
            q = torch.empty(2, 6, t, 64, device="cuda", dtype=torch.float16)
            k = torch.empty_strided((2, 2, s, 64), (2 * 4096 * 64, 4096 * 64, 64, 1), device="cuda",
                                    dtype=torch.float16)  # slice of a 4096-long cache
            v = torch.empty(2, 2, s, 64, device="cuda", dtype=torch.float16)
            m = torch.empty(1, 1, t, s, dtype=mask_dtype, device="cuda")
            assert f(q, k, v, m).shape == q.shape
        make_fx(dispatch_functionalize(lambda *xs: xs), tracing_mode="real")(q, k, v, m)
        n_input_guards = len(env.guards)  # make_fx's own input metadata (k's contiguity: S != 4096)
        gm = make_fx(dispatch_functionalize(f), tracing_mode="real")(q, k, v, m)
        code = gm.code
        assert code.count("triton_kernel_wrapper_functional(") == 2, code  # split + merge kernels
        assert "scaled_dot_product" not in code, code
        # only the outputs/partials are written (TTIR mutation analysis worked)
        assert "tensors_to_clone = ['Mpart', 'Lpart', 'Apart']" in code, code
        new_guards = env.guards[n_input_guards:]
        assert not new_guards, [(str(g.expr), g.sloc) for g in new_guards]  # no recompiles as T / S grow
    print("fake cuda ok")


def _sm90_compile_main() -> None:
    """Compile the kernels ahead of time for sm90 (H100) without a GPU, with the specializations a
    real launch gets (unit strides, 16-divisible pointers/strides), and check ptxas reports no
    register spills where cuobjdump is available."""
    import shutil

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource

    ta = sys.modules["propd_compile.kernels.tree_attention"]
    target = GPUTarget("cuda", 90, 32)
    fn = ta._tree_attn_split_kernel
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    cuobjdump = cuobjdump if os.path.exists(cuobjdump) else shutil.which("cuobjdump")

    def check(kernel, what):
        assert kernel.asm.get("cubin"), what
        if cuobjdump:
            path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"propd_ta_{os.getpid()}.cubin")
            with open(path, "wb") as f:
                f.write(kernel.asm["cubin"])
            usage = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True).stdout
            os.unlink(path)
            assert "STACK:0 " in usage, (what, usage)  # no spills
        print(what, "ok", flush=True)

    ones = ["sqd", "skd", "svd", "sms"]
    ints = ["sqb", "sqh", "sqt", "skb", "skh", "sks", "svb", "svh", "svs", "smb", "smh", "smt", "Hkv", "T", "S",
            "split_len", "num_splits"]
    div16 = ["Q", "K", "V", "Out", "Mpart", "Lpart", "Apart", "sqb", "sqh", "sqt", "skb", "skh", "sks", "svb", "svh",
             "svs", "split_len"]
    for dt, mask, single, d, rows in (("fp16", "bool", True, 64, 27), ("bf16", "float", False, 128, 64),
                                      ("fp32", "none", False, 128, 64)):
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dt]
        block_m, block_n, _, _ = ta._plan(8, rows, 4096, d, dtype, torch.device("cuda"))
        ptr = "*" + dt
        sig = {"Q": ptr, "K": ptr, "V": ptr, "Mask": "*i1" if mask == "bool" else ptr, "Out": ptr,
               "Mpart": "*fp32", "Lpart": "*fp32", "Apart": "*fp32", **{n: "i32" for n in ints}, "scale": "fp32"}
        const = dict(G=3, D=d, BLOCK_M=block_m, BLOCK_N=block_n, HAS_MASK=mask != "none", MASK_BOOL=mask == "bool",
                     SINGLE=single, DOT_PREC="ieee" if dt == "fp32" else None, DOT_F32=False, **{n: 1 for n in ones})
        sig.update({n: "constexpr" for n in const})
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div16}
        k = triton.compile(ASTSource(fn, sig, const, attrs), target=target,
                           options=dict(num_warps=8 if block_m * d > 64 * 64 else 4, num_stages=2))
        check(k, f"split kernel {dt} mask={mask} single={single} D={d} BLOCK_M={block_m}")
    sig = {"Out": "*fp16", "Mpart": "*fp32", "Lpart": "*fp32", "Apart": "*fp32", "rows": "i32", "num_splits": "i32",
           "D": "constexpr", "BLOCK_R": "constexpr"}
    k = triton.compile(ASTSource(ta._tree_attn_reduce_kernel, sig, dict(D=128, BLOCK_R=16)), target=target,
                       options=dict(num_warps=4))
    check(k, "reduce kernel D=128")
    print("sm90 ok")


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_kernels_compile_for_sm90():
    r = subprocess.run([sys.executable, HERE, "--sm90"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0 and "sm90 ok" in r.stdout, (r.stdout + r.stderr)[-6000:]


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_cuda_body_traces_with_symbolic_shapes():
    r = subprocess.run([sys.executable, HERE, "--fake-cuda"], capture_output=True, text=True, cwd=ROOT,
                       timeout=600)
    assert r.returncode == 0 and "fake cuda ok" in r.stdout, (r.stdout + r.stderr)[-6000:]


@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON, reason="needs CUDA + triton")
@settings(deadline=None, max_examples=100, database=None, suppress_health_check=list(HealthCheck))
@given(p=problems(max_t=128, max_s=3000, dims=(64, 128)), slice_cache=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_op_cuda_matches_reference(p, slice_cache, dtype):
    q, k, v, m = (x if x is None else x.cuda() for x in make_inputs(p, dtype=dtype, slice_cache=slice_cache))
    scale = p["d"] ** -0.5
    out = torch.ops.propd.tree_attention.default(q, k, v, m, scale)
    tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.float(), tree_attention_reference(q, k, v, m, scale).float(), **tol)


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--interp":
        _interp_main(int(sys.argv[2]) if len(sys.argv) > 2 else 25)
    elif len(sys.argv) >= 2 and sys.argv[1] == "--fake-cuda":
        _fake_cuda_main()
    elif len(sys.argv) >= 2 and sys.argv[1] == "--sm90":
        import propd_compile.kernels  # noqa: F401

        _sm90_compile_main()
    else:
        sys.exit(pytest.main([HERE, "-q"]))
