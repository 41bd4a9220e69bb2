"""Run vLLM engines over MT-Bench prompts: no speculation, vLLM's own n-gram, propd (in vLLM's venv).

One engine per method stays up for the whole run, and every (concurrency, repeat) cell runs the
methods back to back, so slow drift of a shared machine hits them alike. `concurrency` C is C
clients that each send their next request as soon as the last one finished (closed loop), on an
engine admitting at most max(C) requests. Per request it records the generated token ids and
vLLM's own per-request speculative-decoding counts (draft tokens, accepted tokens, verify steps).

    python -m propd_compile.integrations.vllm_run --model DIR --out OUT.json [--methods none ngram propd]
        [--concurrency 1 4 16] [--per-category 2] [--max-tokens 128] [--repeats 1]

`propd_compile.integrations.vllm_env.ensure()` gives the venv's python; `examples/bench_vllm.py`
and the tests run this module with it.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

METHODS = ("none", "ngram", "propd", "propd-ngram")  # propd-ngram: the propd proposer without draft heads
NGRAM_K = 4


def speculative_config_for(method: str, k: int) -> dict | None:
    """vLLM's speculative_config for a method of this benchmark."""
    if method == "none":
        return None
    if method == "ngram":  # vLLM's prompt lookup: the longest suffix match of 1..4 tokens, K drafts
        return {"method": "ngram", "num_speculative_tokens": NGRAM_K, "prompt_lookup_min": 1, "prompt_lookup_max": 4}
    if method in ("propd", "propd-ngram"):
        from propd_compile.integrations.vllm import speculative_config

        return speculative_config(k)
    raise ValueError(f"unknown method {method!r}; use one of {METHODS}")


def engine_args(model: str, method: str, k: int, max_num_seqs: int, max_model_len: int, dtype: str) -> dict:
    spec = speculative_config_for(method, k)
    return dict(
        model=model, dtype=dtype, enforce_eager=True, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
        speculative_config=spec, seed=0, enable_prefix_caching=False,
        **({"per_request_spec_decode_metrics": "summary"} if spec else {}),
    )


def chat_prompts(model: str, per_category: int, categories: list[str] | None = None) -> list[dict]:
    from transformers import AutoTokenizer

    from propd_compile.prompts import chat_prompt, mt_bench, mt_bench_sample

    tok = AutoTokenizer.from_pretrained(model)
    questions = mt_bench_sample(per_category) if categories is None else [
        q for q in mt_bench() if q.category in categories][: per_category * len(categories)]
    return [{"id": q.id, "category": q.category, "prompt": chat_prompt(tok, q.turns[0])} for q in questions]


def _proposer_stats(worker) -> dict | None:
    drafter = getattr(worker.model_runner, "drafter", None)
    return drafter.stats() if hasattr(drafter, "stats") else None


async def _closed_loop(engine, prompts: list[dict], params, concurrency: int, tag: str) -> tuple[list[dict], float]:
    queue = list(enumerate(prompts))[::-1]
    results: list[dict | None] = [None] * len(prompts)

    async def client() -> None:
        while queue:
            i, p = queue.pop()
            final, t0 = None, time.perf_counter()
            async for out in engine.generate(p["prompt"], params, request_id=f"{tag}-{i}"):
                final = out
            o = final.outputs[0]
            spec = o.spec_decode_metrics.to_dict() if getattr(o, "spec_decode_metrics", None) is not None else None
            results[i] = {"id": p["id"], "category": p["category"], "prompt": p["prompt"], "text": o.text,
                          "token_ids": list(o.token_ids), "spec": spec, "seconds": time.perf_counter() - t0}

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return results, time.perf_counter() - start


def request_counts(r: dict) -> dict:
    """Decode steps, drafted and accepted tokens of one request (the first token comes from prefill)."""
    n = len(r["token_ids"])
    spec = r["spec"] or {}
    hist = spec.get("acceptance_histogram") or [0]
    accepted = sum(j * c for j, c in enumerate(hist))
    drafted = spec.get("num_draft_tokens", 0)
    steps = max(n - 1 - accepted, 0)
    return {"tokens": n, "steps": steps, "drafted": drafted, "accepted": accepted}


async def run(args) -> dict:
    from vllm import AsyncEngineArgs, SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

    prompts = chat_prompts(args.model, args.per_category, args.categories)
    if args.prompts:
        prompts = prompts[: args.prompts]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=args.ignore_eos)
    engines, startup = {}, {}
    for m in args.methods:
        t0 = time.perf_counter()
        kwargs = engine_args(args.model, m, args.k, max(args.concurrency), args.max_model_len, args.dtype)
        drafters = os.environ.get("PROPD_VLLM_DRAFTERS")
        if m == "propd-ngram":  # the engine's processes start now and read their settings from the environment
            os.environ["PROPD_VLLM_DRAFTERS"] = "ngram"
        try:
            engines[m] = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        finally:
            if drafters is None:
                os.environ.pop("PROPD_VLLM_DRAFTERS", None)
            else:
                os.environ["PROPD_VLLM_DRAFTERS"] = drafters
        startup[m] = time.perf_counter() - t0
    if args.warmup:  # the first requests of every engine: allocations, and propd's models learn
        for m, e in engines.items():
            await _closed_loop(e, prompts[: args.warmup], params, 1, f"warmup-{m}")
    cells = []
    for c in args.concurrency:
        for rep in range(args.repeats):
            for m in args.methods:
                results, seconds = await _closed_loop(engines[m], prompts, params, c, f"{m}-{c}-{rep}")
                cells.append({"method": m, "concurrency": c, "repeat": rep, "seconds": seconds, "requests": results})
                counts = [request_counts(r) for r in results]
                tok = sum(x["tokens"] for x in counts)
                print(f"[vllm_run] {m:6s} C={c:<3d} rep {rep}: {tok / seconds:6.1f} tok/s, "
                      f"{sum(x['tokens'] - 1 for x in counts) / max(sum(x['steps'] for x in counts), 1):.2f} tokens/step",
                      file=sys.stderr, flush=True)
    proposer = {}
    for m, e in engines.items():
        if m.startswith("propd"):
            proposer[m] = (await e.collective_rpc(_proposer_stats))[0]
        e.shutdown()
    return {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "startup_seconds": startup, "cells": cells,
            "proposer_stats": proposer, "vllm": __import__("vllm").__version__}


def summarize(report: dict) -> list[dict]:
    """Per (method, concurrency): tokens/s (median over repeats), its ratio to no speculation in
    the same repeat (median), tokens per decode step and drafted tokens per decode step, overall
    and per request, and the categories' own speedups."""
    cells = report["cells"]
    by = {(c["method"], c["concurrency"], c["repeat"]): c for c in cells}
    rows = []
    for m in dict.fromkeys(c["method"] for c in cells):
        for conc in dict.fromkeys(c["concurrency"] for c in cells):
            mine = [c for c in cells if c["method"] == m and c["concurrency"] == conc]
            if not mine:
                continue
            rates, ratios, counts = [], [], []
            for c in mine:
                cc = [request_counts(r) for r in c["requests"]]
                counts += cc
                rate = sum(x["tokens"] for x in cc) / c["seconds"]
                rates.append(rate)
                base = by.get(("none", conc, c["repeat"]))
                if base is not None:
                    ratios.append(rate / (sum(len(r["token_ids"]) for r in base["requests"]) / base["seconds"]))
            steps = sum(x["steps"] for x in counts)
            per_request_draft = [x["drafted"] / x["steps"] for x in counts if x["steps"]]
            rows.append({
                "method": m, "concurrency": conc, "tokens_per_s": statistics.median(rates),
                "speedup": statistics.median(ratios) if ratios else None,
                "tokens_per_step": sum(x["tokens"] - 1 for x in counts) / max(steps, 1),
                "mean_draft": sum(x["drafted"] for x in counts) / max(steps, 1),
                "accept_rate": sum(x["accepted"] for x in counts) / max(sum(x["drafted"] for x in counts), 1),
                "per_request_draft": per_request_draft,
                "identical": _identical(cells, m, conc),
                "category_speedup": _category_speedups(cells, m, conc),
            })
    return rows


def _category_speedups(cells: list[dict], method: str, conc: int) -> dict[str, float]:
    """Per MT-Bench category: tokens per request-second over no speculation's (median over
    repeats); a request's own time is its latency, so this is the per-category speedup at
    concurrency 1 (at higher concurrency requests share steps)."""
    out: dict[str, list[float]] = {}
    for c in cells:
        if c["method"] != method or c["concurrency"] != conc:
            continue
        base = next((b for b in cells if b["method"] == "none" and b["concurrency"] == conc
                     and b["repeat"] == c["repeat"]), None)
        if base is None:
            continue
        for cat in dict.fromkeys(r["category"] for r in c["requests"]):
            rate = lambda rs: sum(len(r["token_ids"]) for r in rs) / sum(r["seconds"] for r in rs)  # noqa: E731
            mine = [r for r in c["requests"] if r["category"] == cat]
            ref = [r for r in base["requests"] if r["category"] == cat]
            out.setdefault(cat, []).append(rate(mine) / rate(ref))
    return {cat: statistics.median(v) for cat, v in out.items()}


def _identical(cells: list[dict], method: str, conc: int) -> tuple[int, int]:
    """Requests whose tokens equal no speculation's (same concurrency, first repeat)."""
    base = next((c for c in cells if c["method"] == "none" and c["concurrency"] == conc), None)
    mine = [c for c in cells if c["method"] == method and c["concurrency"] == conc]
    if base is None:
        return (0, 0)
    ref = [r["token_ids"] for r in base["requests"]]
    pairs = [(r["token_ids"], ref[i]) for c in mine for i, r in enumerate(c["requests"])]
    return (sum(a == b for a, b in pairs), len(pairs))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m propd_compile.integrations.vllm_run", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a model folder vLLM loads (vllm_env.model_dir())")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--per-category", type=int, default=2)
    p.add_argument("--categories", nargs="+", default=None)
    p.add_argument("--prompts", type=int, default=None, help="only the first N prompts")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--warmup", type=int, default=0, help="requests per engine before timing")
    p.add_argument("--k", type=int, default=8, help="propd's longest draft (num_speculative_tokens)")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args(argv)
    # the proposer's statistics come back through collective_rpc with a function (pickled between our processes)
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    report = asyncio.run(run(args))
    report["summary"] = summarize(report)
    args.out.write_text(json.dumps(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
