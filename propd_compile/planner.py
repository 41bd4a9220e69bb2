"""Dynamic token trees: every step, the tree sizes that maximise expected tokens per second.

Each row's drafter proposes a candidate tree of up to `max_nodes` nodes. The acceptance model
turns its scores into calibrated path probabilities l; ranking a row's nodes by l (parents
first) gives a nested family of ancestor-closed trees, the first n nodes for n = 1, 2, ...
A step's time is the forward's (the latency model, `cost_model`) plus what the step costs
around it (acceptance, cache bookkeeping: `overhead`, learnt online by node count) plus the
drafting (`drafting`, learnt online by row count).

Padded steps (every row verifies the batch's largest tree) share one size n:

    n* = argmax_n  sum_rows E_row(n) / (T_fwd(B, n, KV) + T_around(B n) + T_draft(B)),  E_row(n) = sum of l over its first n nodes

Ragged steps (`ragged`: rows verify their own sizes, `propd_compile.ragged`) give each row its
own size: nodes join in order of l across all rows (a row's l never grows along its order, so
every prefix of that order is a set of per-row prefixes, and the one of N nodes with the most
expected tokens), and the planner picks the N with the best rate; the forward's cost counts the
N real nodes and the largest row's size T (attention runs each row padded to T).

One node per row (a plain step) is always a candidate, so decoding falls back to plain steps
when drafts are poor. Drafting itself is not free: the drafters that read the verification's
hidden states (the heads: an LM-head product per head and row) cost milliseconds a step. When
the best tree, their drafting included, is clearly (SKIP_MARGIN) slower per token than a plain
step without it, the next steps skip them (`should_draft`: 1, 2, 4, ... up to MAX_SKIP steps
while that keeps happening, none once they pay again) and plan on the cheap drafts (n-gram)
alone, so decoding with poor drafts costs what plain decoding costs. After the step the acceptance
model learns from what was accepted and the latency models from the measured times.

Without a saved calibration (`propd calibrate`), or at a batch size larger than it measured, the
planner measures a few step shapes the first time it sees a batch size (at the current KV length,
up to PROBE_TOKENS nodes; about a second on the embedded model), so that the first choices are
already informed, plain steps included: a planner that only ever runs trees at a batch size would
otherwise compare them with an extrapolated plain step. Everything is refit online.
"""
from __future__ import annotations

import time
from typing import Sequence

import torch

from propd_compile.acceptance import AcceptanceModel, RankStats
from propd_compile.cost_model import LatencyModel, features, load_calibration, measure_step
from propd_compile.tree import TokenTree

PROBE_SIZES = (1, 2, 4, 8, 16, 32, 64)
PROBE_TOKENS = 256  # nodes in all of a probed step, at most (beyond one per row)
MAX_SKIP = 16  # steps without the costly drafters between two with them, at most
# Drafting is skipped only when the best tree is expected to be this much slower per token than
# a plain step without it: the estimates are about 10% off (latency) and near-ties are as likely
# to pay as not, while skipping also stops the acceptance model's learning.
SKIP_MARGIN = 0.05


def best_first(tree: TokenTree, l: Sequence[float]) -> list[int]:
    """Node indices by path probability, parents before children (l never grows along a path)."""
    depths = tree.depths
    return [0] + sorted(range(1, len(tree)), key=lambda i: (-l[i], depths[i], i))


class TreePlanner:
    def __init__(self, acceptance: AcceptanceModel, latency: LatencyModel, max_nodes: int, ragged: bool = False) -> None:
        self.acceptance, self.latency, self.max_nodes, self.ragged = acceptance, latency, max_nodes, ragged
        # seconds a step spends outside the forward, on features [1, N real nodes]
        self.overhead = LatencyModel(refit_every=4)
        self.drafting = LatencyModel(refit_every=4)  # seconds of drafting, on features [1, rows]
        self._skip = 0  # plain steps left before the next drafted one
        self._backoff = 0  # length of the last skip (doubles while drafting does not pay)
        self.calibrated = latency.ready  # from `propd calibrate`: no probing needed
        self.seen_batches: set[int] = set()
        self.kept_fraction = 1.0  # share of tree nodes past early pruning (running mean; 1 without pruning)
        self.last_choice: dict | None = None
        self.calibrated_steps = 0  # verification steps the models learned from
        self.latency_errors: list[float] = []  # |predicted - measured| / measured of each planned step
        # (expected, accepted) tokens of each planned step, summed over its rows: the reliability
        # of the acceptance model (the expectation is taken before the step ran)
        self.outcomes: list[tuple[float, int]] = []

    def warm_up(self, model: torch.nn.Module, forward, batch: int, kv: int) -> None:
        """Measure a few shapes at this batch size, unless a calibration or earlier steps cover it."""
        covered = self.calibrated and (self.latency.max_batch is None or batch <= self.latency.max_batch)
        if covered or batch in self.seen_batches:
            return
        sizes = {min(s, self.max_nodes) for s in PROBE_SIZES if batch * s <= max(PROBE_TOKENS, batch)}
        for n in sorted(sizes):
            self.latency.observe(features(batch, n, n, kv), measure_step(model, forward, batch, n, max(kv, 1)))
        self.latency.fit()
        self.seen_batches.add(batch)

    def step_seconds(self, batch: int, tree: int, kv: int, tokens: int) -> tuple[float, float]:
        """(forward, whole step) seconds predicted for `tokens` real nodes in rows padded to `tree`."""
        kept = tree * self.kept_fraction if tree > 1 else 1
        forward = self.latency.predict(features(batch, tree, kept, kv, tokens))
        around = self.overhead.predict([1.0, float(tokens)]) if self.overhead.ready else 0.0
        return forward, forward + around

    def draft_seconds(self, rows: int) -> float:
        """Predicted seconds of drafting for `rows` rows (0 until a drafted step was measured)."""
        return self.drafting.predict([1.0, float(rows)]) if self.drafting.ready else 0.0

    def plan(self, trees: Sequence[TokenTree | None], kv: int, drafted: bool = True) -> list[TokenTree | None]:
        """Trees for one step; `trees[b]` is row b's candidate tree, or None for a finished row
        (it gets its root only and counts nothing). `drafted`: the costly drafters proposed for
        this step (their time counts, and whether they paid decides if they run next step)."""
        B = len(trees)
        orders, gains = [], []  # a row's nodes best first, and their path probabilities in that order
        for tree in trees:
            if tree is None:
                orders.append(None)
                gains.append([])
                continue
            l = self.acceptance.path_probabilities(tree)
            order = best_first(tree, l)
            orders.append(order)
            gains.append([l[i] for i in order])
        sizes = [0 if order is None else 1 for order in orders]
        expected = float(sum(sizes))  # every root is a token
        active = sum(sizes)
        draft = self.draft_seconds(active) if drafted else 0.0
        best, floor, plain = None, (0.0, 0.0), None
        candidates = self._ragged_additions(gains) if self.ragged else self._shared_additions(gains)
        for added in candidates:
            for b in added:
                expected += gains[b][sizes[b]]
                sizes[b] += 1
            T = max(max(sizes, default=0), 1)
            tokens = sum(sizes) if self.ragged else B * T
            forward, seconds = self.step_seconds(B, T, kv, max(tokens, 1))
            # each candidate adds nodes to the last one: a fit may not make it cheaper
            forward, seconds = max(forward, floor[0]), max(seconds, floor[1])
            floor = (forward, seconds)
            if plain is None:  # the first candidate is the plain step (roots only), without drafting
                plain = expected / seconds
            if best is None or expected / (seconds + draft) > best[0]:
                best = (expected / (seconds + draft), list(sizes), expected, forward, T, tokens)
        rate, sizes, expected, forward, T, tokens = best
        if drafted:
            self._schedule_drafting(pays=rate > (1 - SKIP_MARGIN) * plain)
        self.last_choice = {"n": T, "tokens": tokens, "sizes": sizes, "expected": expected, "predicted_seconds": forward}
        out = []
        for b, (tree, order) in enumerate(zip(trees, orders)):
            if order is None:
                out.append(None)
            else:
                out.append(tree.subtree(order[: sizes[b]]) if sizes[b] < len(tree) else tree)
        return out

    def _schedule_drafting(self, pays: bool) -> None:
        """After a drafted step: draft again next step if it paid, else skip 1, 2, 4, ... steps."""
        self._backoff = 0 if pays else min(max(2 * self._backoff, 1), MAX_SKIP)
        self._skip = self._backoff

    def should_draft(self) -> bool:
        """Whether the next step runs the costly drafters (asked once per step, before they would
        prepare it)."""
        if self._skip > 0:
            self._skip -= 1
            return False
        return True

    @staticmethod
    def _shared_additions(gains: Sequence[Sequence[float]]):
        """Padded steps: n = 1, 2, ...; each row grows by one node while it has any."""
        yield []
        for n in range(1, max((len(g) for g in gains), default=1)):
            yield [b for b, g in enumerate(gains) if len(g) > n]

    @staticmethod
    def _ragged_additions(gains: Sequence[Sequence[float]]):
        """Ragged steps: one node at a time, the most probable next node of any row."""
        yield []
        nodes = sorted(((-g[k], k, b) for b, g in enumerate(gains) for k in range(1, len(g))))
        for _, _, b in nodes:
            yield [b]

    def observe(
        self, trees: Sequence[TokenTree], paths: Sequence[Sequence[int]], seconds: float, batch: int, nodes: int,
        kv: int, kept: float | None = None, tokens: int | None = None,
    ) -> None:
        """Learn from one verified step: the active rows' trees and accepted paths, and its
        forward's time (`tokens` real nodes in rows padded to `nodes`; padded: batch * nodes)."""
        self.acceptance.observe(trees, paths)
        kept = nodes if kept is None else kept
        tokens = batch * nodes if tokens is None else tokens
        choice = self.last_choice
        if choice is not None and (choice["n"], choice["tokens"]) == (nodes, tokens):  # predicted before it ran
            self.latency_errors.append(abs(choice["predicted_seconds"] - seconds) / seconds)
            self.outcomes.append((choice["expected"], sum(len(p) for p in paths)))
        self.last_choice = None
        if nodes > 1:
            self.kept_fraction = 0.9 * self.kept_fraction + 0.1 * (kept / nodes)
        self.latency.observe(features(batch, nodes, kept, kv, tokens), seconds)
        self.seen_batches.add(batch)
        self.calibrated_steps += 1

    def observe_overhead(self, tokens: int, seconds: float, rows: int = 0, draft_seconds: float | None = None) -> None:
        """Learn what a step of `tokens` real nodes cost outside its forward, besides drafting, and
        (`draft_seconds`, for a step whose `rows` rows drafted) what its drafting cost."""
        self.overhead.observe([1.0, float(tokens)], max(seconds, 0.0))
        if draft_seconds is not None and rows > 0:
            self.drafting.observe([1.0, float(rows)], max(draft_seconds, 0.0))


def new_planner(model: torch.nn.Module, config) -> TreePlanner:  # config: ProPDConfig
    """A planner for `config` on `model`: rank statistics warm-started from the heads' held-out
    accuracies, the latency model from this machine's `propd calibrate` fit of the kernels
    decoding will run (eager or compiled) when there is one."""
    from propd_compile.drafters import heads_for

    heads = heads_for(config, model)
    rank_stats = None
    if heads is not None:
        rank_stats = RankStats.for_heads(heads, config.heads_topk)
    from propd_compile.state import state_of

    state = state_of(model)
    compiled = state is not None and state.compiled(config, hidden=heads is not None)
    latency = load_calibration(model, compiled) or LatencyModel()
    return TreePlanner(AcceptanceModel(rank_stats=rank_stats), latency, config.max_tree_nodes, ragged=config.ragged)


class StepTimer:
    """Wall time of a forward, synchronising the accelerator so the time is the step's own."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.t0 = 0.0

    def __enter__(self) -> "StepTimer":
        if self.cuda:
            torch.cuda.synchronize()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t0
