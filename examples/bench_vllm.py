"""vLLM benchmark: no speculation vs vLLM's own n-gram (K=4) vs the propd proposer, same run.

Run from the project venv; it builds vLLM's venv if needed (`propd_compile.integrations.vllm_env`)
and runs `propd_compile.integrations.vllm_run` there, one engine per method, all up for the whole
run, the methods back to back in every (concurrency, repeat) cell. Prints a markdown table:
tokens/s (median over repeats), speedup (median of same-repeat ratios to no speculation), tokens
per decode step (accepted + bonus), drafted tokens per decode step (overall, and per request:
p10 / p50 / p90), the share of drafted tokens accepted, outputs identical to no speculation's,
and at concurrency 1 the per-category speedups.

    python examples/bench_vllm.py --json bench_results/vllm.json
    python examples/bench_vllm.py --table bench_results/vllm.json     # the table of a saved run
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from propd_compile.integrations import vllm_env


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=10, method="inclusive")[int(q * 10) - 1] if len(values) > 1 else (values or [0])[0]


def table(report: dict) -> str:
    a = report["args"]
    lines = [
        f"{len(report['cells'][0]['requests'])} MT-Bench turn-1 prompts, {a['max_tokens']} new tokens, greedy, "
        f"{a['dtype']}, enforce_eager, {a['repeats']} repeat(s), vLLM {report['vllm']}; propd K <= {a['k']}, "
        f"vLLM ngram K = 4 (prompt lookup 1..4).",
        "",
        "| method | concurrency | tokens/s | speedup vs no-spec | tokens/step | drafted/step (p10 / p50 / p90 per request) "
        "| accepted/drafted | identical |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["summary"]:
        per = r["per_request_draft"]
        drafts = f"{r['mean_draft']:.2f} ({pct(per, 0.1):.2f} / {pct(per, 0.5):.2f} / {pct(per, 0.9):.2f})" if per else "0"
        speed = f"{r['speedup']:.2f}x" if r["speedup"] is not None else "-"
        same = f"{r['identical'][0]}/{r['identical'][1]}"
        lines.append(f"| {r['method']} | {r['concurrency']} | {r['tokens_per_s']:.1f} | {speed} | {r['tokens_per_step']:.2f} "
                     f"| {drafts} | {r['accept_rate']:.2f} | {same} |")
    ones = [r for r in report["summary"] if r["concurrency"] == 1 and r["method"] != "none"]
    if ones:
        cats = list(ones[0]["category_speedup"])
        lines += ["", "Concurrency 1, speedup per category (tokens per request-second over no speculation's):", "",
                  "| method | " + " | ".join(cats) + " |", "|---|" + "---|" * len(cats)]
        for r in ones:
            lines.append(f"| {r['method']} | " + " | ".join(f"{r['category_speedup'][c]:.2f}x" for c in cats) + " |")
    stats = report.get("proposer_stats", {}).get("propd")
    if stats:
        mape = stats["latency_mape"]
        lines += ["", f"propd proposer: heads {'on' if stats['heads'] else 'off'}, latency model error (MAPE of the "
                  f"steps it predicted) {mape:.1%}" if mape is not None else "", ]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", type=Path, default=None, help="write the raw report here")
    p.add_argument("--table", type=Path, default=None, help="only print the table of a saved report")
    p.add_argument("--threads", type=int, default=1, help="OpenMP threads of each vLLM worker")
    args, rest = p.parse_known_args()
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return 0
    python = vllm_env.ensure(progress=True)
    out = args.json or Path("bench_results/vllm.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(python), "-m", "propd_compile.integrations.vllm_run", "--model", str(vllm_env.model_dir()),
           "--out", str(out), *rest]
    code = subprocess.call(cmd, env=vllm_env.engine_environment(threads=args.threads))
    if code:
        return code
    print(table(json.loads(out.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
