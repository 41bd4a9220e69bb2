"""`propd::tree_attention`: attention of a few tree queries over a KV cache, GQA folded.

query [B, Hq, T, D]; key, value [B, Hkv, S, D] with Hq % Hkv == 0 (query head h reads KV head
h // (Hq // Hkv), so K/V are never repeated); mask broadcastable to [B, Hq, T, S], bool (True =
attend) or additive float, or None; returns [B, Hq, T, D] contiguous. Semantics are exactly
`F.scaled_dot_product_attention(..., enable_gqa=True)`, including fully masked rows (bool mask or
-inf additive mask: output 0, as CPU SDPA gives; a finite huge negative like finfo.min is a
plain additive value, as in SDPA).

Paths
-----
* ``tree_attention`` (``torch.ops.propd.tree_attention.default``) is the public op.
  - With triton installed it is a ``torch.library.triton_op``: on CUDA with a supported problem
    (fp32/fp16/bf16, head dim a power of two in 16..256, same head dim for K and V) its body launches
    the split-KV Triton kernel below through ``wrap_triton``, so Inductor sees (and may inline) the
    user Triton kernels; anything else falls back to SDPA inside the body. The CPU kernel
    (``register_kernel("cpu")``) is eager SDPA with a dense mask, measured fastest on CPU.
  - Without triton it is a plain ``torch.library.custom_op`` with the same SDPA body and a fake
    kernel, so ``import propd_compile.kernels`` never needs triton.
* ``tree_attention_triton(query, key, value, mask, scale, *, num_splits=None, block_m=None)``
  launches the Triton kernel directly (no op dispatch). On CUDA tensors it is the GPU kernel; with
  ``TRITON_INTERPRET=1`` set *before triton is imported* it runs the same kernel on CPU tensors
  (slow, for tests; bf16 dots are done in fp32 there since numpy has no bf16 matmul).
* ``triton_supported(query, key, value, mask)``: whether the kernel handles the problem.
* ``HAS_TRITON``: whether triton imported.
* ``tree_attention_reference``: float64 written-out reference (no SDPA).

Compiling the op (for the backend)
----------------------------------
``inductor_patches(device_type)`` returns the context manager to wrap Inductor compilation in:
on CPU it is ``torch._functorch.config.patch(decompose_custom_triton_ops=False)`` so Inductor keeps
an extern call to ``torch.ops.propd.tree_attention.default`` (CPU kernel = SDPA) instead of
decomposing the triton_op (the decomposition is the op body; on CPU the body is SDPA, so it would
also work, but the extern eager SDPA is what was measured); on CUDA it is a ``nullcontext`` and the
op decomposes into the user Triton kernels. Usage::

    with inductor_patches(device.type):
        compiled = compile_fx(gm, example_inputs)

Kernel
------
Flash-decoding style. Grid (num_splits, B * Hkv, cdiv(G * T, BLOCK_M)) with G = Hq // Hkv: each
program owns one (batch, kv-head) pair and BLOCK_M rows of the flattened [G, T] query block (every
query head of the GQA group), so each K/V tile is loaded once for the whole group. It walks one
KV split with an online softmax (fp32 accumulation, ``tl.dot``; fp32 inputs use IEEE dots) and
writes partial (m, l, acc); a second kernel merges the splits. With a single split the first
kernel writes the normalized output directly. Masks of any broadcast shape are read through
their (expanded, stride-0) strides; bool masks are read as bytes. K/V are read through their
strides too (slices of a longer cache along S need no copy). Split planning only compares plain
ints: with symbolic S (dynamic shapes) the split length is fixed and the split count is arithmetic,
so the traced decomposition adds no shape guards (tested by tracing the CUDA body on fake tensors).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

try:  # triton is optional: the base package (CPU path) must import without it
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = tl = triton_op = wrap_triton = None
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON",
    "inductor_patches",
    "tree_attention",
    "tree_attention_reference",
    "tree_attention_triton",
    "triton_supported",
]


# --------------------------------------------------------------------------------------------------
# SDPA path (CPU kernel, fallback)
# --------------------------------------------------------------------------------------------------
def _sdpa(query, key, value, mask, scale):
    if mask is not None and mask.dtype != torch.bool and mask.dtype != query.dtype:
        mask = mask.to(query.dtype)
    enable_gqa = bool(query.shape[1] != key.shape[1])  # guards on (static) head counts if symbolic
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=enable_gqa)
    return out.contiguous()  # fake strides are contiguous; SDPA may return transposed strides


def _fake(query, key, value, mask, scale):
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_supported(query, key, value, mask=None) -> bool:
    """True when the Triton kernel handles this problem (device aside)."""
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return False
    d = int(query.shape[-1])  # head dims are static in practice; specialize if symbolic
    if d < 16 or d > 256 or d & (d - 1):
        return False
    if int(key.shape[-1]) != d or int(value.shape[-1]) != d:
        return False
    if query.dtype not in _DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        return False
    if query.shape[1] % key.shape[1] != 0:
        return False
    t, s = query.shape[2], key.shape[2]
    if (isinstance(t, int) and t == 0) or (isinstance(s, int) and s == 0):  # empty grid: leave to SDPA
        return False
    if mask is not None and mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        return False
    return True


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _tree_attn_split_kernel(
        Q, K, V, Mask, Out, Mpart, Lpart, Apart,
        sqb, sqh, sqt, sqd,
        skb, skh, sks, skd,
        svb, svh, svs, svd,
        smb, smh, smt, sms,
        Hkv, T, S, split_len, num_splits, scale,
        G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, SINGLE: tl.constexpr,
        DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr,
    ):
        pid_s = tl.program_id(0)
        pid_bh = tl.program_id(1).to(tl.int64)
        pid_m = tl.program_id(2)
        b = pid_bh // Hkv
        hk = pid_bh % Hkv
        rows = G * T
        r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        r_ok = r < rows
        g = r // T
        t = r % T
        h = hk * G + g
        d = tl.arange(0, D)

        q = tl.load(Q + b * sqb + h[:, None] * sqh + t[:, None] * sqt + d[None, :] * sqd,
                    mask=r_ok[:, None], other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
        k_base = K + b * skb + hk * skh
        v_base = V + b * svb + hk * svh
        if HAS_MASK:
            m_rows = Mask + b * smb + h * smh + t * smt

        lo = pid_s * split_len
        hi = tl.minimum(lo + split_len, S)
        # m starts at -inf; `m_safe` (0 where m is still -inf) keeps fully masked tiles NaN-free
        # while finite huge-negative additive masks (finfo.min) behave exactly as in SDPA.
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_ok = n < hi
            k = tl.load(k_base + n[:, None] * sks + d[None, :] * skd, mask=n_ok[:, None], other=0.0)
            if DOT_F32:  # interpreter: numpy has no bf16 matmul (gives garbage); same math in fp32
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale
            if HAS_MASK:
                mv = tl.load(m_rows[:, None] + n[None, :] * sms, mask=r_ok[:, None] & n_ok[None, :], other=0)
                if MASK_BOOL:
                    s = tl.where(mv != 0, s, float("-inf"))
                else:
                    s = s + mv.to(tl.float32)
            s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + n[:, None] * svs + d[None, :] * svd, mask=n_ok[:, None], other=0.0)
            p = p.to(v.dtype)
            if DOT_F32:
                p = p.to(tl.float32)
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PREC)
            m_i = m_new

        if SINGLE:
            o = tl.where(l_i[:, None] > 0, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
            tl.store(Out + (pid_bh * rows + r)[:, None] * D + d[None, :], o.to(Out.dtype.element_ty),
                     mask=r_ok[:, None])
        else:
            idx = (pid_bh * num_splits + pid_s) * rows + r
            tl.store(Mpart + idx, m_i, mask=r_ok)
            tl.store(Lpart + idx, l_i, mask=r_ok)
            tl.store(Apart + idx[:, None] * D + d[None, :], acc, mask=r_ok[:, None])

    @triton.jit
    def _tree_attn_reduce_kernel(
        Out, Mpart, Lpart, Apart, rows, num_splits,
        D: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        pid_bh = tl.program_id(0).to(tl.int64)
        r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = r < rows
        d = tl.arange(0, D)
        m = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, D], tl.float32)
        for sp in range(0, num_splits):
            idx = (pid_bh * num_splits + sp) * rows + r
            m_s = tl.load(Mpart + idx, mask=r_ok, other=float("-inf"))
            l_s = tl.load(Lpart + idx, mask=r_ok, other=0.0)
            a_s = tl.load(Apart + idx[:, None] * D + d[None, :], mask=r_ok[:, None], other=0.0)
            m_new = tl.maximum(m, m_s)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_safe)
            beta = tl.exp(m_s - m_safe)
            l = l * alpha + l_s * beta
            acc = acc * alpha[:, None] + a_s * beta[:, None]
            m = m_new
        o = tl.where(l[:, None] > 0, acc / tl.where(l > 0, l, 1.0)[:, None], 0.0)
        tl.store(Out + (pid_bh * rows + r)[:, None] * D + d[None, :], o.to(Out.dtype.element_ty),
                 mask=r_ok[:, None])


def _cdiv(a, b):
    return (a + b - 1) // b


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter (or fake CUDA tensors in tests): a few splits, so the merge is exercised


_MIN_SPLIT_KEYS = 256  # fewer keys per split and the partial (m, l, acc) traffic stops paying off


def _plan(BH, rows, S, D, dtype, device, num_splits=None, block_m=None):
    """Pick (BLOCK_M, BLOCK_N, split_len, num_splits). Guard-free when shapes are symbolic: only
    plain ints are compared; a symbolic S only goes through arithmetic.

    Tile sizes were checked offline against sm90 register usage (ptxas, no spills with the usual
    stride-1 / 16-divisible specializations): fp16/bf16 up to 64x64 tiles at D<=128; fp32 (IEEE
    dots on CUDA cores) spills above BLOCK_M=16."""
    block_n = 64 if D <= 128 else 32
    if block_m is None:
        if dtype == torch.float32:
            block_m = 16
        elif isinstance(rows, int):
            block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64
        else:
            block_m = 64
        if D >= 256:
            block_m = min(block_m, 32)
    if num_splits is not None:
        split_len = _cdiv(_cdiv(S, num_splits), block_n) * block_n
    elif isinstance(S, int) and isinstance(rows, int) and isinstance(BH, int):
        q_blocks = _cdiv(rows, block_m)
        want = max(1, _cdiv(2 * _num_sms(device), BH * q_blocks))
        want = min(want, max(1, S // _MIN_SPLIT_KEYS))
        split_len = _cdiv(_cdiv(S, want), block_n) * block_n
    else:  # symbolic shapes: fixed split length, split count follows S arithmetically
        split_len = 1024
    split_len = max(split_len, block_n) if isinstance(split_len, int) else split_len
    return block_m, block_n, split_len, _cdiv(S, split_len)


def _launch(query, key, value, mask, scale, wrap, num_splits=None, block_m=None):
    B, Hq, T, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    D, G = int(D), int(Hq // Hkv)  # constexprs (head counts / dims are static in practice)
    rows = G * T
    BH = B * Hkv
    out = query.new_empty((B, Hq, T, D))
    if mask is not None:
        mask = mask.expand(B, Hq, T, S)
        # bool masks go in as-is (Triton reads torch.bool as 1-byte i1); a .view(torch.uint8)
        # here breaks functionalization when the triton_op is decomposed under torch.compile.
        mask_bool = mask.dtype == torch.bool
        m_arg, m_strides = mask, mask.stride()
    else:
        mask_bool = False
        m_arg, m_strides = query, (0, 0, 0, 0)
    block_m, block_n, split_len, n_splits = _plan(BH, rows, S, D, query.dtype, query.device, num_splits, block_m)
    single = isinstance(n_splits, int) and n_splits == 1
    if single:
        mp = lp = ap = out  # unused
    else:
        # flat buffers: multi-dim ones make Inductor guard on the (symbolic) split count
        mp = query.new_empty((BH * n_splits * rows,), dtype=torch.float32)
        lp = query.new_empty((BH * n_splits * rows,), dtype=torch.float32)
        ap = query.new_empty((BH * n_splits * rows * D,), dtype=torch.float32)
    dot_prec = "ieee" if query.dtype == torch.float32 else None  # None: backend default (fp16/bf16)
    dot_f32 = query.dtype == torch.bfloat16 and query.device.type != "cuda"  # TRITON_INTERPRET on CPU
    k1 = wrap_triton(_tree_attn_split_kernel) if wrap else _tree_attn_split_kernel
    k1[(n_splits, BH, _cdiv(rows, block_m))](
        query, key, value, m_arg, out, mp, lp, ap,
        *query.stride(), *key.stride(), *value.stride(), *m_strides,
        Hkv, T, S, split_len, n_splits, float(scale),
        G=G, D=D, BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_MASK=mask is not None, MASK_BOOL=mask_bool, SINGLE=single, DOT_PREC=dot_prec, DOT_F32=dot_f32,
        num_warps=8 if block_m * D > 64 * 64 else 4, num_stages=2,
    )
    if not single:
        block_r = 16 if D >= 128 else 32
        k2 = wrap_triton(_tree_attn_reduce_kernel) if wrap else _tree_attn_reduce_kernel
        k2[(BH, _cdiv(rows, block_r))](out, mp, lp, ap, rows, n_splits, D=D, BLOCK_R=block_r, num_warps=4)
    return out


def tree_attention_triton(
    query, key, value, mask, scale, *, num_splits: int | None = None, block_m: int | None = None
) -> torch.Tensor:
    """Launch the Triton kernel directly (CUDA tensors; or CPU tensors under TRITON_INTERPRET=1).

    `num_splits` / `block_m` (16, 32 or 64) override the heuristics (tests use them to exercise the
    merge kernel and every tile shape).
    """
    if not HAS_TRITON:
        raise RuntimeError("tree_attention_triton needs triton")
    if not triton_supported(query, key, value, mask):
        raise ValueError(
            f"unsupported tree_attention problem for the Triton kernel: q {tuple(query.shape)} {query.dtype}, "
            f"k {tuple(key.shape)} {key.dtype}, v {tuple(value.shape)}, mask {None if mask is None else mask.dtype}"
        )
    return _launch(query, key, value, mask, scale, wrap=False, num_splits=num_splits, block_m=block_m)


# --------------------------------------------------------------------------------------------------
# The op
# --------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton_op("propd::tree_attention", mutates_args=())
    def tree_attention(
        query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float
    ) -> torch.Tensor:
        # Also the fake kernel and the decomposition seen by Inductor: must be make_fx traceable.
        if query.device.type == "cuda" and triton_supported(query, key, value, mask):
            return _launch(query, key, value, mask, scale, wrap=True)
        return _sdpa(query, key, value, mask, scale)

    @tree_attention.register_kernel("cpu")
    def _(query, key, value, mask, scale):
        # CPU: eager SDPA with a dense mask measured fastest (../shared/research/compile-backend.md §3).
        return _sdpa(query, key, value, mask, scale)

else:

    @torch.library.custom_op("propd::tree_attention", mutates_args=())
    def tree_attention(
        query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float
    ) -> torch.Tensor:
        return _sdpa(query, key, value, mask, scale)

    tree_attention.register_fake(_fake)


def inductor_patches(device_type: str) -> contextlib.AbstractContextManager:
    """Context manager to compile graphs containing `propd::tree_attention` under (see module doc)."""
    import torch._functorch.config as functorch_config

    if device_type == "cuda" or not hasattr(functorch_config, "decompose_custom_triton_ops"):
        return contextlib.nullcontext()
    return functorch_config.patch(decompose_custom_triton_ops=False)


def tree_attention_reference(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Float64 reference, written out (no SDPA), for tests of every path."""
    q, k, v = query.double(), key.double(), value.double()
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.double()
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # fully masked rows
    return (probs @ v).to(query.dtype)
