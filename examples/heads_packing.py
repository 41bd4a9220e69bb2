"""Draft heads on Q8_0 copies of their weights (the block-format kernel) against fp32 heads.

Decoding is token-identical either way (drafts only change what gets accepted), so the two
are compared on the same prompts, interleaved call by call, at a fixed tree size so both run
the same trees: tokens per second, step time and tokens per step.

    python examples/heads_packing.py --threads 2 --tree-nodes 4 --prompts 4
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import propd_compile
from propd_compile import ProPDConfig, models
from propd_compile.heads import MedusaHeads
from propd_compile.prompts import chat_prompt, mt_bench_sample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tree-nodes", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = models.load()
    propd_compile.accelerate(model, ProPDConfig(tree="fixed", max_tree_nodes=args.tree_nodes, drafters=("heads", "ngram")))
    prompts = [tok(chat_prompt(tok, q.turns[0]), return_tensors="pt") for q in mt_bench_sample(1)[: args.prompts]]
    model.generate(**prompts[0], max_new_tokens=16)
    pack = MedusaHeads._pack
    runs: dict[str, list[tuple[float, int, int]]] = {"Q8_0 (packed)": [], "fp32": []}
    for rep in range(args.repeats):
        for enc in prompts:
            for name in (list(runs) if rep % 2 == 0 else list(runs)[::-1]):
                MedusaHeads._pack = pack if name.startswith("Q8_0") else (lambda self, w: ())  # fp32: nothing packed
                for built in model.propd.built.values():
                    if isinstance(built, MedusaHeads):
                        built._draft_weight = None  # drop the other mode's copies
                t0 = time.perf_counter()
                out = model.generate(**enc, max_new_tokens=args.max_new_tokens)
                runs[name].append((time.perf_counter() - t0, model.propd.stats.steps, out.shape[1] - enc.input_ids.shape[1]))
    MedusaHeads._pack = pack
    print("| heads | tokens/s | ms per step | tokens per step |\n|---|---|---|---|")
    for name, r in runs.items():
        seconds, steps, tokens = (sum(x[i] for x in r) for i in range(3))
        print(f"| {name} | {tokens / seconds:.1f} | {1000 * seconds / steps:.2f} | {tokens / steps:.2f} |")
    ratios = [b[0] / a[0] for a, b in zip(*runs.values())]
    print(f"fp32 time / Q8_0 time, median of {len(ratios)} calls: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
