"""What a one-token decode step costs per batch row at a long KV cache, compiled and eager.

A step's linear layers cost by real token, but attention reads every row's cache slice, finished
rows included. SmolLM2 has 9 query heads over 3 KV heads: HF's sdpa attention (and Inductor's CPU
flash-attention lowering of `enable_gqa`) repeats K/V 3 times per layer and step, while propd's
`ragged.grouped_sdpa` folds the query groups into the query length and reads the cache as it is.
This times one-token steps at a KV length (default 600, a turn-2 MT-Bench prompt plus its
answer) for batch sizes and for a batch of 32 with only some rows still decoding (ragged steps:
what a step cost while finished rows stayed in the cache; now they leave it,
`TreeKVCache.retire`, and the step costs the "k / k" row). Needs the package (`propd warmup`).

    python examples/step_kv_cost.py --threads 2
"""
from __future__ import annotations

import argparse
import statistics

import torch

from propd_compile import ProPDConfig, accelerate, models
from propd_compile.cost_model import measure_step
from propd_compile.decoding import eager_forward


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kv", type=int, default=600)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = models.load()
    accelerate(model)
    kernels = {
        "compiled": model.propd.forward(ProPDConfig(compile=True), hidden=True),
        "eager": eager_forward(model, hidden=True),
    }
    shapes = [(1, None), (4, None), (8, None), (32, None), (32, 8), (32, 1)]  # (batch, rows still decoding)
    print(f"| rows (active / batch) | {' | '.join(f'{k} ms' for k in kernels)} |")
    print("|---|" + "---|" * len(kernels))
    with torch.no_grad():
        for batch, active in shapes:
            sizes = None if active is None else [1] * active + [0] * (batch - active)
            cells = []
            for forward in kernels.values():
                measure_step(model, forward, batch, 1, args.kv, sizes=sizes)  # first call out of the data
                ms = [1e3 * measure_step(model, forward, batch, 1, args.kv, sizes=sizes) for _ in range(args.repeats)]
                cells.append(f"{statistics.median(ms):.1f}")
            print(f"| {active or batch} / {batch} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
