"""Per-step cost of per-node logits processing (`processing.py`) on the embedded model.

Decodes MT-Bench prompts with propd and HF's history-dependent options, and times every call of
`NodeProcessing` (all processors on every tree node, plus the float32 copy of the logits) against
the whole decode step. Greedy without such options has no processing at all.

    python examples/processing_overhead.py --threads 1                       # batch 1 and 4, 64 tokens
    python examples/processing_overhead.py --threads 1 --tree fixed --tree-nodes 32   # the largest trees
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from propd_compile import ProPDConfig, accelerate, models, prompts
from propd_compile.processing import NodeProcessing

OPTIONS = {
    "repetition_penalty=1.2": dict(repetition_penalty=1.2),
    "repetition_penalty=1.2, no_repeat_ngram_size=4": dict(repetition_penalty=1.2, no_repeat_ngram_size=4),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tree", default="dynamic", help="ProPDConfig.tree (fixed: the largest trees every step)")
    parser.add_argument("--tree-nodes", type=int, default=ProPDConfig.max_tree_nodes)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = models.load()
    accelerate(model, ProPDConfig(tree=args.tree, max_tree_nodes=args.tree_nodes))
    texts = [prompts.chat_prompt(tok, q.turns[0]) for q in prompts.mt_bench_sample(1)[: args.prompts]]

    calls: list[tuple[float, int]] = []  # (seconds, tree nodes in the call)
    untimed = NodeProcessing.__call__

    def timed(self, batch, logits, generated):
        t = time.perf_counter()
        out = untimed(self, batch, logits, generated)
        calls.append((time.perf_counter() - t, batch.tokens.numel()))
        return out

    NodeProcessing.__call__ = timed
    print("| options | batch | processing ms / step (median, p90) | step ms (mean) | share of the step | mean tree tokens |")
    print("|---|---|---|---|---|---|")
    for bs in args.batch_sizes:
        for name, options in OPTIONS.items():
            model.generate(**tok(texts[:bs], return_tensors="pt", padding=True), max_new_tokens=8, **options)  # warm-up
            calls.clear()
            steps = seconds = 0.0
            for i in range(0, len(texts), bs):
                enc = tok(texts[i : i + bs], return_tensors="pt", padding=True)
                model.generate(**enc, max_new_tokens=args.max_new_tokens, **options)
                steps += model.propd.stats.steps + 1  # + the prefill's processing call
                seconds += model.propd.stats.seconds
            ms = sorted(1e3 * s for s, _ in calls)
            step_ms = 1e3 * seconds / steps
            print(f"| {name} | {bs} | {statistics.median(ms):.2f}, {ms[int(0.9 * (len(ms) - 1))]:.2f} | {step_ms:.1f} "
                  f"| {sum(ms) / (1e3 * seconds):.1%} | {statistics.mean(n for _, n in calls):.1f} |")


if __name__ == "__main__":
    main()
