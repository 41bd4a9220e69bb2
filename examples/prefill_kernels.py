"""Prefill cost on the embedded model: the compiled package vs eager kernels, by prompt length.

The package's GEMMs are autotuned for decode-sized steps (a few to tens of rows); a prefill runs
hundreds of rows, where MKL's GEMMs behind the eager forward are faster. This measures both on
single prompts of random tokens and on a left-padded batch of MT-Bench prompts, padded (every
position computed) and packed (real tokens only, as decoding runs it), which is what
`runtime_compile.EAGER_PREFILL_TOKENS` is set from. Needs the package (`propd warmup`).

    python examples/prefill_kernels.py --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from propd_compile import ProPDConfig, accelerate, models, prompts
from propd_compile.bench import _batch, mt_bench_prompts
from propd_compile.cache import TreeKVCache
from propd_compile.decoding import _prefill_mask, eager_forward


def seconds(forward, model, ids: torch.Tensor, valid: torch.Tensor, packed: bool, repeats: int) -> float:
    """Median seconds of one prefill (last-position logits) of a left-padded batch."""
    mask, pos = _prefill_mask(valid), (valid.long().cumsum(1) - 1).clamp(min=0)
    times = []
    for _ in range(repeats):
        cache = TreeKVCache.for_model(model, ids.shape[0], ids.shape[1] + 8)
        cache.begin_step(mask, valid if packed else None)
        t = time.perf_counter()
        forward(ids, mask, pos, cache, last_only=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 64, 96, 128, 256, 512])
    parser.add_argument("--batch", type=int, default=8, help="MT-Bench prompts in the batched case")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = models.load()
    accelerate(model, ProPDConfig(compile=True))
    forwards = {"package": model.propd.forward(hidden=True), "eager": eager_forward(model, hidden=True)}
    print("| prompt | real tokens | package ms | eager ms | eager / package |\n|---|---|---|---|---|")
    for n in args.lengths:
        ids = torch.randint(0, model.config.vocab_size, (1, n))
        valid = torch.ones(1, n, dtype=torch.bool)
        t = {k: seconds(f, model, ids, valid, True, args.repeats) for k, f in forwards.items()}
        print(f"| 1 x {n} random | {n} | {1e3 * t['package']:.0f} | {1e3 * t['eager']:.0f} | {t['eager'] / t['package']:.2f} |")
    batch = _batch(mt_bench_prompts(tokenizer, prompts.mt_bench_sample(1))[: args.batch], tokenizer.pad_token_id)
    ids, valid = batch["input_ids"], batch["attention_mask"].bool()
    for packed in (False, True):
        t = {k: seconds(f, model, ids, valid, packed, args.repeats) for k, f in forwards.items()}
        name = f"{ids.shape[0]} MT-Bench, {'packed' if packed else 'padded'} to {ids.shape[1]}"
        tokens = int(valid.sum()) if packed else ids.numel()
        print(f"| {name} | {tokens} | {1e3 * t['package']:.0f} | {1e3 * t['eager']:.0f} | {t['eager'] / t['package']:.2f} |")


if __name__ == "__main__":
    main()
