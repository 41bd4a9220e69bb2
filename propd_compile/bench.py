"""`propd bench`: ProPD against Hugging Face greedy `generate`, in one process, interleaved.

Every prompt batch runs each method back to back (order alternating between repeats), so
machine drift hits all methods alike. The speedup is the median, over prompt batches and
repeats, of the same-batch tokens/s ratio to the HF baseline (a time ratio when outputs are
identical); tokens/s is total new tokens over total time (median over repeats). Outputs are compared token for token with HF greedy.
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from tqdm import tqdm

from propd_compile.api import propd_generate
from propd_compile.config import ProPDConfig
from propd_compile.prompts import Question, chat_prompt


@dataclass
class MethodRun:
    method: str
    batch_size: int
    seconds: list[float] = field(default_factory=list)  # per repeat, summed over prompt batches
    new_tokens: int = 0  # per repeat
    identical_rows: int = 0
    rows: int = 0
    row_steps: int = 0
    accepted_tokens: int = 0
    tree_nodes: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / statistics.median(self.seconds)

    @property
    def mean_accepted(self) -> float | None:
        return self.accepted_tokens / self.row_steps if self.row_steps else None

    @property
    def mean_tree_nodes(self) -> float | None:
        return self.tree_nodes / self.row_steps if self.row_steps else None


def _new_tokens(sequences: torch.Tensor, prompt_len: int, eos: set[int]) -> int:
    n = 0
    for row in sequences[:, prompt_len:].tolist():
        for tok in row:
            n += 1
            if tok in eos:
                break
    return n


def run(
    model,
    tokenizer,
    questions: list[Question],
    *,
    batch_sizes: tuple[int, ...] = (1,),
    max_new_tokens: int = 128,
    repeats: int = 1,
    configs: dict[str, ProPDConfig] | None = None,
    progress: bool = True,
    sample: dict | None = None,
) -> dict:
    """Benchmark HF `generate` vs each ProPD config; returns a JSON-ready report.

    Greedy by default (outputs must be identical); with `sample` (e.g. {"temperature": 0.7}) both
    sample, outputs differ draw by draw, and only speed and acceptance are compared."""
    configs = configs or {"propd": ProPDConfig()}
    hf_generate = type(model).generate  # the original, even on an accelerated model
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or [])
    gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=bool(sample), **(sample or {}))
    baseline = "hf_sample" if sample else "hf_greedy"
    methods: dict[str, Callable] = {baseline: lambda enc: hf_generate(model, **enc, **gen_kwargs)}
    for name, cfg in configs.items():
        methods[name] = lambda enc, cfg=cfg: propd_generate(model, config=cfg, **enc, **gen_kwargs)
    texts = [chat_prompt(tokenizer, q.turns[0]) for q in questions]
    compile_info = _warm_up_compiled(model, configs, batch_sizes)

    results: list[MethodRun] = []
    ratios: dict[tuple[str, int], list[float]] = {}
    total = repeats * sum(-(-len(texts) // b) for b in batch_sizes) * len(methods)
    bar = tqdm(total=total, desc="propd bench", disable=not progress, unit="gen")
    for bs in batch_sizes:
        runs = {name: MethodRun(name, bs) for name in methods}
        batches = [tokenizer(texts[i : i + bs], return_tensors="pt", padding=True) for i in range(0, len(texts), bs)]
        for rep in range(repeats):
            secs = dict.fromkeys(methods, 0.0)
            order = list(methods) if rep % 2 == 0 else list(methods)[::-1]
            for enc in batches:
                outputs, rate = {}, {}
                P = enc["input_ids"].shape[1]
                for name in order:
                    t = time.perf_counter()
                    outputs[name] = methods[name](dict(enc))
                    dt = time.perf_counter() - t
                    secs[name] += dt
                    n_new = _new_tokens(outputs[name], P, eos)
                    rate[name] = n_new / dt  # sampled outputs differ in length: compare rates, not times
                    bar.update(1)
                    run_ = runs[name]
                    if rep == 0:
                        run_.new_tokens += n_new
                        if name != baseline:
                            st = model.propd_stats
                            run_.row_steps += st.row_steps
                            run_.accepted_tokens += sum(st.accepted)
                            run_.tree_nodes += sum(st.tree_sizes)
                for name in methods:
                    ratios.setdefault((name, bs), []).append(rate[name] / rate[baseline])
                if rep == 0 and not sample:
                    ref = outputs[baseline]
                    for name, out in outputs.items():
                        same = out.shape == ref.shape and bool((out == ref).all())
                        runs[name].rows += ref.shape[0]
                        runs[name].identical_rows += (
                            ref.shape[0] if same else _identical_rows(out, ref)
                        )
            for name in methods:
                runs[name].seconds.append(secs[name])
        results.extend(runs.values())
    bar.close()

    rows = []
    for r in results:
        rows.append(
            {
                **{k: v for k, v in asdict(r).items()},
                "tokens_per_second": r.tokens_per_second,
                "speedup_vs_hf": statistics.median(ratios[(r.method, r.batch_size)]),
                "mean_accepted": r.mean_accepted,
                "mean_tree_nodes": r.mean_tree_nodes,
                "identical_rate": r.identical_rows / r.rows if r.rows else None,
            }
        )
    if compile_info:
        from torch._dynamo.utils import counters

        compile_info["graphs_compiled_while_decoding"] = counters["stats"]["unique_graphs"] - compile_info.pop("_graphs")
    return {
        "machine": machine_info(),
        "compile": compile_info,
        "settings": {
            "prompts": len(questions),
            "categories": sorted({q.category for q in questions}),
            "batch_sizes": list(batch_sizes),
            "max_new_tokens": max_new_tokens,
            "repeats": repeats,
            "sample": sample,
            "configs": {k: asdict(v) for k, v in configs.items()},
        },
        "results": rows,
    }


def _warm_up_compiled(model, configs: dict[str, ProPDConfig], batch_sizes: tuple[int, ...]) -> dict:
    """Compile the graphs of compiled configs before timing; returns compile time and graph count."""
    from torch._dynamo.utils import counters

    from propd_compile.runtime_compile import warm_up

    compiled = [c for c in configs.values() if c.compile]
    if not compiled:
        return {}
    t = time.perf_counter()
    for cfg in compiled:
        warm_up(model, cfg, tuple(sorted({1 if b == 1 else 2 for b in batch_sizes})))
    return {"warm_up_seconds": time.perf_counter() - t, "_graphs": counters["stats"]["unique_graphs"]}


def _identical_rows(out: torch.Tensor, ref: torch.Tensor) -> int:
    n = 0
    for a, b in zip(out.tolist(), ref.tolist()):
        n += a == b
    return n


def machine_info() -> dict:
    import transformers

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def markdown(report: dict) -> str:
    lines = [
        "| method | batch | tokens/s | speedup vs HF | mean accepted | mean tree nodes | identical |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        acc = f"{r['mean_accepted']:.2f}" if r["mean_accepted"] else "1.00"
        nodes = f"{r['mean_tree_nodes']:.1f}" if r["mean_tree_nodes"] else "1"
        same = f"{r['identical_rows']}/{r['rows']}" if r["rows"] else "n/a (sampling)"
        lines.append(
            f"| {r['method']} | {r['batch_size']} | {r['tokens_per_second']:.1f} | {r['speedup_vs_hf']:.2f}x "
            f"| {acc} | {nodes} | {same} |"
        )
    return "\n".join(lines)


def save(report: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=2)


def verify_latency(
    model, forwards: dict[str, Callable], sizes=(1, 4, 8, 16, 32, 64), kv_len: int = 200, batch: int = 1, repeats: int = 7
) -> dict:
    """Median latency of one verification forward per tree size (a chain-shaped tree mask over a
    KV cache of `kv_len` tokens), for each forward, interleaved; plus ratios to the first forward."""
    from propd_compile.cache import TreeKVCache

    vocab = model.get_output_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    out: dict[str, dict[int, float]] = {name: {} for name in forwards}
    with torch.no_grad():
        for T in sizes:
            times: dict[str, list[float]] = {name: [] for name in forwards}
            tokens = torch.randint(0, vocab, (batch, T), generator=gen)
            tree = torch.ones(T, T, dtype=torch.bool).tril()
            mask = torch.cat([torch.ones(batch, T, kv_len, dtype=torch.bool), tree.repeat(batch, 1, 1)], 2)[:, None]
            positions = (kv_len + torch.arange(T)).repeat(batch, 1)
            for rep in range(repeats + 1):  # the first round warms up
                for name, fwd in forwards.items():
                    cache = TreeKVCache.for_model(model, batch, kv_len + T + 1)
                    cache.lengths = [kv_len] * batch
                    cache.begin_step(mask)
                    t = time.perf_counter()
                    fwd(tokens, mask, positions, cache)
                    dt = time.perf_counter() - t
                    cache.end_step()
                    if rep:
                        times[name].append(dt)
            for name in forwards:
                out[name][T] = statistics.median(times[name])
    first = next(iter(forwards))
    return {
        "kv_len": kv_len,
        "batch": batch,
        "ms": {n: {T: 1e3 * s for T, s in d.items()} for n, d in out.items()},
        "vs_T1": {n: {T: s / d[sizes[0]] for T, s in d.items()} for n, d in out.items()},
        f"ratio_to_{first}": {n: {T: out[first][T] / s for T, s in d.items()} for n, d in out.items()},
    }
