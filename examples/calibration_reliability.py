"""How well the planner's acceptance model predicts what verification accepts (no timing claim).

Decodes MT-Bench turn-1 prompts with the defaults and records, for every node whose parent was
accepted (a trial of the calibrator), the calibrated conditional the planner used against
whether the node was accepted, by drafter (heads or n-gram) and depth and by predicted value;
then the planner's expected tokens per row and step against the tokens accepted, binned
(the reliability table `propd bench` reports). Acceptance does not depend on timing, but which
trees the planner verifies does, so runs differ a little.

    python examples/calibration_reliability.py --threads 2 --per-category 2 --batch-size 1
"""
from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from propd_compile import ProPDConfig, accelerate, acceptance, models, prompts
from propd_compile.bench import _batch, mt_bench_prompts, reliability


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--per-category", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=128)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = models.load()
    items = mt_bench_prompts(tok, prompts.mt_bench_sample(args.per_category))
    pad = model.generation_config.pad_token_id or 0

    trials: list[tuple[str, int, float, bool]] = []  # (drafter, depth, calibrated conditional, accepted)
    observe = acceptance.AcceptanceModel.observe

    def recording_observe(self, trees, paths):
        for tree, path in zip(trees, paths):
            on_path, conf = set(path), acceptance.conditional_confidences(tree)
            for i in range(1, len(tree)):
                if tree.parents[i] in on_path:
                    c = self.calibrator.conditional(tree.depths[i], tree.head_ranks[i], conf[i], self.rank_stats)
                    source = "n-gram" if tree.head_ranks[i] == acceptance.NOT_FROM_HEADS else "heads"
                    trials.append((source, tree.depths[i], c, i in on_path))
        observe(self, trees, paths)

    acceptance.AcceptanceModel.observe = recording_observe
    accelerate(model, ProPDConfig())
    outcomes = []
    for i in range(0, len(items), args.batch_size):
        model.generate(**_batch(items[i : i + args.batch_size], pad), max_new_tokens=args.max_new_tokens, pad_token_id=pad)
        outcomes += model.propd.stats.outcomes

    def table(title: str, key) -> None:
        cells = defaultdict(lambda: [0, 0.0, 0])
        for source, depth, c, hit in trials:
            cell = cells[key(source, depth, c)]
            cell[0] += 1
            cell[1] += c
            cell[2] += hit
        print(f"\n| {title} | trials | predicted | accepted |\n|---|---|---|---|")
        for k in sorted(cells):
            n, c, hits = cells[k]
            print(f"| {k[0]}, {k[1]} | {n} | {c / n:.3f} | {hits / n:.3f} |")

    table("drafter, depth", lambda s, d, c: (s, min(d, 5)))
    table("drafter, predicted conditional from", lambda s, d, c: (s, min(int(c * 5), 4) / 5))
    print("\n| expected tokens per row (bin) | steps | predicted | accepted | error |\n|---|---|---|---|---|")
    for row in reliability(outcomes, rows=args.batch_size, min_steps=1) or []:
        lo, hi = row["bin"]
        error = "-" if row["error"] is None else f"{row['error']:+.1%}"
        print(f"| {lo}-{hi if hi is not None else 'inf'} | {row['steps']} | {row['predicted']:.2f} | {row['realized']:.2f} | {error} |")


if __name__ == "__main__":
    main()
