"""Sweep ProPD's early pruning on SmolLM2-135M-Instruct / MT-Bench: L_e x k, same run.

For every prune layer L_e (early head from --heads DIR/layer<L_e> when present, else the logit
lens; --lens adds the lens next to a head) and every k, decodes the same MT-Bench turn-1 prompts
through the compiled runtime (--batch rows at a time, default 1; fixed trees of up to --nodes
nodes from the default drafters) and reports: pruned fraction, mean accepted tokens per step
(vs the unpruned baseline of the same run), verification step latency (the compiled forward
alone, on the same recorded tree steps for both graphs, calls alternating) and whether every
output is token-identical to the unpruned run. Changing k reuses the compiled graph (k is read at run time).

    OMP_NUM_THREADS=1 python examples/sweep_early_prune.py --layers 4 8 12 --ks 1000 4000 12000 \
        --heads DIR --lens --per-category 1 --max-new-tokens 64 --json sweep.json
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from propd_compile import ProPDConfig, accelerate
from propd_compile.models import load
from propd_compile.prompts import chat_prompt, mt_bench_sample


def timed_forward(model, config: ProPDConfig, times: list[float], record: list | None = None, every: int = 8):
    """Wrap the compiled forward `generate` will use for `config` so each call's time is recorded;
    with `record`, every `every`-th tree step's inputs (a copy of the cache included) are kept.
    Returns the unwrapped forward."""
    from propd_compile.drafters import build_drafter

    forwards = model.propd.forwards
    forward = model.propd.forward(config, hidden=build_drafter(config, model).needs_hidden)
    key = next(k for k, v in forwards.items() if v is forward)

    def timed(ids, mask, pos, cache, last_only=False):
        if last_only:  # the prompt (prefill), not a verification step
            return forward(ids, mask, pos, cache, last_only=True)
        if record is not None and ids.shape[1] > 1 and len(times) % every == 0:
            record.append((ids, mask, pos, copy.deepcopy(cache)))
        t0 = time.perf_counter()
        out = forward(ids, mask, pos, cache)
        times.append(time.perf_counter() - t0)
        return out

    forwards[key] = timed
    return forward


def run(model, tokenizer, prompts: list[str], config: ProPDConfig, max_new: int, record: list | None = None,
        batch: int = 1) -> dict:
    accelerate(model, config)
    times: list[float] = []
    forward = timed_forward(model, config, times, record)
    outs, acc, pruned, nodes, steps, row_steps = [], 0.0, 0, 0, 0, 0
    t0 = time.perf_counter()
    tokenizer.padding_side = "left"
    for i in range(0, len(prompts), batch):
        ids = tokenizer(prompts[i : i + batch], return_tensors="pt", padding=True)
        out = model.generate(**ids, max_new_tokens=max_new)
        s = model.propd.stats
        outs.extend(out.tolist())
        acc += sum(s.accepted)
        row_steps += s.row_steps
        pruned += s.pruned_nodes
        nodes += sum(s.tree_sizes)
        steps += s.steps
    return {
        "outputs": outs, "mean_accepted": acc / max(row_steps, 1), "pruned_fraction": pruned / max(nodes, 1),
        "mean_tree_nodes": nodes / max(row_steps, 1), "median_step_ms": 1e3 * statistics.median(times),
        "steps": steps, "seconds": time.perf_counter() - t0, "forward": forward,
    }


@torch.no_grad()
def interleaved_latency(base_forward, forward, recorded: list, repeats: int = 3) -> tuple[float, float, float]:
    """Median ms of the unpruned and the pruned forward on the same recorded tree steps, calls
    alternating so that machine drift hits both; and the fraction of rows the pruned graph kept
    out of its deep layers on those steps."""
    tb, tp, deep, total = [], [], 0, 0
    for ids, mask, pos, cache in recorded:
        for _ in range(repeats):
            for fwd, out in ((base_forward, tb), (forward, tp)):
                c = copy.deepcopy(cache)
                c.begin_step(mask)
                t0 = time.perf_counter()
                fwd(ids, mask, pos, c)
                out.append(time.perf_counter() - t0)
                c.end_step()
        deep += int(c.keep[:, : ids.shape[1]].sum(1).max()) * ids.shape[0]
        total += ids.numel()
    return 1e3 * statistics.median(tb), 1e3 * statistics.median(tp), 1 - deep / max(total, 1)


def markdown(result: dict) -> str:
    """The sweep as a BENCHMARKS.md table."""
    b = result["baseline"]
    lines = [
        f"Batch {result['batch']}. Unpruned baseline: {b['mean_accepted']:.3f} accepted tokens/step, "
        f"{b['mean_tree_nodes']:.1f} nodes/step, "
        f"median verification step while decoding {b['median_step_ms']:.1f} ms (again at the end: "
        f"{result['baseline_end']['median_step_ms']:.1f} ms). Step ms columns: the same "
        f"{result['latency_steps']} recorded tree steps through the unpruned and the pruned graph, calls "
        "alternating, median.",
        "",
        "| L_e | predictor | k | pruned fraction | accepted/step | vs unpruned | step ms unpruned | step ms pruned | ratio | identical |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['layer']} | {r['predictor']} | {r['k']} | {r['pruned_fraction']:.3f} | {r['mean_accepted']:.3f} | "
            f"{100 * r['accepted_change']:+.1f}% | {r['base_step_ms']:.1f} | {r['step_ms']:.1f} | "
            f"{r['step_ms'] / r['base_step_ms']:.2f}x | {r['identical']}/{r['prompts']} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 8, 12])
    ap.add_argument("--ks", type=int, nargs="+", default=[1000, 4000, 12000])
    ap.add_argument("--heads", default=None, help="directory with early heads in layer<L>/ (else the logit lens)")
    ap.add_argument("--lens", action="store_true", help="also sweep the logit lens where a head exists")
    ap.add_argument("--nodes", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1, help="rows decoded together (left-padded prompts)")
    ap.add_argument("--per-category", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=None, help="use only the first N prompts")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--latency-steps", type=int, default=12, help="recorded tree steps for the interleaved timing")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load()
    prompts = [chat_prompt(tokenizer, q.turns[0]) for q in mt_bench_sample(args.per_category)][: args.prompts]
    base_cfg = ProPDConfig(compile=True, tree="fixed", max_tree_nodes=args.nodes)

    t0 = time.perf_counter()
    recorded: list = []
    base = run(model, tokenizer, prompts, base_cfg, args.max_new_tokens, record=recorded, batch=args.batch)
    recorded = recorded[:: max(len(recorded) // args.latency_steps, 1)][: args.latency_steps]
    print(f"baseline: accepted {base['mean_accepted']:.3f} nodes {base['mean_tree_nodes']:.1f} "
          f"step {base['median_step_ms']:.1f} ms ({base['seconds']:.0f} s incl. compile)", flush=True)
    rows = []
    for layer in args.layers:
        head_dir = Path(args.heads) / f"layer{layer}" if args.heads else None
        predictors = []
        if head_dir is not None and head_dir.exists():
            predictors.append(("early head", str(head_dir)))
        if not predictors or args.lens:
            predictors.append(("logit lens", "lens"))
        for name, head in predictors:
            for k in args.ks:
                cfg = base_cfg.with_(prune=True, prune_layer=layer, prune_topk=k, prune_head=head)
                r = run(model, tokenizer, prompts, cfg, args.max_new_tokens, batch=args.batch)
                base_ms, prune_ms, rows_pruned = interleaved_latency(base["forward"], r["forward"], recorded)
                row = {
                    "layer": layer, "predictor": name, "k": k, "pruned_fraction": r["pruned_fraction"],
                    "mean_accepted": r["mean_accepted"], "accepted_change": r["mean_accepted"] / base["mean_accepted"] - 1,
                    "step_ms": prune_ms, "base_step_ms": base_ms, "latency_rows_pruned": rows_pruned,
                    "decode_step_ms": r["median_step_ms"],
                    "identical": sum(a == b for a, b in zip(r["outputs"], base["outputs"])), "prompts": len(prompts),
                    "mean_tree_nodes": r["mean_tree_nodes"],
                }
                rows.append(row)
                print(f"L_e={layer:2d} {name:10s} k={k:5d}: pruned {row['pruned_fraction']:.3f} accepted "
                      f"{row['mean_accepted']:.3f} ({100 * row['accepted_change']:+.1f}%) step {prune_ms:.1f} vs "
                      f"{base_ms:.1f} ms identical {row['identical']}/{len(prompts)}", flush=True)
    base2 = run(model, tokenizer, prompts, base_cfg, args.max_new_tokens, batch=args.batch)
    result = {
        "baseline": {k: v for k, v in base.items() if k not in ("outputs", "forward")},
        "baseline_end": {k: v for k, v in base2.items() if k not in ("outputs", "forward")},
        "latency_steps": len(recorded), "rows": rows, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
        "nodes": args.nodes, "batch": args.batch, "threads": args.threads, "seconds": time.perf_counter() - t0,
    }
    print(markdown(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
