"""Replay tree policies over the model's greedy answers: tokens per step and speed, no decoding.

Greedy output does not depend on the trees (it is lossless), so the candidate tree the drafters
propose at every position of an answer, and which of its nodes verification would accept, can be
computed once. A policy then replays decoding over them: a fixed tree size (the drafters' best N
nodes), or the dynamic planner itself (`TreePlanner`, learning online as in decoding) on a
simulated clock. The clock charges each step the compiled forward measured here for its tree size
(`cost_model.measure_step`, KV 256) plus what a step costs around the forward: --plain-ms for a
plain step, --spec-ms for a speculative one, --ngram-ms / --heads-ms for drafting (the cheap tier,
and the heads on top) and --plan-ms for planning (defaults: the phases measured on the project's
2-core Zen 4 box, 2 threads). Speeds are relative to plain steps on the same clock.

A policy replays in seconds instead of a decoding run's minutes, and without the machine's
noise; a real A/B (examples/tree_size_sweep.py, `propd bench`) confirms what it finds.

    python examples/planner_replay.py --threads 2 --per-category 10
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

import propd_compile
from propd_compile import ProPDConfig, models
from propd_compile.acceptance import AcceptanceModel, RankStats
from propd_compile.cost_model import LatencyModel, features, measure_step
from propd_compile.decoding import greedy_accept
from propd_compile.drafters import FusedDrafter, HeadsDrafter, build_drafter
from propd_compile.planner import TreePlanner
from propd_compile.prompts import chat_prompt, mt_bench_sample
from propd_compile.tree import TokenTree, TreeBatch

SIZES = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32)


def accepted_path(tree: TokenTree, answer: list[int], k: int) -> list[int]:
    """The nodes greedy verification accepts when `k` answer tokens are emitted (root: answer[k - 1]):
    the decode loop's own rule, the answer's next token standing in for the model's argmax after
    each node (none past the answer's end)."""
    after = [answer[k + d] if k + d < len(answer) else -1 for d in tree.depths]
    return greedy_accept(TreeBatch.stack([tree]), torch.tensor([after]))[0]


@torch.no_grad()
def candidate_trees(model, drafter: FusedDrafter, prompt: list[int], answer: list[int], budget: int):
    """Per emitted-token count k = 1..len(answer): (n-gram tree, heads + n-gram tree, the heads' top-k)."""
    heads = next(d for d in drafter.drafters if isinstance(d, HeadsDrafter))
    h = model.base_model(input_ids=torch.tensor([prompt + answer])).last_hidden_state[0]
    hidden = h[len(prompt) - 1 : len(prompt) + len(answer) - 1]  # the root's hidden state at each k
    root = heads.embed(torch.tensor(answer)) if heads.heads.root_token else None
    logits, vocab = heads.heads.draft_logits(hidden, heads.lm_head, num_heads=heads.depth, root=root, packed=True)
    probs, ids = logits.float().softmax(-1).topk(heads.topk, dim=-1)
    probs, ids = probs.tolist(), (ids if vocab is None else vocab[ids]).tolist()
    drafter.start([prompt])
    out = []
    for k in range(1, len(answer) + 1):
        drafter.advance(0, [answer[k - 1]])
        cheap = drafter.propose(0, budget)
        heads.top[0] = (probs[k - 1], ids[k - 1])
        out.append((cheap, drafter.propose(0, budget), heads.top[0]))
        heads.top[0] = None
    return out


class Clock:
    """Milliseconds of a step: the measured forward for its tree size, plus the costs around it."""

    def __init__(self, forward_ms: dict[int, float], args) -> None:
        self.sizes, self.forward = np.array(sorted(forward_ms)), np.array([forward_ms[n] for n in sorted(forward_ms)])
        self.args = args

    def forward_ms(self, n: int) -> float:
        return float(np.interp(n, self.sizes, self.forward))

    def step_ms(self, n: int, speculated: bool, heads: bool, planned: bool) -> float:
        a = self.args
        if not speculated:
            return self.forward_ms(1) + a.plain_ms
        return self.forward_ms(n) + a.spec_ms + a.ngram_ms + heads * a.heads_ms + planned * a.plan_ms


def replay_fixed(answers, trees, clock: Clock, n: int, heads: bool) -> tuple[float, float]:
    """(tokens per step, milliseconds) of fixed trees of the drafters' best `n` nodes."""
    tokens = steps = ms = 0.0
    for (_, answer), per_k in zip(answers, trees):
        k = 1
        while k < len(answer):
            tree = per_k[k - 1][1 if heads else 0]
            best = sorted(range(1, len(tree)), key=lambda i: (-tree.scores[i], tree.depths[i], i))[: n - 1]
            path = accepted_path(tree.subtree([0, *best]), answer, k)
            k, tokens, steps = k + len(path), tokens + len(path), steps + 1
            ms += clock.step_ms(n, n > 1, heads and n > 1, False)
    return tokens / steps, ms


def replay_planner(answers, trees, clock: Clock, heads: HeadsDrafter, config: ProPDConfig) -> tuple[float, float]:
    """(tokens per step, milliseconds) of the dynamic planner, learning as it goes (one planner
    for all answers, as in one process), its latency model fit to the clock; `heads` (the
    drafter's) records what its heads' ranks verified into the planner's statistics."""
    latency = LatencyModel()
    for n in clock.sizes:
        latency.observe(features(1, int(n), int(n), 256), clock.forward_ms(int(n)) / 1e3)
    latency.fit()
    heads.rank_stats = RankStats.for_heads(heads.heads, config.heads_topk)  # as `planner.new_planner` starts
    planner = TreePlanner(AcceptanceModel(rank_stats=heads.rank_stats), latency, config.max_tree_nodes)
    tokens = steps = ms = 0.0
    a = clock.args
    for (prompt, answer), per_k in zip(answers, trees):
        planner.start_call()
        k, speculating, costly = 1, True, True
        while k < len(answer):
            cheap, with_heads, top = per_k[k - 1]
            tree = TokenTree.root_only(answer[k - 1])
            if speculating:
                tree = planner.plan([with_heads if costly else cheap], len(prompt) + k, costly=costly)[0]
            path = accepted_path(tree, answer, k)
            emitted = answer[k : k + len(path)]
            planner.observe([tree], [path], clock.forward_ms(len(tree)) / 1e3, 1, len(tree), len(prompt) + k)
            heads.top[0] = top if speculating and costly else None  # the heads drafted this step
            heads.advance(0, emitted)
            step = clock.step_ms(len(tree), speculating, costly, True)
            around = (a.spec_ms if speculating else a.plain_ms) / 1e3
            speculation = (a.ngram_ms + costly * a.heads_ms + a.plan_ms) / 1e3 if speculating else None
            planner.observe_overhead(len(tree), around, 1, speculation, costly=costly)
            k, tokens, steps, ms = k + len(path), tokens + len(path), steps + 1, ms + step
            speculating, costly = planner.next_step(1)
    return tokens / steps, ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--per-category", type=int, default=10, help="MT-Bench questions per category (10 = all 80)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--fixed", type=int, nargs="+", default=[2, 3, 4, 5, 6, 8])
    ap.add_argument("--plain-ms", type=float, default=1.5, help="a plain step's time outside its forward")
    ap.add_argument("--spec-ms", type=float, default=2.5, help="a speculative step's time outside forward, drafting, planning")
    ap.add_argument("--ngram-ms", type=float, default=0.3, help="n-gram drafting per step")
    ap.add_argument("--heads-ms", type=float, default=1.2, help="the draft heads per step")
    ap.add_argument("--plan-ms", type=float, default=0.4, help="planning per step")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = models.load()
    config = ProPDConfig(compile=True)
    propd_compile.accelerate(model, config)
    drafter = build_drafter(config, model)
    if not isinstance(drafter, FusedDrafter) or not any(isinstance(d, HeadsDrafter) for d in drafter.drafters):
        raise SystemExit("this replay compares the heads + n-gram tiers: the model needs draft heads")
    answers = []
    for q in mt_bench_sample(args.per_category):
        enc = tok(chat_prompt(tok, q.turns[0]), return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=args.max_new_tokens)[0].tolist()
        answers.append((out[: enc.input_ids.shape[1]], out[enc.input_ids.shape[1] :]))
    trees = [candidate_trees(model, drafter, p, a, config.max_tree_nodes) for p, a in answers]
    forward = model.propd.forward(config, hidden=True)
    forward_ms = {n: 1e3 * measure_step(model, forward, 1, n, 256, repeats=15) for n in SIZES}
    clock = Clock(forward_ms, args)
    plain_rate = 1.0 / clock.step_ms(1, False, False, False)
    heads = next(d for d in drafter.drafters if isinstance(d, HeadsDrafter))
    rows = []
    for n in args.fixed:
        for with_heads in (False, True):
            tau, ms = replay_fixed(answers, trees, clock, n, with_heads)
            rows.append((f"fixed {n}, {'heads + n-gram' if with_heads else 'n-gram'}", tau, ms))
    tau, ms = replay_planner(answers, trees, clock, heads, config)
    rows.append(("dynamic (the planner)", tau, ms))
    tokens = sum(len(a) - 1 for _, a in answers)
    print(f"{len(answers)} answers, {tokens} tokens; forward ms by tree size: "
          + ", ".join(f"{n}: {v:.1f}" for n, v in forward_ms.items()))
    print("| policy | tokens per step | speed vs plain steps |\n|---|---|---|")
    for name, tau, ms in rows:
        print(f"| {name} | {tau:.3f} | {tokens / ms / plain_rate:.3f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "forward_ms": forward_ms, "tokens": tokens,
                       "rows": [{"policy": n, "tokens_per_step": t, "speed_vs_plain": tokens / ms / plain_rate}
                                for n, t, ms in rows]}, f, indent=1)


if __name__ == "__main__":
    main()
