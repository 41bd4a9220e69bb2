"""Static tree sizes against the dynamic tree and plain decoding, batch 1, same kernels.

Every method runs every prompt in turn (the order reversed on the second repeat), so a noisy
machine shifts all of them alike; reported per method: the time of the plain row over its own
(summed over the prompts, per repeat) and tokens per step. `fixed N` verifies the drafters' best
N nodes every step, so its tokens per step is what a tree of that size accepts, and its speed
what that size costs on these kernels; the dynamic tree should match the best of them.

    python examples/tree_size_sweep.py --threads 2 --sizes 2 3 4 6 8
"""
from __future__ import annotations

import argparse
import time

import torch

from propd_compile import ProPDConfig, accelerate, models, prompts
from propd_compile.bench import _batch, mt_bench_prompts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sizes", type=int, nargs="+", default=[2, 3, 4, 6, 8])
    p.add_argument("--per-category", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = models.load()
    items = mt_bench_prompts(tok, prompts.mt_bench_sample(args.per_category))
    pad = model.generation_config.pad_token_id or 0
    encs = [_batch([item], pad) for item in items]
    configs = {"plain": ProPDConfig(max_tree_nodes=1, compile=True), "dynamic": ProPDConfig(compile=True)}
    configs.update({f"fixed {n}": ProPDConfig(tree="fixed", max_tree_nodes=n, compile=True) for n in args.sizes})
    seconds = {name: [0.0] * args.repeats for name in configs}
    tokens = {name: [0, 0] for name in configs}  # new tokens, row steps
    for config in configs.values():  # first calls: load the kernels, warm each config's planner
        accelerate(model, config).generate(**encs[0], max_new_tokens=16, pad_token_id=pad)
    for rep in range(args.repeats):
        for enc in encs:
            for name in (list(configs) if rep % 2 == 0 else list(configs)[::-1]):
                accelerate(model, configs[name])  # one state: each config keeps its own planner
                t = time.perf_counter()
                model.generate(**enc, max_new_tokens=args.max_new_tokens, pad_token_id=pad)
                seconds[name][rep] += time.perf_counter() - t
                stats = model.propd.stats
                tokens[name][0] += stats.new_tokens
                tokens[name][1] += stats.row_steps
    print(f"| method | plain time / its time, per repeat | tokens per step |\n|---|---|---|")
    for name in configs:
        ratios = " / ".join(f"{seconds['plain'][r] / seconds[name][r]:.3f}" for r in range(args.repeats))
        print(f"| {name} | {ratios} | {tokens[name][0] / tokens[name][1]:.3f} |")


if __name__ == "__main__":
    main()
