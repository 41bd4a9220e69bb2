"""Micro-benchmark of `propd::tree_attention`: a token tree of T queries over a KV cache of S.

CUDA: the split-KV Triton kernel (`tree_attention_triton`, the op's CUDA path) vs
`F.scaled_dot_product_attention` with the dense mask (enable_gqa=True, and with K/V expanded by
`repeat_kv` inside the timed region, as HF eager attention does), for T in {1,4,8,16,32,64},
S in {512,2048,8192}, B in {1,8}, SmolLM2-like heads (Hq=9, Hkv=3, D=64) and Llama-7B-like
(32/32/128). Median latency from torch.cuda.Event timing (warmup + repeats; each call replayed from
a CUDA graph unless --no-graph) and achieved bandwidth = bytes of K+V+Q+mask read and output
written / time.

CPU: times the op's CPU path (SDPA) vs SDPA with repeat_kv on a smaller grid, just to show it runs.

    python examples/bench_tree_attention.py                 # CUDA if available, else CPU
    python examples/bench_tree_attention.py --device cpu --quick
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from propd_compile.kernels.tree_attention import HAS_TRITON, tree_attention, tree_attention_triton

MODELS = {"smollm2": (9, 3, 64), "llama7b": (32, 32, 128)}


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """transformers' repeat_kv: [B, Hkv, S, D] -> [B, Hkv * n_rep, S, D]."""
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def make_problem(b, hq, hkv, d, t, s, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    cap = s + 128  # K/V are views of a longer preallocated cache (non-contiguous along S)
    q = torch.randn(b, hq, t, d, generator=g).to(device, dtype)
    kc = torch.randn(b, hkv, cap, d, generator=g).to(device, dtype)
    vc = torch.randn(b, hkv, cap, d, generator=g).to(device, dtype)
    k, v = kc[:, :, :s], vc[:, :, :s]
    # prefix visible; the last T positions hold a random token tree (ancestor mask)
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, t)]
    anc = torch.eye(t, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            anc[i] |= anc[p]
    mask = torch.ones(b, 1, t, s, dtype=torch.bool)
    mask[..., s - t:] = anc
    return q, k, v, mask.to(device)


def nbytes(q, k, v, mask):
    return (k.numel() + v.numel() + 2 * q.numel()) * q.element_size() + mask.numel() * mask.element_size()


def time_cuda(fn, warmup, repeats):
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    torch.cuda.synchronize()
    for st, en in zip(starts, ends):
        st.record()
        fn()
        en.record()
    torch.cuda.synchronize()
    return statistics.median(st.elapsed_time(en) for st, en in zip(starts, ends)) * 1e-3  # seconds


def cuda_graphed(fn):
    """Capture `fn` in a CUDA graph (after a warmup that JIT-compiles the kernels); returns replay,
    so the timing is GPU time without Python launch overhead (as under torch.compile + CUDA graphs)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def time_cpu(fn, warmup, repeats):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float16|bfloat16|float32 (default fp16 on CUDA, fp32 on CPU)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="small grid")
    ap.add_argument("--threads", type=int, default=None, help="CPU: torch.set_num_threads (on a loaded "
                    "machine 1 thread avoids OpenMP spin-wait stalls)")
    ap.add_argument("--no-graph", action="store_true", help="CUDA: time eager calls (incl. launch overhead) "
                    "instead of CUDA-graph replays")
    args = ap.parse_args()

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if cuda else torch.float32)
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    repeats = args.repeats if args.repeats is not None else (50 if cuda else 5)
    if cuda and not args.quick:
        tree_sizes, kv_lens, batches = (1, 4, 8, 16, 32, 64), (512, 2048, 8192), (1, 8)
    elif cuda:
        tree_sizes, kv_lens, batches = (1, 16, 64), (512, 8192), (1, 8)
    elif args.quick:
        tree_sizes, kv_lens, batches = (1, 16), (512,), (1,)
    else:
        tree_sizes, kv_lens, batches = (1, 16, 64), (512, 2048), (1,)
    timer = time_cuda if cuda else time_cpu
    use_triton = cuda and HAS_TRITON

    main_name = "triton" if use_triton else "op (CPU: SDPA)"
    mode = ("CUDA-graph replay" if not args.no_graph else "eager") if cuda else "eager"
    print(f"device={device} ({torch.cuda.get_device_name(device) if cuda else 'cpu'}), dtype={dtype}, {mode}, "
          f"warmup={warmup}, repeats={repeats}, median latency; GB/s = (K+V+Q+mask+out bytes) / time\n")
    print(f"| model | B | S | T | {main_name} µs | GB/s | SDPA gqa µs | GB/s | SDPA repeat_kv µs | GB/s "
          f"| speedup vs best SDPA | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        hq, hkv, d = MODELS[model]
        scale = d**-0.5
        for b in batches:
            for s in kv_lens:
                for t in tree_sizes:
                    q, k, v, mask = make_problem(b, hq, hkv, d, t, s, dtype, device)
                    if use_triton:
                        ours = lambda: tree_attention_triton(q, k, v, mask, scale)  # noqa: E731
                    else:
                        ours = lambda: tree_attention(q, k, v, mask, scale)  # noqa: E731
                    sdpa_gqa = lambda: F.scaled_dot_product_attention(  # noqa: E731
                        q, k, v, attn_mask=mask, scale=scale, enable_gqa=hq != hkv)
                    sdpa_rep = lambda: F.scaled_dot_product_attention(  # noqa: E731
                        q, repeat_kv(k, hq // hkv), repeat_kv(v, hq // hkv), attn_mask=mask, scale=scale)
                    with torch.no_grad():
                        diff = (ours().float() - sdpa_gqa().float()).abs().max().item()
                        if cuda and not args.no_graph:
                            ours, sdpa_gqa, sdpa_rep = map(cuda_graphed, (ours, sdpa_gqa, sdpa_rep))
                        t_ours = timer(ours, warmup, repeats)
                        t_gqa = timer(sdpa_gqa, warmup, repeats)
                        t_rep = timer(sdpa_rep, warmup, repeats)
                    nb = nbytes(q, k, v, mask)
                    gbs = lambda sec: nb / sec / 1e9  # noqa: E731
                    print(f"| {model} | {b} | {s} | {t} | {t_ours * 1e6:.1f} | {gbs(t_ours):.1f} "
                          f"| {t_gqa * 1e6:.1f} | {gbs(t_gqa):.1f} | {t_rep * 1e6:.1f} | {gbs(t_rep):.1f} "
                          f"| {min(t_gqa, t_rep) / t_ours:.2f}x | {diff:.1e} |", flush=True)
                    del q, k, v, mask


if __name__ == "__main__":
    main()
