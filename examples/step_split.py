"""Where a decoding call's time goes: plain-compiled vs the default decoder on one batch.

The speculative gain at a batch size is the plain steps' forwards, the speculative steps'
forwards and everything else (prefill, drafting, planning, bookkeeping). This runs one batch of
MT-Bench prompts through both configs, interleaved, and prints each call's forward seconds by step
kind (one node per row, or a tree) and the rest, plus the package's resident memory. Needs the
package (`propd warmup`).

    python examples/step_split.py --batch 32 --max-new-tokens 128 --turn2 --threads 2
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from propd_compile import ProPDConfig, accelerate, bench, models
from propd_compile.api import propd_generate
from propd_compile import planner as planner_mod
from propd_compile import prompts


def _rss_mib() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--turn2", action="store_true", help="turn-2 prompts (after HF greedy's turn-1 answer)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = models.load()
    before = _rss_mib()
    configs = {"plain-compiled": ProPDConfig(max_tree_nodes=1, compile=True), "propd": ProPDConfig(compile=True)}
    model = accelerate(model)
    answer = (lambda texts: bench.hf_answers(model, tok, texts, args.max_new_tokens, 32)) if args.turn2 else None
    ps = bench.mt_bench_prompts(tok, prompts.mt_bench_sample(2), turn2=args.turn2, answer=answer)
    enc = bench._batch(ps[: args.batch], tok.pad_token_id)

    steps: list[tuple[int, float]] = []  # (nodes per row, forward seconds) of each step
    observe = planner_mod.TreePlanner.observe

    def logged(self, trees, paths, seconds, batch, nodes, kv, kept=None, tokens=None):
        steps.append((nodes, seconds))
        return observe(self, trees, paths, seconds, batch, nodes, kv, kept, tokens)

    planner_mod.TreePlanner.observe = logged
    for config in configs.values():  # warm-up calls: loads, first steps
        propd_generate(model, **enc, config=config, max_new_tokens=16)
    print(f"resident memory: model {before:.0f} MiB, with its package and a first generate {_rss_mib():.0f} MiB")
    totals: dict[str, list[float]] = {k: [] for k in configs}
    for rep in range(args.repeats):
        for name in configs if rep % 2 == 0 else list(configs)[::-1]:
            steps.clear()
            t = time.perf_counter()
            propd_generate(model, **enc, config=configs[name], max_new_tokens=args.max_new_tokens)
            total = time.perf_counter() - t
            totals[name].append(total)
            plain = [s for n, s in steps if n == 1]
            tree = [s for n, s in steps if n > 1]
            print(f"{name:15s} {total:6.2f} s: {len(plain)} plain steps {sum(plain):6.2f} s "
                  f"({1e3 * statistics.median(plain) if plain else 0:.0f} ms each), {len(tree)} tree steps "
                  f"{sum(tree):5.2f} s, rest {total - sum(plain) - sum(tree):5.2f} s (prefill, drafting, bookkeeping)")
    base = statistics.median(totals["plain-compiled"])
    print(f"propd / plain-compiled (time ratio of medians): {base / statistics.median(totals['propd']):.3f}")


if __name__ == "__main__":
    main()
