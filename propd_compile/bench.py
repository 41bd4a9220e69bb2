"""`propd bench`: the benchmark suite, ProPD methods against Hugging Face `generate`.

Every method runs in one process, prompt batch by prompt batch, back to back (order alternating
between repeats), so machine drift hits all methods alike. The speedup is the median, over
prompt batches and repeats, of the same-batch tokens/s ratio to the `hf` baseline (eager HF
greedy `generate`); tokens/s is total new tokens over total time (median over repeats). Greedy
outputs are compared with `hf` row by row.

Methods are rows of `METHODS` (name -> how to run it). A ProPD method whose feature does not
exist yet (ProPDConfig refuses its fields) is reported as unavailable with the reason, and one
that raises while running as failed, never dropped: the table shows what the code can do today.

Call-level numbers (tokens/s, speedup, pruned fraction) are given per category only from calls
whose rows are all of that category (batch 1 with the default interleaved prompt order); row-level
numbers (identical output, accepted length, tree sizes) are given per category at every batch size.
"""
from __future__ import annotations

import json
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from propd_compile.api import accelerate, propd_generate
from propd_compile.config import ProPDConfig
from propd_compile.prompts import Question, chat_prompt


BASELINE = "hf"


@dataclass(frozen=True)
class Method:
    """How to run one row of the suite: HF `generate` with extra kwargs, or ProPD with config fields."""

    description: str
    hf: dict[str, Any] | None = None  # kwargs for HF generate (an HF method)
    hf_compiled: bool = False  # HF generate with a static cache and the compiled forward
    propd: dict[str, Any] | None = None  # ProPDConfig fields over the base config (a ProPD method)
    max_batch_size: int | None = None  # larger batches: reported unavailable
    generate: dict[str, Any] | None = None  # extra generate() kwargs of either kind (e.g. a repetition penalty)
    reference: str = BASELINE  # the method whose outputs this one's must equal (the same generate options)

    def runs_at(self, batch_size: int) -> bool:
        return self.max_batch_size is None or batch_size <= self.max_batch_size


REPETITION = {"repetition_penalty": 1.2}
METHODS: dict[str, Method] = {
    BASELINE: Method("HF greedy generate, eager, dynamic cache (the baseline)", hf={}),
    "hf-compiled": Method(
        "HF generate, static cache, forward compiled by torch.compile (inductor) through compile_config",
        hf={}, hf_compiled=True,
    ),
    "hf-lookup": Method(
        "HF prompt-lookup decoding (prompt_lookup_num_tokens=10; HF's assisted generate takes batch 1 only)",
        hf={"prompt_lookup_num_tokens": 10}, max_batch_size=1,
    ),
    # ProPD's own loop with plain one-token steps: the speculative gain is measured against these,
    # on the same kernels (eager and compiled), apart from the kernel gain.
    "plain": Method("ProPD loop, plain one-token steps (max_tree_nodes=1), eager", propd={"max_tree_nodes": 1, "compile": False}),
    "plain-compiled": Method(
        "ProPD loop, plain one-token steps, compiled kernels (frozen, autotuned AOTInductor package)",
        propd={"max_tree_nodes": 1, "compile": True},
    ),
    "ngram": Method("ProPD runtime, n-gram drafter only (training-free), eager", propd={"drafters": ("ngram",), "compile": False}),
    # 16 nodes: the best static size on this CPU (a step costs about the same from 2 to 16 tree
    # tokens, ../shared/research/measurements.md), so the static baseline is not a straw man.
    "medusa": Method("static Medusa tree (16 nodes) from the shipped heads, eager",
                     propd={"tree": "medusa", "max_tree_nodes": 16, "compile": False}),
    "dynamic": Method("ProPD dynamic tree (heads + n-gram, cost model), eager",
                      propd={"tree": "dynamic", "drafters": ("heads", "ngram"), "compile": False}),
    "eagle": Method("ProPD dynamic tree (feature drafter + n-gram, cost model), eager",
                    propd={"tree": "dynamic", "drafters": ("feature", "ngram"), "compile": False}),
    # The prune point is a pass of the torch.compile backend (its own compiled kernels).
    "prune": Method("static Medusa tree (16 nodes) with early pruning (torch.compile backend)",
                    propd={"tree": "medusa", "max_tree_nodes": 16, "prune": True, "compile": True}),
    "dynamic-prune": Method("ProPD dynamic tree with early pruning (torch.compile backend)",
                            propd={"tree": "dynamic", "prune": True, "compile": True}),
    "propd": Method("ProPD defaults: dynamic tree, the default drafters (a shipped feature drafter + n-gram, "
                    "else the shipped heads + n-gram), compiled kernels", propd={"compile": True}),
    # The default row with the other drafters, on the same kernels: what the feature drafter adds.
    "propd-heads": Method("the propd row with the Medusa heads + n-gram instead of the feature drafter",
                          propd={"compile": True, "drafters": ("heads", "ngram")}),
    "propd-ngram": Method("the propd row with the n-gram drafter alone", propd={"compile": True, "drafters": ("ngram",)}),
    # A fixed tree beside the dynamic one on the same kernels: the best fixed size at batch 1 on
    # the project's CPU (examples/tree_size_sweep.py), n-gram drafts only (no heads, no planner).
    "propd-fixed4": Method("fixed 4-node trees from the n-gram drafter (no heads, no planner), compiled kernels",
                           propd={"compile": True, "tree": "fixed", "max_tree_nodes": 4, "drafters": ("ngram",)}),
    # What the model's own phrases add to the n-gram drafter (`propd_compile.phrases`).
    "propd-nophrases": Method("the propd row without the phrase corpus (n-gram drafts from the row's own text only)",
                              propd={"compile": True, "phrases": False}),
    # The same rows with a repetition penalty (per-node logits processing), against HF with it.
    "hf-rep": Method("HF greedy generate, eager, repetition_penalty=1.2", hf={}, generate=REPETITION),
    "dynamic-rep": Method("the dynamic row with repetition_penalty=1.2", propd={"tree": "dynamic", "compile": False},
                          generate=REPETITION, reference="hf-rep"),
    "propd-rep": Method("the propd row with repetition_penalty=1.2", propd={"compile": True},
                        generate=REPETITION, reference="hf-rep"),
}
# --quick leaves out the compiled methods: their first compile alone takes minutes on a 2-core
# CPU (the compiled runtime and the prune pass have their own lossless tests), and the rows with
# extra generate options (their own real-model tests check them).
QUICK_METHODS = tuple(
    n for n, m in METHODS.items() if not m.hf_compiled and not (m.propd or {}).get("compile") and not m.generate
)
WARM_UP_TOKENS = 16


@dataclass(frozen=True)
class Prompt:
    """One benchmark prompt, tokenized (the chat template applied)."""

    category: str
    turn: int
    input_ids: tuple[int, ...]

    @property
    def group(self) -> str:
        return self.category if self.turn == 1 else f"{self.category} (turn 2)"


@dataclass
class Call:
    """One timed generate call of one method on one prompt batch; rows hold per-row numbers."""

    method: str
    batch_size: int
    repeat: int
    batch: int
    seconds: float
    rows: list[dict] = field(default_factory=list)
    pruned_fraction: float | None = None
    latency_errors: list[float] = field(default_factory=list)  # dynamic trees: the latency model's, per step
    draft_seconds: float | None = None  # time in the drafters (ProPD methods)
    steps: int = 0  # verification steps (ProPD methods)
    outcomes: list[tuple[float, int]] = field(default_factory=list)  # dynamic trees: (expected, accepted) per step

    @property
    def new_tokens(self) -> int:
        return sum(r["new_tokens"] for r in self.rows)

    @property
    def groups(self) -> set[str]:
        return {r["group"] for r in self.rows}


def mt_bench_prompts(
    tokenizer, questions: list[Question], turn2: bool = False, answer: Callable[[list[str]], list[str]] | None = None
) -> list[Prompt]:
    """Turn-1 prompts in the chat template; with `turn2`, also turn 2 with `answer`'s turn-1 reply
    in context (MT-Bench's second turn follows up on the model's own answer)."""
    texts = [chat_prompt(tokenizer, q.turns[0]) for q in questions]
    out = [Prompt(q.category, 1, tuple(tokenizer(t)["input_ids"])) for q, t in zip(questions, texts)]
    if turn2:
        replies = answer(texts)
        for q, reply in zip(questions, replies):
            chat = [{"role": "user", "content": q.turns[0]}, {"role": "assistant", "content": reply},
                    {"role": "user", "content": q.turns[1]}]
            text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            out.append(Prompt(q.category, 2, tuple(tokenizer(text)["input_ids"])))
    return out


def hf_answers(model, tokenizer, texts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """HF greedy answers to `texts` (the turn-1 replies that turn-2 prompts follow up on)."""
    replies = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True)
        out = type(model).generate(model, **enc, max_new_tokens=max_new_tokens, do_sample=False)
        replies += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return replies


def _batch(prompts: list[Prompt], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded input_ids and attention_mask, as a left-padding tokenizer would give."""
    P = max(len(p.input_ids) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, P - len(p.input_ids) :] = torch.tensor(p.input_ids)
        mask[b, P - len(p.input_ids) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _new_rows(sequences: torch.Tensor, prompt_len: int, eos: set[int]) -> list[list[int]]:
    """Each row's new tokens up to and including the first EOS (padding after it dropped)."""
    rows = []
    for row in sequences[:, prompt_len:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:end])
    return rows


def _hf_compile_kwargs(max_cache_len: int) -> dict[str, Any]:
    """HF's compiled decoding on CPU: a static cache of one fixed length (so every call reuses the
    graphs) and compile_config, which HF only honours off-GPU with `_compile_all_devices`. Mode
    "default": "reduce-overhead" means CUDA graphs, which do not exist on CPU.

    Chosen by measurement (SmolLM2, torch 2.13 CPU, 1 thread, 64 tokens, interleaved, tokens/s vs
    eager `generate`): static cache + compile_config 1.03x at batch 1 and 0.85x at batch 4 (one
    graph per batch size, 84-91 s to compile, identical output); the static cache alone 0.94x and
    0.89x; `torch.compile(model.forward, dynamic=True)` with HF's dynamic cache took 400 s to
    compile at batch 1 alone (3 graphs; not timed interleaved, the machine was loaded). No compiled
    HF path clearly beats eager here: a static cache makes every step attend over the whole
    preallocated length."""
    from transformers import CompileConfig

    compile_config = CompileConfig(mode="default")
    compile_config._compile_all_devices = True
    return {"cache_implementation": "static", "max_cache_len": max_cache_len, "compile_config": compile_config}


@dataclass(frozen=True)
class Runner:
    """A method ready to run: generate(inputs, max_new_tokens); for a compiled ProPD config also
    compile(batch_size), which builds every graph decoding can need (the runtime's own warm-up
    covers all tree shapes, which one short generate call would not)."""

    generate: Callable[[dict, int], torch.Tensor]
    compile: Callable[[int], None] | None = None


def prepare(method: Method, model, base: ProPDConfig, gen_kwargs: dict[str, Any], max_cache_len: int) -> Runner | str:
    """How to run `method` on `model`, or the reason it cannot run here (a feature not built yet,
    no heads for this model)."""
    from propd_compile.drafters import build_drafter
    from propd_compile.runtime_compile import warm_up

    if method.propd is None:
        hf_generate = type(model).generate  # the original, even on an accelerated model
        kwargs = {**gen_kwargs, **method.hf, **(method.generate or {}),
                  **(_hf_compile_kwargs(max_cache_len) if method.hf_compiled else {})}
        return Runner(lambda enc, n: hf_generate(model, **enc, **kwargs, max_new_tokens=n))
    try:
        config = base.with_(**method.propd)
        build_drafter(config, model)
    except (TypeError, ValueError, NotImplementedError) as e:
        return f"{type(e).__name__}: {e}"
    return Runner(
        lambda enc, n: propd_generate(model, config=config, **enc, **gen_kwargs, **(method.generate or {}), max_new_tokens=n),
        (lambda bs: warm_up(model, config, (1 if bs == 1 else 2,))) if config.compile else None,
    )


def _row_stats(stats, rows: int) -> list[dict]:
    """Per-row accepted tokens, steps and tree-size histogram from `model.propd.stats`."""
    out = [{"steps": 0, "accepted": 0, "tree_sizes": {}} for _ in range(rows)]
    for b, acc, size in zip(stats.rows, stats.accepted, stats.tree_sizes):
        r = out[b]
        r["steps"] += 1
        r["accepted"] += acc
        r["tree_sizes"][size] = r["tree_sizes"].get(size, 0) + 1
    return out


def _call(name: str, bs: int, rep: int, batch: int, seconds: float, group: list[Prompt], new: list[list[int]],
          stats) -> Call:
    """The record of one timed call; `stats` (model.propd.stats of a ProPD method) adds per-row
    acceptance and tree sizes, and the call's pruned fraction when the runtime reports one."""
    per_row = _row_stats(stats, len(group)) if stats is not None else [{} for _ in group]
    rows = [{"group": p.group, "new_tokens": len(toks), "identical": None, **extra}
            for p, toks, extra in zip(group, new, per_row)]
    return Call(
        name, bs, rep, batch, seconds, rows, getattr(stats, "pruned_fraction", None),
        list(getattr(stats, "latency_errors", None) or []), getattr(stats, "draft_seconds", None),
        getattr(stats, "steps", 0), list(getattr(stats, "outcomes", None) or []),
    )


def _draft_cost(calls: list[Call]) -> dict:
    """Mean drafting milliseconds per verification step and the drafters' share of the time."""
    steps, seconds = sum(c.steps for c in calls), sum(c.seconds for c in calls)
    draft = sum(c.draft_seconds for c in calls)
    return {"draft_ms_per_step": 1000 * draft / steps if steps else None, "draft_share": draft / seconds if seconds else None}


def run(
    model,
    prompts: list[Prompt],
    *,
    methods: dict[str, Method] | None = None,
    base: ProPDConfig | None = None,
    batch_sizes: tuple[int, ...] = (1,),
    max_new_tokens: int = 256,
    repeats: int = 1,
    sample: dict | None = None,
    progress: bool = True,
) -> dict:
    """Benchmark `methods` (default: all of METHODS) on `prompts`; returns a JSON-ready report.

    Greedy by default (outputs compared with `hf`); with `sample` (e.g. {"temperature": 0.7})
    every method samples, outputs differ draw by draw, and only speed and acceptance compare."""
    methods = dict(methods if methods is not None else METHODS)
    methods = {BASELINE: METHODS[BASELINE], **methods}  # speedups need the baseline
    methods = {**{m.reference: METHODS[m.reference] for m in methods.values()}, **methods}  # and outputs their reference
    base = base or ProPDConfig()
    accelerate(model, base)  # propd methods share its state; HF methods call the original generate
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or [])
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else min(eos, default=0)
    gen_kwargs = dict(do_sample=bool(sample), pad_token_id=pad, **(sample or {}))
    max_cache_len = max(len(p.input_ids) for p in prompts) + max_new_tokens + 1
    started, t_start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.perf_counter()
    status: dict[str, str] = {}
    runners: dict[str, Runner] = {}
    for name, method in methods.items():
        got = prepare(method, model, base, gen_kwargs, max_cache_len)
        if isinstance(got, str):
            status[name] = f"unavailable: {got}"
        else:
            runners[name], status[name] = got, "ok"

    batches = {bs: [prompts[i : i + bs] for i in range(0, len(prompts), bs)] for bs in batch_sizes}
    total = sum(sum(methods[n].runs_at(bs) for n in runners) * (1 + repeats * len(b)) for bs, b in batches.items())
    bar = tqdm(total=total, desc="propd bench", disable=not progress, unit="gen", file=sys.stderr)
    warm_up: dict[str, dict[int, float]] = {name: {} for name in runners}
    calls: list[Call] = []
    graphs_before = _graphs_compiled()
    timed_graphs = 0

    def attempt(name: str, enc: dict, n: int = max_new_tokens, compile_bs: int | None = None):
        """Run one method once (compiling its graphs first, for a compiled ProPD config in the
        warm-up); returns (output, seconds). A method that raises is marked failed and leaves the run."""
        t = time.perf_counter()
        try:
            if compile_bs is not None and runners[name].compile:
                runners[name].compile(compile_bs)
            out = runners[name].generate(enc, n)
        except Exception as e:  # reported in the table; the other methods go on
            status[name] = f"failed: {type(e).__name__}: {e}"
            del runners[name]
            return None
        finally:
            bar.update(1)
        return out, time.perf_counter() - t

    for bs, bs_batches in batches.items():
        warm = _batch(bs_batches[0], pad)
        for name in [n for n in runners if methods[n].runs_at(bs)]:  # excluded from timing: first calls, compiling
            bar.set_postfix_str(f"warm-up {name} batch {bs}")
            got = attempt(name, warm, min(WARM_UP_TOKENS, max_new_tokens), compile_bs=bs)
            if got:
                warm_up[name][bs] = got[1]
        g0 = _graphs_compiled()
        for rep in range(repeats):
            for i, group in enumerate(bs_batches):
                enc = _batch(group, pad)
                P = enc["input_ids"].shape[1]
                names = [n for n in runners if methods[n].runs_at(bs)]
                names = names if rep % 2 == 0 else names[::-1]
                new: dict[str, list[list[int]]] = {}
                batch_calls: list[Call] = []
                for name in names:
                    bar.set_postfix_str(f"{name} batch {bs} ({i + 1}/{len(bs_batches)}, repeat {rep + 1})")
                    got = attempt(name, enc)
                    if got is not None:
                        new[name] = _new_rows(got[0], P, eos)
                        stats = model.propd.stats if methods[name].propd is not None else None
                        batch_calls.append(_call(name, bs, rep, i, got[1], group, new[name], stats))
                for call in batch_calls:
                    reference = methods[call.method].reference
                    if not sample and reference in new:
                        for r, a, b in zip(call.rows, new[call.method], new[reference]):
                            r["identical"] = a == b
                calls += batch_calls
        timed_graphs += _graphs_compiled() - g0
    bar.close()
    return {
        "machine": machine_info(),
        "settings": {
            "prompts": len(prompts),
            "groups": sorted({p.group for p in prompts}),
            "batch_sizes": list(batch_sizes),
            "max_new_tokens": max_new_tokens,
            "repeats": repeats,
            "sample": sample,
            "base_config": _jsonable(asdict(base)),
            "warm_up_tokens": WARM_UP_TOKENS,
            "date": started,
            "wall_seconds": time.perf_counter() - t_start,
        },
        "methods": {
            name: {"description": m.description, "status": status[name],
                   "hf_kwargs": m.hf, "hf_compiled": m.hf_compiled, "propd_fields": _jsonable(m.propd),
                   "generate_kwargs": m.generate, "reference": m.reference}
            for name, m in methods.items()
        },
        "compile": {
            "graphs_compiled": _graphs_compiled() - graphs_before, "graphs_compiled_while_timing": timed_graphs,
        },
        "warm_up_seconds": {n: {str(b): s for b, s in d.items()} for n, d in warm_up.items()},
        "results": summarize(calls, methods, status, batch_sizes),
        "calls": [_jsonable(asdict(c)) for c in calls],
    }


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _jsonable(obj: Any) -> Any:
    """Tuples to lists, dict keys to str: what json.dump would write, so reports reload equal."""
    return json.loads(json.dumps(obj, default=str))


def _percentiles(hist: dict[int, int]) -> dict[str, float] | None:
    """p10/p50/p90/max/mean of a {tree size: count} histogram."""
    n = sum(hist.values())
    if not n:
        return None
    sizes = sorted(hist)

    def pct(q: float) -> int:
        seen = 0
        for s in sizes:
            seen += hist[s]
            if seen >= q * n:
                return s
        return sizes[-1]

    return {"p10": pct(0.1), "p50": pct(0.5), "p90": pct(0.9), "max": sizes[-1],
            "mean": sum(s * c for s, c in hist.items()) / n}


def _aggregate(rows: list[dict], timed: list[Call], ratios: list[float]) -> dict:
    """The numbers of one (method, batch size), overall or for one group: row-level ones from
    `rows`, call-level ones (time, pruning) from `timed`, the calls that hold only these rows."""
    hist: dict[int, int] = {}
    for r in rows:
        for s, n in r.get("tree_sizes", {}).items():
            hist[int(s)] = hist.get(int(s), 0) + n
    steps = sum(r.get("steps", 0) for r in rows)
    judged = [r["identical"] for r in rows if r["identical"] is not None]
    by_repeat: dict[int, list[Call]] = {}
    for c in timed:
        by_repeat.setdefault(c.repeat, []).append(c)
    seconds = [sum(c.seconds for c in cs) for cs in by_repeat.values()]
    pruned = [(c.pruned_fraction, sum(int(s) * n for r in c.rows for s, n in r.get("tree_sizes", {}).items()))
              for c in timed if c.pruned_fraction is not None]
    errors = [e for c in timed for e in c.latency_errors]
    outcomes = [o for c in timed for o in c.outcomes]
    return {
        "new_tokens": sum(r["new_tokens"] for r in rows),
        "seconds": seconds,  # per repeat
        "tokens_per_second": statistics.median(
            sum(c.new_tokens for c in cs) / t for cs, t in zip(by_repeat.values(), seconds)
        ) if timed else None,
        "speedup_vs_hf": statistics.median(ratios) if ratios else None,
        "mean_accepted": sum(r["accepted"] for r in rows) / steps if steps else None,
        "tree_sizes": _percentiles(hist),
        "tree_size_histogram": {str(s): hist[s] for s in sorted(hist)},
        "pruned_fraction": sum(f * n for f, n in pruned) / max(sum(n for _, n in pruned), 1) if pruned else None,
        "identical_rows": sum(judged),
        "rows": len(judged),
        "identical_rate": sum(judged) / len(judged) if judged else None,
        # mean relative error of the dynamic tree's step-time predictions, made before each step ran
        "latency_mape": sum(errors) / len(errors) if errors else None,
        "planned_steps": len(errors),
        **_draft_cost([c for c in timed if c.draft_seconds is not None]),
        "reliability": reliability(outcomes, rows=len(timed[0].rows) if timed else 1),
    }


RELIABILITY_BINS = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, float("inf"))


def reliability(outcomes: list[tuple[float, int]], rows: int = 1, min_steps: int = 20) -> list[dict] | None:
    """Predicted vs realized accepted tokens per row and step, binned by the prediction: is the
    acceptance model calibrated? Bins with fewer than `min_steps` steps are reported as such."""
    if not outcomes:
        return None
    out, lo = [], 0.0
    for hi in RELIABILITY_BINS:
        inside = [(e / rows, a / rows) for e, a in outcomes if lo <= e / rows < hi]
        if inside:
            pred, real = sum(e for e, _ in inside) / len(inside), sum(a for _, a in inside) / len(inside)
            out.append({"bin": [lo, hi if hi != float("inf") else None], "steps": len(inside), "predicted": pred,
                        "realized": real, "error": (pred - real) / real if real else None,
                        "enough": len(inside) >= min_steps})
        lo = hi
    return out


def summarize(calls: list[Call], methods: dict[str, Method], status: dict[str, str], batch_sizes) -> list[dict]:
    """One result per (method, batch size): overall numbers and per group (category), plus the
    status; methods that are unavailable or failed get a row with the reason and no numbers."""
    rate = {(c.method, c.batch_size, c.repeat, c.batch): c.new_tokens / c.seconds for c in calls}
    results = []
    for name in methods:
        for bs in batch_sizes:
            mine = [c for c in calls if c.method == name and c.batch_size == bs]
            if status[name] != "ok" or not mine:
                why = status[name]
                if not methods[name].runs_at(bs):
                    why = f"unavailable: batch size > {methods[name].max_batch_size}"
                results.append({"method": name, "batch_size": bs, "status": why})
                continue
            ratio = {id(c): rate[(name, bs, c.repeat, c.batch)] / rate[(BASELINE, bs, c.repeat, c.batch)]
                     for c in mine if (BASELINE, bs, c.repeat, c.batch) in rate}
            rows = [r for c in mine for r in c.rows]
            per_group = {}
            for g in sorted({r["group"] for r in rows}):
                alone = [c for c in mine if c.groups == {g}]
                per_group[g] = _aggregate([r for r in rows if r["group"] == g], alone,
                                          [ratio[id(c)] for c in alone if id(c) in ratio])
            results.append({"method": name, "batch_size": bs, "status": "ok",
                            **_aggregate(rows, mine, list(ratio.values())), "per_category": per_group})
    return results


def machine_info() -> dict:
    import transformers

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def _fmt(x: float | None, spec: str, none: str = "-", unit: str = "") -> str:
    return none if x is None else format(x, spec) + unit


def markdown(report: dict) -> str:
    """The results table (every method and batch size; unavailable and failed methods with their
    reason), and per category the speedup and identical rows."""
    lines = [
        "| method | batch | tokens/s | speedup vs hf | mean accepted | tree nodes p50 / p90 / max | pruned "
        "| identical | latency model error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        if r["status"] != "ok":
            why = " ".join(r["status"].replace("|", "\\|").split())  # one table cell
            lines.append(f"| {r['method']} | {r['batch_size']} | {why} |  |  |  |  |  |  |")
            continue
        t = r["tree_sizes"]
        tree = f"{t['p50']} / {t['p90']} / {t['max']}" if t else "1"
        same = f"{r['identical_rows']}/{r['rows']}" if r["rows"] else "n/a (sampling)"
        lines.append(
            f"| {r['method']} | {r['batch_size']} | {_fmt(r['tokens_per_second'], '.1f')} "
            f"| {_fmt(r['speedup_vs_hf'], '.2f', unit='x')} | {_fmt(r['mean_accepted'], '.2f', '1.00')} | {tree} "
            f"| {_fmt(r['pruned_fraction'], '.0%')} | {same} | {_fmt(r.get('latency_mape'), '.1%')} |"
        )
    ok = [r for r in report["results"] if r["status"] == "ok"]
    groups = report["settings"]["groups"]
    if ok and groups:
        lines += ["", "Per category: speedup vs hf (calls of that category alone; `-` where batches mix categories), "
                  "mean accepted, identical rows.", "",
                  "| method | batch | " + " | ".join(groups) + " |", "|---|---|" + "---|" * len(groups)]
        for r in ok:
            cells = []
            for g in groups:
                c = r["per_category"].get(g)
                if c is None:
                    cells.append("")
                    continue
                same = f", {c['identical_rows']}/{c['rows']}" if c["rows"] else ""
                speed, accepted = _fmt(c["speedup_vs_hf"], ".2f", unit="x"), _fmt(c["mean_accepted"], ".2f", "1.00")
                cells.append(f"{speed}, {accepted}{same}")
            lines.append(f"| {r['method']} | {r['batch_size']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(report: dict, path: str | Path) -> None:
    """Speedup vs hf by category (the smallest batch size) and by batch size (overall), one bar
    per method; needs matplotlib (`pip install propd-compile[bench]`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in report["results"] if r["status"] == "ok" and r["method"] != BASELINE]
    names = list(dict.fromkeys(r["method"] for r in ok))
    sizes = report["settings"]["batch_sizes"]
    groups = report["settings"]["groups"]
    fig, (ax_c, ax_b) = plt.subplots(1, 2, figsize=(14, 4.8), gridspec_kw={"width_ratios": [2, 1]})
    width = 0.8 / max(len(names), 1)

    def bars(ax, labels: list, value: Callable[[str, Any], float | None]) -> None:
        for k, name in enumerate(names):
            ys = [value(name, x) for x in labels]
            ax.bar([i + (k - (len(names) - 1) / 2) * width for i in range(len(labels))],
                   [y or 0.0 for y in ys], width, label=name)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(labels)), [str(x) for x in labels], rotation=30 if labels is groups else 0)
        ax.set_ylabel("speedup vs HF greedy (same run)")

    def row(name: str, bs: int) -> dict | None:
        return next((r for r in ok if r["method"] == name and r["batch_size"] == bs), None)

    def per_cat(name: str, g: str) -> float | None:
        r = row(name, sizes[0])
        return r and r["per_category"].get(g, {}).get("speedup_vs_hf")

    bars(ax_c, groups, per_cat)
    ax_c.set_title(f"by category (batch {sizes[0]})")
    bars(ax_b, sizes, lambda name, bs: (row(name, bs) or {}).get("speedup_vs_hf"))
    ax_b.set_title("by batch size (all prompts)")
    ax_b.set_xlabel("batch size")
    ax_c.legend(fontsize="small", ncols=min(len(names), 4))
    fig.suptitle(f"propd bench, {report['settings']['max_new_tokens']} new tokens, "
                 f"torch {report['machine']['torch']}, torch threads: {report['machine']['threads']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save(report: dict, path: str | Path) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


def load(path: str | Path) -> dict:
    with open(path) as f:
        return json.load(f)


MD_BEGIN = "<!-- propd bench suite: generated by `propd bench --write-md`; edits here are overwritten -->"
MD_END = "<!-- end of propd bench suite -->"


def suite_section(report: dict, json_path: str, png_path: str | None) -> str:
    """The BENCHMARKS.md section for a suite report: command, machine, versions, every row, plot."""
    m, s = report["machine"], report["settings"]
    lines = [
        MD_BEGIN,
        "## Benchmark suite (`propd bench`)",
        "",
        "```",
        s.get("command", "propd bench"),
        "```",
        f"{s['prompts']} MT-Bench prompts ({', '.join(s['groups'])}), {s['max_new_tokens']} new tokens, "
        f"batch sizes {', '.join(map(str, s['batch_sizes']))}, {s['repeats']} repeat(s), "
        + (f"sampling {s['sample']}" if s["sample"] else "greedy") + ". "
        f"Machine: {m['platform']}, {m['processor']}, {m.get('cpus')} CPUs, torch threads: {m['threads']}"
        + (f", GPU {m['cuda']}" if m.get("cuda") else "") + f"; Python {m['python']}, torch {m['torch']}, "
        f"transformers {m['transformers']}."
        + (f" Run of {s['date']}, {s['wall_seconds'] / 60:.1f} min in all." if "date" in s else ""),
        "",
        "Methods:",
        "",
    ]
    for name, info in report["methods"].items():
        lines.append(f"- `{name}`: {info['description']}" + ("" if info["status"] == "ok" else f" ({info['status']})"))
    warm = {n: sum(d.values()) for n, d in report["warm_up_seconds"].items() if d}
    lines += [
        "",
        "Warm-up and compile time (excluded from tokens/s): "
        + ", ".join(f"{n} {t:.1f} s" for n, t in warm.items())
        + f"; graphs compiled while timing: {report['compile']['graphs_compiled_while_timing']}.",
        "",
        markdown(report),
        "",
        f"Raw numbers: [`{json_path}`]({json_path})."
        + (f" Plot: ![speedup by category and batch size]({png_path})" if png_path else ""),
        MD_END,
    ]
    return "\n".join(lines)


def write_md(md_path: str | Path, section: str) -> None:
    """Replace the generated section of `md_path` (between MD_BEGIN and MD_END), or append it;
    the hand-written sections around it stay as they are."""
    path = Path(md_path)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(MD_BEGIN) + r".*?" + re.escape(MD_END), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def _hf_step_seconds(model, batch: int, kv_len: int, repeats: int, gen: torch.Generator) -> float:
    """Median seconds of HF's own eager decoding step: one token per row after `kv_len` cached tokens."""
    from transformers import DynamicCache

    vocab = model.get_output_embeddings().weight.shape[0]
    cache = DynamicCache()
    model(input_ids=torch.randint(0, vocab, (batch, kv_len), generator=gen), past_key_values=cache, use_cache=True)
    step = torch.randint(0, vocab, (batch, 1), generator=gen)
    times = []
    for rep in range(repeats + 1):
        t = time.perf_counter()
        model(input_ids=step, past_key_values=cache, use_cache=True)
        times.append(time.perf_counter() - t)
        cache.crop(-1)  # drop the token this step added (transformers counts what to remove)
    return statistics.median(times[1:])


def verify_latency(
    model, forwards: dict[str, Callable], sizes=(1, 2, 4, 8, 16, 32, 64), batches=(1,), kv_len: int = 256,
    repeats: int = 7,
) -> dict:
    """Median latency of one verification forward per batch size and tree size (a chain-shaped
    tree mask over `kv_len` cached tokens), each forward interleaved with the others, and HF's
    own eager 1-token step at the same batch size as the reference (`ratio_to_hf_step`)."""
    from propd_compile.cache import TreeKVCache

    vocab = model.get_output_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    ms: dict[str, dict[int, dict[int, float]]] = {name: {} for name in forwards}
    hf: dict[int, float] = {}
    with torch.no_grad():
        for batch in batches:
            hf[batch] = 1e3 * _hf_step_seconds(model, batch, kv_len, repeats, gen)
            for name in forwards:
                ms[name][batch] = {}
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
                    ms[name][batch][T] = 1e3 * statistics.median(times[name])
    return {
        "kv_len": kv_len, "batches": list(batches), "sizes": list(sizes), "hf_step_ms": hf, "ms": ms,
        "ratio_to_hf_step": {n: {b: {T: v / hf[b] for T, v in d.items()} for b, d in bd.items()} for n, bd in ms.items()},
    }


def latency_markdown(report: dict) -> str:
    """One table per batch size: each forward's ms and its ratio to HF's eager 1-token step."""
    names = list(report["ms"])
    out = []
    for b in report["batches"]:
        b_ = b if b in report["hf_step_ms"] else str(b)
        out.append(f"Batch {b}, KV {report['kv_len']}: HF eager 1-token step {report['hf_step_ms'][b_]:.1f} ms\n")
        out.append("| tree nodes | " + " | ".join(f"{n} ms | {n} / HF step" for n in names) + " |")
        out.append("|---|" + "---|---|" * len(names))
        for T in report["sizes"]:
            cells = []
            for n in names:
                d, r = report["ms"][n][b_], report["ratio_to_hf_step"][n][b_]
                T_ = T if T in d else str(T)
                cells.append(f"{d[T_]:.1f} | {r[T_]:.2f}")
            out.append(f"| {T} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)
