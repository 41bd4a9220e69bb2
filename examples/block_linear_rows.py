"""All linear layers of the embedded model, by row count: MKL on the fp32 weights (`F.linear`,
what eager decoding runs) against `propd::block_linear` on the same weights in their exact block
format (what a package runs when every weight packs). Median of repeats, one call per layer.

    python examples/block_linear_rows.py --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from propd_compile import models
from propd_compile.kernels import block_linear as bl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 5, 8, 16, 32, 64])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not bl.available():
        raise SystemExit("the block-format kernel is unavailable here (see the log)")
    model, _ = models.load()
    layers = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            packed, why = bl.block_weight(mod.weight)
            if packed is None:
                raise SystemExit(f"{name}: {why}")
            layers.append((mod.weight.detach(), packed))
    print(f"{len(layers)} linears: {sum(w.numel() for w, _ in layers) * 4:,} fp32 bytes, "
          f"{sum(p.nbytes for _, p in layers):,} block-format bytes")
    print("| rows | MKL fp32 ms | block_linear ms | MKL / block_linear |\n|---|---|---|---|")
    for rows in args.rows:
        xs = {k: torch.randn(rows, k) for k in {w.shape[1] for w, _ in layers}}

        def median_ms(fn) -> float:
            fn()
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            return 1e3 * statistics.median(times)

        mkl = median_ms(lambda: [torch.nn.functional.linear(xs[w.shape[1]], w) for w, _ in layers])
        block = median_ms(lambda: [bl.block_linear(xs[w.shape[1]], p) for w, p in layers])
        print(f"| {rows} | {mkl:.1f} | {block:.1f} | {mkl / block:.2f} |")


if __name__ == "__main__":
    main()
