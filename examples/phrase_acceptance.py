"""Tokens per step of fixed-size n-gram trees with and without the model's own phrases.

Timing-independent: the model's greedy answers to MT-Bench turn 1 are decoded once (through
propd, token-identical to HF greedy), then replayed: at every step the n-gram drafter proposes
a tree of `budget` nodes from the text so far, and the step emits the longest drafted path
that the answer continues plus the next token, as verification would.

    python examples/phrase_acceptance.py --threads 2 --budgets 2 4 8
"""
from __future__ import annotations

import argparse

import torch

import propd_compile
from propd_compile import ProPDConfig, models
from propd_compile.decoding import greedy_accept
from propd_compile.drafters import NGramDrafter, phrase_index
from propd_compile.prompts import chat_prompt, mt_bench_sample
from propd_compile.tree import TreeBatch


def replay(answers: list[tuple[list[int], list[int]]], make, budget: int) -> float:
    """Tokens per step over (prompt, answer) pairs with the drafter `make()` builds."""
    tokens = steps = 0
    for prompt, answer in answers:
        drafter = make()
        drafter.start([prompt])
        t = 0
        while t < len(answer):
            tree = drafter.propose(0, budget)
            # the decode loop's greedy rule, the answer's next token standing in for the model's
            # argmax after each node (none past the answer's end)
            after = [answer[t + d] if t + d < len(answer) else -1 for d in tree.depths]
            path = greedy_accept(TreeBatch.stack([tree]), torch.tensor([after]))[0]
            emitted = answer[t : t + len(path)]
            drafter.advance(0, emitted)
            t, steps, tokens = t + len(emitted), steps + 1, tokens + len(emitted)
    return tokens / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--per-category", type=int, default=10, help="MT-Bench questions per category (10 = all 80)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--budgets", type=int, nargs="+", default=[2, 4, 8])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = models.load()
    propd_compile.accelerate(model)
    answers = []
    for q in mt_bench_sample(args.per_category):
        enc = tok(chat_prompt(tok, q.turns[0]), return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=args.max_new_tokens)[0].tolist()
        prompt, answer = out[: enc.input_ids.shape[1]], out[enc.input_ids.shape[1] :]
        while answer and answer[-1] in (tok.eos_token_id, tok.pad_token_id):
            answer.pop()
        answers.append((prompt, answer))
    config = ProPDConfig()
    phrases = phrase_index(config, model)
    if phrases is None:
        raise SystemExit("no phrase corpus for this model: make one with `propd build-phrases`")
    print(f"{len(answers)} answers, {sum(len(a) for _, a in answers)} tokens")
    print("| tree nodes | n-gram (own text) | + phrases | ratio |\n|---|---|---|---|")
    for budget in args.budgets:
        own = replay(answers, lambda: NGramDrafter(config.ngram_max, config.max_depth), budget)
        both = replay(answers, lambda: NGramDrafter(config.ngram_max, config.max_depth, phrases=phrases), budget)
        print(f"| {budget} | {own:.3f} | {both:.3f} | {both / own:.3f}x |")


if __name__ == "__main__":
    main()
