"""The `propd` command: generate with the embedded model, or benchmark against HF greedy."""
from __future__ import annotations

import argparse
import logging
import sys
import warnings

import torch

from propd_compile.config import ProPDConfig
from propd_compile.models import DEFAULT_MODEL


def _config(args) -> ProPDConfig:
    return ProPDConfig(max_tree_nodes=args.tree_nodes, tree=args.tree, compile=args.compile)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="embedded model name or a Hugging Face path")
    p.add_argument("--tree", default="ngram", choices=["ngram", "chain"])
    p.add_argument("--tree-nodes", type=int, default=ProPDConfig.max_tree_nodes, help="node budget per step")
    p.add_argument("--compile", action="store_true", help="verify through torch.compile(backend='propd')")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def cmd_generate(args) -> int:
    from transformers import TextStreamer

    import propd_compile
    from propd_compile import models
    from propd_compile.prompts import chat_prompt

    model, tok = models.load(args.model)
    propd_compile.accelerate(model, _config(args))
    text = args.prompt if args.raw else chat_prompt(tok, args.prompt)
    enc = tok(text, return_tensors="pt")
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    model.generate(**enc, max_new_tokens=args.max_new_tokens, streamer=streamer)
    st = model.propd_stats
    print(
        f"\n[propd] {st.new_tokens} tokens in {st.seconds:.2f}s ({st.tokens_per_second:.1f} tok/s), "
        f"{st.steps} steps, {st.mean_accepted:.2f} tokens/step, {st.mean_tree_nodes:.1f} tree nodes/step",
        file=sys.stderr,
    )
    return 0


def cmd_bench(args) -> int:
    from propd_compile import bench, models, prompts

    model, tok = models.load(args.model)
    if args.quick:
        questions = prompts.mt_bench_sample(1)
        batch_sizes, max_new, repeats = (1,), 32, 1
    else:
        questions = prompts.mt_bench_sample(args.per_category)
        batch_sizes, max_new, repeats = tuple(args.batch_sizes), args.max_new_tokens, args.repeats
    report = bench.run(
        model, tok, questions, batch_sizes=batch_sizes, max_new_tokens=max_new, repeats=repeats,
        configs={"propd": _config(args)},
    )
    report["settings"]["command"] = "propd " + " ".join(sys.argv[1:])
    print(bench.markdown(report))
    if args.json:
        bench.save(report, args.json)
    failed = [r for r in report["results"] if r["identical_rate"] != 1.0]
    if failed:
        print(f"[propd] NOT LOSSLESS: {[(r['method'], r['batch_size']) for r in failed]}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="propd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="stream an answer from the (embedded) model with token-tree decoding")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    _add_common(g)
    g.set_defaults(func=cmd_generate)
    b = sub.add_parser("bench", help="ProPD vs HF greedy generate on MT-Bench turn 1 (same run, identical-output check)")
    b.add_argument("--quick", action="store_true", help="8 prompts, 32 tokens, batch 1: a smoke test")
    b.add_argument("--per-category", type=int, default=2, help="MT-Bench questions per category (10 = all)")
    b.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    b.add_argument("--max-new-tokens", type=int, default=128)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--json", help="write the report here")
    _add_common(b)
    b.set_defaults(func=cmd_bench)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
