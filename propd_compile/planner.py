"""Dynamic token trees: every step, the tree size that maximises expected tokens per second.

Each row's drafter proposes a candidate tree of up to `max_nodes` nodes. The acceptance model
turns its scores into calibrated path probabilities l; ranking a row's nodes by l (parents
first) gives a nested family of ancestor-closed trees, the first n nodes for n = 1, 2, ...
All rows verify in one padded forward, so the batch shares one size n, and the planner picks

    n* = argmax_n  sum_rows E_row(n) / T_est(B, n, KV),   E_row(n) = sum of l over its first n nodes

with T_est from the latency model. n = 1 (a plain autoregressive step) is always a candidate, so
decoding falls back to plain steps when drafts are poor. After the step, the acceptance model
learns from what was accepted and the latency model from the measured time.

Without a saved calibration (`propd calibrate`), the planner measures a few step shapes the first
time it sees a batch size (at the current KV length; about a second on the embedded model), so
that the first choices are already informed; everything is refit online.
"""
from __future__ import annotations

import time
from typing import Sequence

import torch

from propd_compile.acceptance import AcceptanceModel, RankStats
from propd_compile.cost_model import LatencyModel, features, load_calibration, measure_step
from propd_compile.tree import TokenTree

PROBE_SIZES = (1, 2, 4, 8, 16, 32, 64)


def best_first(tree: TokenTree, l: Sequence[float]) -> list[int]:
    """Node indices by path probability, parents before children (l never grows along a path)."""
    depths = tree.depths
    return [0] + sorted(range(1, len(tree)), key=lambda i: (-l[i], depths[i], i))


class TreePlanner:
    def __init__(self, acceptance: AcceptanceModel, latency: LatencyModel, max_nodes: int) -> None:
        self.acceptance, self.latency, self.max_nodes = acceptance, latency, max_nodes
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
        if self.calibrated or batch in self.seen_batches:
            return
        for n in sorted({min(s, self.max_nodes) for s in PROBE_SIZES}):
            self.latency.observe(features(batch, n, n, kv), measure_step(model, forward, batch, n, max(kv, 1)))
        self.seen_batches.add(batch)

    def plan(self, trees: Sequence[TokenTree | None], kv: int) -> list[TokenTree]:
        """Trees for one step; `trees[b]` is row b's candidate tree, or None for a finished row
        (it gets its root only and counts nothing)."""
        B = len(trees)
        orders, cums = [], []
        for tree in trees:
            if tree is None:
                orders.append(None)
                cums.append([0.0])
                continue
            l = self.acceptance.path_probabilities(tree)
            order = best_first(tree, l)
            c, acc = [], 0.0
            for i in order:
                acc += l[i]
                c.append(acc)
            orders.append(order)
            cums.append(c)
        largest = max(len(c) for c in cums)
        best_n, best_rate, table = 1, -1.0, []
        for n in range(1, largest + 1):
            expected = sum(c[min(n, len(c)) - 1] for c in cums)
            seconds = self.latency.predict(features(B, n, n * self.kept_fraction if n > 1 else 1, kv))
            rate = expected / seconds
            table.append((n, expected, seconds))
            if rate > best_rate:
                best_n, best_rate = n, rate
        self.last_choice = {"n": best_n, "expected": table[best_n - 1][1], "predicted_seconds": table[best_n - 1][2]}
        out = []
        for tree, order in zip(trees, orders):
            if order is None:
                out.append(None)
            else:
                out.append(tree.subtree(order[:best_n]) if best_n < len(tree) else tree)
        return out

    def observe(
        self, trees: Sequence[TokenTree], paths: Sequence[Sequence[int]], seconds: float, batch: int, nodes: int,
        kv: int, kept: float | None = None,
    ) -> None:
        """Learn from one verified step: the active rows' trees and accepted paths, and its time."""
        self.acceptance.observe(trees, paths)
        kept = nodes if kept is None else kept
        if self.last_choice is not None and self.last_choice["n"] == nodes:  # predicted before it ran
            self.latency_errors.append(abs(self.last_choice["predicted_seconds"] - seconds) / seconds)
            self.outcomes.append((self.last_choice["expected"], sum(len(p) for p in paths)))
        self.last_choice = None
        if nodes > 1:
            self.kept_fraction = 0.9 * self.kept_fraction + 0.1 * (kept / nodes)
        self.latency.observe(features(batch, nodes, kept, kv), seconds)
        self.seen_batches.add(batch)
        self.calibrated_steps += 1


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
    return TreePlanner(AcceptanceModel(rank_stats=rank_stats), latency, config.max_tree_nodes)


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
