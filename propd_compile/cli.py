"""The `propd` command: generate with the embedded model, or benchmark against HF greedy."""
from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import warnings
from pathlib import Path

import torch

from propd_compile.config import TREES, ProPDConfig
from propd_compile.models import DEFAULT_MODEL


COMPILE = {"auto": "auto", "on": True, "off": False}


def _config(args) -> ProPDConfig:
    return ProPDConfig(
        max_tree_nodes=args.tree_nodes, tree=args.tree, compile=COMPILE[args.compile], heads=args.heads, drafter=args.drafter,
        drafters=tuple(args.drafters) if args.drafters else None,
    )


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="embedded model name or a Hugging Face path")
    p.add_argument("--tree", default="dynamic", choices=list(TREES))
    p.add_argument("--heads", default=None, help="draft heads directory (default: heads shipped for the model)")
    p.add_argument("--drafters", nargs="+", default=None, choices=["ngram", "heads", "feature"],
                   help="drafters to fuse (default: feature + ngram with a feature drafter, else heads + ngram "
                        "when heads are available, else ngram)")
    p.add_argument("--drafter", default=None, help="feature drafter directory (default: the one shipped for the model)")
    p.add_argument("--tree-nodes", type=int, default=ProPDConfig.max_tree_nodes, help="node budget per step")
    p.add_argument("--compile", choices=list(COMPILE), default="auto",
                   help="compiled kernels: auto (when `propd warmup` built them), on (build if missing), off")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _generate_prompts(args) -> list[str]:
    """The prompts: the arguments, or one per line of --file (`-`: stdin), or stdin when piped."""
    if args.file:
        stream = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")
        with stream:
            return [line.rstrip("\n") for line in stream if line.strip()]
    if args.prompt:
        return args.prompt
    if not sys.stdin.isatty():
        return [line.rstrip("\n") for line in sys.stdin if line.strip()]
    raise SystemExit("propd generate: give a prompt, --file FILE (one prompt per line; - for stdin), or pipe prompts in")


def _generate_kwargs(args) -> dict:
    """HF generate arguments from the flags: greedy unless a sampling flag is given."""
    kwargs = dict(max_new_tokens=args.max_new_tokens)
    sampling = {k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p), ("top_k", args.top_k))
                if v is not None}
    if sampling and args.temperature != 0:
        kwargs.update(do_sample=True, **sampling)
    if args.repetition_penalty is not None:
        kwargs["repetition_penalty"] = args.repetition_penalty
    return kwargs


def _timed(generate, enc: dict, kwargs: dict, seed: int | None) -> tuple[torch.Tensor, float]:
    import time

    if seed is not None:
        torch.manual_seed(seed)
    t = time.perf_counter()
    out = generate(**enc, **kwargs)
    return out, time.perf_counter() - t


def cmd_generate(args) -> int:
    from transformers import TextStreamer

    import propd_compile
    from propd_compile import bench, models
    from propd_compile.prompts import chat_prompt

    texts = _generate_prompts(args)
    model, tok = models.load(args.model)
    propd_compile.accelerate(model, _config(args))
    enc = tok([chat_prompt(tok, t) if args.chat else t for t in texts], return_tensors="pt", padding=True)
    P = enc["input_ids"].shape[1]
    kwargs = _generate_kwargs(args)
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or [])
    if args.compare:  # a short warm-up of both, then each timed once on the same prompts
        hf_generate = functools.partial(type(model).generate, model)
        for generate in (hf_generate, model.generate):
            generate(**enc, **{**kwargs, "max_new_tokens": min(8, args.max_new_tokens)})
        hf_out, hf_s = _timed(hf_generate, enc, kwargs, args.seed)
    stream = len(texts) == 1 and not args.compare
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True) if stream else None
    out, seconds = _timed(model.generate, enc, {**kwargs, "streamer": streamer}, args.seed)
    new = bench._new_rows(out, P, eos)
    if not stream:
        for i, row in enumerate(new):
            print(("" if len(new) == 1 else f"[{i}] ") + tok.decode(row, skip_special_tokens=True))
    st = model.propd.stats
    kernels = "compiled kernels" if st.compiled else "eager kernels; `propd warmup` builds compiled ones once"
    print(
        f"\n[propd] {st.new_tokens} tokens in {st.seconds:.2f}s ({st.tokens_per_second:.1f} tok/s), "
        f"{st.steps} steps, {st.mean_accepted:.2f} tokens/step, {st.mean_tree_nodes:.1f} tree nodes/step ({kernels})",
        file=sys.stderr,
    )
    if args.compare:
        hf_new = bench._new_rows(hf_out, P, eos)
        hf_rate, rate = sum(map(len, hf_new)) / hf_s, sum(map(len, new)) / seconds
        same = "n/a (sampling draws differ; the distribution is the same)" if kwargs.get("do_sample") else (
            "yes" if hf_new == new else "NO")
        print(f"[compare] HF generate {hf_rate:.1f} tok/s, propd {rate:.1f} tok/s, speedup {rate / hf_rate:.2f}x, "
              f"identical: {same}")
        return 0 if same != "NO" else 1
    return 0


def cmd_latency(args, model) -> int:
    """Verification-step latency per tree size and batch size: HF's eager 1-token step, eager
    and compiled tree steps, same run."""
    import time

    import propd_compile
    from propd_compile import bench
    from propd_compile.decoding import eager_forward

    config = ProPDConfig(compile=True)
    propd_compile.accelerate(model, config)
    t = time.perf_counter()
    compiled = model.propd.forward(config)
    ready_s = time.perf_counter() - t
    report = bench.verify_latency(
        model, {"eager": eager_forward(model), "propd": compiled}, kv_len=args.kv_len, batches=args.batch_sizes,
        repeats=args.repeats,
    )
    report["compiled_ready_seconds"] = ready_s
    report["machine"] = bench.machine_info()
    report["command"] = "propd " + " ".join(sys.argv[1:])
    print(bench.latency_markdown(report))
    if args.json:
        bench.save(report, args.json)
    return 0


def cmd_warmup(args) -> int:
    """Build (or find) the compiled kernels for a model on this machine, then calibrate the
    dynamic tree's latency model on them: later runs start compiled in seconds."""
    import json
    import time

    import propd_compile
    from propd_compile import models
    from propd_compile.cost_model import calibrate, save_calibration
    from propd_compile.runtime_compile import manifest_path, package_key

    model, _ = models.load(args.model)
    config = ProPDConfig(compile=True)
    propd_compile.accelerate(model, config)
    key = package_key(model, config)
    built = not key.path().exists()
    t = time.perf_counter()
    forward = model.propd.forward(config)
    manifest = json.loads(manifest_path(key.path()).read_text())
    print(f"[propd] compiled kernels {'built' if built else 'found'}: {key.path()} "
          f"(first compile {manifest['compile_seconds']:.0f} s; ready in {time.perf_counter() - t:.1f} s)")
    if not args.no_calibrate:
        report = calibrate(model, forward, batch_sizes=args.batch_sizes, tree_sizes=args.tree_sizes,
                           kv_lengths=args.kv_lengths, repeats=args.repeats)
        report["command"] = "propd " + " ".join(sys.argv[1:])
        path = save_calibration(model, report, compiled=True)
        print(f"[propd] latency model of the compiled kernels: held-out MAPE {100 * report['held_out_mape']:.1f}%, saved to {path}")
    return 0


# --quick: a CI smoke test (a few minutes on 2 cores) that checks losslessness only, never speed.
QUICK = dict(per_category=1, prompts=2, max_new_tokens=24, batch_sizes=[1, 2], repeats=1)
LARGE_BATCHES = [16, 32]


def cmd_bench(args) -> int:
    """The benchmark suite (see propd_compile.bench); --write-md JSON only rewrites BENCHMARKS.md."""
    from propd_compile import bench, models, prompts

    if args.write_md:
        _write_bench_md(bench.load(args.write_md), args.write_md, args.md)
        return 0
    if args.write_md == "" and not args.json:
        raise SystemExit("propd bench: a bare --write-md needs --json (the markdown links the JSON and the plot)")
    model, tok = models.load(args.model)
    if args.latency:
        return cmd_latency(args, model)
    if args.quick:
        vars(args).update(QUICK, methods=args.methods or list(bench.QUICK_METHODS))
    batch_sizes = tuple(args.batch_sizes + (LARGE_BATCHES if args.large_batches else []))
    questions = prompts.mt_bench_sample(args.per_category)[: args.prompts]
    items = bench.mt_bench_prompts(
        tok, questions, turn2=args.turn2,
        answer=lambda texts: bench.hf_answers(model, tok, texts, args.max_new_tokens, max(batch_sizes)),
    )
    report = bench.run(
        model, items, methods={m: bench.METHODS[m] for m in args.methods or bench.METHODS}, base=_config(args),
        batch_sizes=batch_sizes, max_new_tokens=args.max_new_tokens, repeats=args.repeats,
        sample={"temperature": args.temperature} if args.temperature else None,
    )
    report["settings"]["command"] = "propd " + " ".join(sys.argv[1:])
    print(bench.markdown(report))
    if args.json:
        bench.save(report, args.json)
        if args.write_md is not None:  # bare --write-md: this run's report
            _write_bench_md(report, args.json, args.md)
        else:
            _plot(report, args.json)
    bad = [
        (r["method"], r["batch_size"], r["status"]) for r in report["results"]
        if r["status"].startswith("failed")
        or (bench.METHODS[r["method"]].propd is not None and r.get("identical_rate") not in (1.0, None))
    ]
    if bad:
        print(f"[propd] NOT LOSSLESS or FAILED: {bad}", file=sys.stderr)
        return 1
    return 0


def _plot(report: dict, json_path: str) -> str | None:
    """The plot beside the JSON; None (and a note) without matplotlib."""
    from propd_compile import bench

    png = str(Path(json_path).with_suffix(".png"))
    try:
        bench.plot(report, png)
    except ImportError:
        print("[propd] no plot: matplotlib is missing (pip install propd-compile[bench])", file=sys.stderr)
        return None
    return png


def _relative(path: str, to_dir: Path) -> str:
    """`path` as a link from a markdown file in `to_dir`."""
    return Path(os.path.relpath(Path(path).resolve(), to_dir)).as_posix()


def _write_bench_md(report: dict, json_path: str, md_path: str) -> None:
    """BENCHMARKS.md's generated suite section from `report`, the plot regenerated beside the JSON."""
    from propd_compile import bench

    png = _plot(report, json_path)
    here = Path(md_path).resolve().parent
    bench.write_md(md_path, bench.suite_section(report, _relative(json_path, here), png and _relative(png, here)))
    print(f"[propd] {md_path}: suite section written from {json_path}, plot {png}", file=sys.stderr)


def cmd_train_heads(args) -> int:
    import json

    from propd_compile import models
    from propd_compile.train_heads import TrainSettings, train_heads

    model, tok = models.load(args.model)
    settings = TrainSettings(
        num_heads=args.num_heads, num_prompts=args.prompts, prompt_tokens=args.prompt_tokens,
        answer_tokens=args.answer_tokens, gen_batch_size=args.gen_batch_size, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, own_projection=args.own_projection, save_dtype=args.save_dtype,
        seed=args.seed, root_token=not args.no_root_token, eval_mt_bench=not args.no_mt_bench,
    )
    report = train_heads(model, args.out, tokenizer=tok, settings=settings, model_name=args.model)
    print(json.dumps({k: report[k] for k in ("top1", "top5", "train_positions", "held_out_positions", "total_seconds", "mt_bench")
                      if k in report} | {"prompts": report.get("prompts"), "answers": report.get("answers"),
                                         "step_seconds": report.get("step_seconds")}, indent=1))
    return 0


def cmd_train_drafter(args) -> int:
    import json

    from propd_compile import models
    from propd_compile.train_drafter import DrafterSettings, train_drafter

    model, tok = models.load(args.model)
    settings = DrafterSettings(
        own_prompts=args.own_prompts, answer_tokens=args.answer_tokens, fixed_tokens=args.fixed_tokens,
        draft_vocab=args.draft_vocab, ttt_steps=args.ttt_steps, epochs=args.epochs, lr=args.lr, seed=args.seed,
        max_train_tokens=args.max_train_tokens, eval_mt_bench=not args.no_mt_bench,
        batch_seqs=args.batch_seqs, mixed_precision=not args.fp32,
    )
    report = train_drafter(model, args.out, tokenizer=tok, settings=settings, model_name=args.model)
    print(json.dumps({k: report.get(k) for k in ("draft_vocab", "held_out", "data")}, indent=1))
    return 0


def cmd_build_phrases(args) -> int:
    import propd_compile
    from propd_compile import models
    from propd_compile.phrases import build_phrases
    from propd_compile.train_heads import TrainSettings

    model, tok = models.load(args.model)
    propd_compile.accelerate(model)  # greedy answers through propd: the same tokens, faster
    settings = TrainSettings(num_prompts=args.prompts, answer_tokens=args.answer_tokens, seed=args.seed)
    phrases = build_phrases(model, tok, args.out, settings, batch_size=args.batch_size, model_name=args.model)
    print(f"[propd] {args.out}: {phrases.config['tokens']} tokens of the model's own answers to "
          f"{phrases.config['recipe']['prompts']} self-written prompts")
    return 0


def cmd_calibrate(args) -> int:
    """Measure verification steps on this machine, report the held-out error, save the fit."""
    import propd_compile
    from propd_compile import models
    from propd_compile.cost_model import calibrate, save_calibration

    model, _ = models.load(args.model)
    config = ProPDConfig(compile=COMPILE[args.compile] if args.compile != "auto" else "auto")
    propd_compile.accelerate(model, config)
    compiled = model.propd.compiled(config)
    report = calibrate(
        model, model.propd.forward(config), batch_sizes=args.batch_sizes, tree_sizes=args.tree_sizes,
        kv_lengths=args.kv_lengths, repeats=args.repeats,
    )
    report["command"] = "propd " + " ".join(sys.argv[1:])
    path = save_calibration(model, report, compiled, Path(args.out) if args.out else None)
    print(f"held-out MAPE {100 * report['held_out_mape']:.1f}% on {report['held_out_points']} of {len(report['points'])} "
          f"step shapes ({'compiled' if compiled else 'eager'} kernels); fit saved to {path} "
          "(dynamic trees on this machine start from it)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="propd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="stream an answer from the (embedded) model with token-tree decoding")
    g.add_argument("prompt", nargs="*", help="prompt(s), decoded as one batch (default: --file, or stdin)")
    g.add_argument("--file", help="prompts, one per line, decoded as one batch (- reads stdin)")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="wrap each prompt in the model's chat template (default) or pass it as is")
    g.add_argument("--compare", action="store_true",
                   help="also run HF generate on the same prompts: both tokens/s, the speedup, identical outputs")
    g.add_argument("--temperature", type=float, default=None, help="sample (0: greedy)")
    g.add_argument("--top-p", type=float, default=None, help="sample with nucleus top-p")
    g.add_argument("--top-k", type=int, default=None, help="sample among the top-k tokens")
    g.add_argument("--seed", type=int, default=None, help="torch.manual_seed before generating")
    g.add_argument("--repetition-penalty", type=float, default=None, help="HF's repetition_penalty (e.g. 1.2)")
    _add_common(g)
    g.set_defaults(func=cmd_generate)
    from propd_compile.bench import METHODS

    b = sub.add_parser("bench", help="the benchmark suite: HF baselines vs ProPD methods on MT-Bench (same run)")
    b.add_argument("--methods", nargs="+", default=None, choices=list(METHODS),
                   help="methods to run (default: all; hf, the baseline, always runs)")
    b.add_argument("--quick", action="store_true",
                   help="smoke test: 4 prompts, 32 tokens, batch 1 and 4, the methods that need no compiling")
    b.add_argument("--per-category", type=int, default=1, help="MT-Bench questions per category (10 = all)")
    b.add_argument("--prompts", type=int, default=None, help="use only the first N sampled questions")
    b.add_argument("--turn2", action="store_true", help="also MT-Bench turn 2 (after HF greedy's turn-1 answer)")
    b.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    b.add_argument("--large-batches", action="store_true", help=f"add batch sizes {LARGE_BATCHES}")
    b.add_argument("--max-new-tokens", type=int, default=256)
    b.add_argument("--repeats", type=int, default=1)
    b.add_argument("--json", help="write the report here (and the plot beside it, .png)")
    b.add_argument("--write-md", nargs="?", const="", default=None, metavar="JSON",
                   help="rewrite the suite section of --md from JSON (no run); bare: from this run's --json")
    b.add_argument("--md", default="BENCHMARKS.md", help="markdown file for --write-md")
    b.add_argument("--temperature", type=float, default=None, help="sample at this temperature (HF sampling vs propd)")
    b.add_argument("--latency", action="store_true", help="verification latency per tree size, eager vs compiled")
    b.add_argument("--kv-len", type=int, default=256, help="KV cache length for --latency")
    _add_common(b)
    b.set_defaults(func=cmd_bench)
    from propd_compile.train_heads import TrainSettings

    d = TrainSettings()
    t = sub.add_parser("train-heads", help="train Medusa draft heads by self-distillation (offline, resumable)")
    t.add_argument("--model", default=DEFAULT_MODEL, help="embedded model name or a Hugging Face path")
    t.add_argument("--out", required=True, help="output directory (rerun with the same --out to resume)")
    t.add_argument("--num-heads", type=int, default=d.num_heads)
    t.add_argument("--prompts", type=int, default=d.num_prompts, help="self-written prompts to answer")
    t.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens, help="longest sampled prompt")
    t.add_argument("--answer-tokens", type=int, default=d.answer_tokens, help="longest greedy answer")
    t.add_argument("--gen-batch-size", type=int, default=d.gen_batch_size)
    t.add_argument("--epochs", type=int, default=d.epochs)
    t.add_argument("--batch-size", type=int, default=d.batch_size, help="training positions per step")
    t.add_argument("--lr", type=float, default=d.lr)
    t.add_argument("--own-projection", action="store_true", help="a trainable LM-head copy per head (large)")
    t.add_argument("--no-root-token", action="store_true", help="plain Medusa heads (not reading the root token)")
    t.add_argument("--no-mt-bench", action="store_true", help="skip the accuracy report on MT-Bench answers")
    t.add_argument("--save-dtype", default=d.save_dtype, choices=["float16", "bfloat16", "float32"])
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    t.set_defaults(func=cmd_train_heads)
    from propd_compile.train_drafter import DrafterSettings

    dd = DrafterSettings()
    td = sub.add_parser("train-drafter", help="train the feature (EAGLE-style) drafter by self-distillation (offline, resumable)")
    td.add_argument("--model", default=DEFAULT_MODEL, help="embedded model name or a Hugging Face path")
    td.add_argument("--out", required=True, help="output directory (rerun with the same --out to resume)")
    td.add_argument("--own-prompts", type=int, default=dd.own_prompts, help="self-written prompts answered greedily")
    td.add_argument("--answer-tokens", type=int, default=dd.answer_tokens, help="longest greedy answer")
    td.add_argument("--fixed-tokens", type=int, default=dd.fixed_tokens, help="fixed-text (package docstring) tokens")
    td.add_argument("--draft-vocab", type=int, default=dd.draft_vocab, help="draft vocabulary size (most frequent tokens)")
    td.add_argument("--ttt-steps", type=int, default=dd.ttt_steps, help="training-time-test steps (draft depths trained)")
    td.add_argument("--epochs", type=int, default=dd.epochs)
    td.add_argument("--lr", type=float, default=dd.lr)
    td.add_argument("--max-train-tokens", type=int, default=None, help="cap on training positions per epoch")
    td.add_argument("--batch-seqs", type=int, default=dd.batch_seqs, help="sequences per optimiser step")
    td.add_argument("--fp32", action="store_true", help="train in fp32 (default: bf16 autocast where the CPU has bf16 units)")
    td.add_argument("--no-mt-bench", action="store_true", help="skip the acceptance report on MT-Bench answers")
    td.add_argument("--seed", type=int, default=dd.seed)
    td.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    td.set_defaults(func=cmd_train_drafter)
    ph = sub.add_parser("build-phrases", help="a corpus of the model's own greedy answers for the n-gram drafter (resumable)")
    ph.add_argument("--model", default=DEFAULT_MODEL, help="embedded model name or a Hugging Face path")
    ph.add_argument("--out", required=True, help="output directory (rerun with the same --out to resume)")
    ph.add_argument("--prompts", type=int, default=1200, help="self-written prompts to answer")
    ph.add_argument("--answer-tokens", type=int, default=256, help="longest greedy answer")
    ph.add_argument("--batch-size", type=int, default=16, help="prompts answered together")
    ph.add_argument("--seed", type=int, default=0, help="seed of the prompt sampling")
    ph.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ph.set_defaults(func=cmd_build_phrases)
    c = sub.add_parser("calibrate", help="measure this machine's verification step latency for the dynamic tree")
    c.add_argument("--model", default=DEFAULT_MODEL)
    c.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    c.add_argument("--tree-sizes", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64])
    c.add_argument("--kv-lengths", type=int, nargs="+", default=[64, 256, 512])
    c.add_argument("--repeats", type=int, default=3)
    c.add_argument("--compile", choices=list(COMPILE), default="off",
                   help="calibrate the compiled kernels (on: build them if missing; auto: if built) or eager (off)")
    c.add_argument("--out", default=None, help="where to save the fit (default: the cache, where decoding looks)")
    c.add_argument("--threads", type=int, default=None, help="torch CPU threads (the fit is per thread count)")
    c.set_defaults(func=cmd_calibrate)
    w = sub.add_parser("warmup", help="build this machine's compiled kernels for a model (once; minutes) and calibrate them")
    w.add_argument("--model", default=DEFAULT_MODEL)
    w.add_argument("--no-calibrate", action="store_true", help="only build the kernels")
    w.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    w.add_argument("--tree-sizes", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8, 12, 16, 24, 32])
    w.add_argument("--kv-lengths", type=int, nargs="+", default=[64, 256, 512])
    w.add_argument("--repeats", type=int, default=3)
    w.add_argument("--threads", type=int, default=None, help="torch CPU threads (kernels and fit are per thread count)")
    w.set_defaults(func=cmd_warmup)
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
    try:
        return args.func(args)
    finally:  # called in-process (tests, notebooks), a command leaves the thread count as it was
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
