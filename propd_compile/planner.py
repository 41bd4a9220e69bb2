"""Dynamic token trees: every step, the tree sizes that maximise expected tokens per second.

Each row's drafter proposes a candidate tree of up to `max_nodes` nodes. The acceptance model
turns its scores into calibrated path probabilities l; ranking a row's nodes by l (parents
first) gives a nested family of ancestor-closed trees, the first n nodes for n = 1, 2, ...
A step's time is the forward's (the latency model, `cost_model`) plus what the step costs
around it (acceptance, cache bookkeeping: `overhead`, learnt online by node count) plus the
speculation (drafting and this planning: `drafting`, learnt online by row count). All candidates
of a step are priced at once (one feature matrix), so planning stays cheap at large batches.

Padded steps (every row verifies the batch's largest tree) share one size n:

    n* = argmax_n  sum_rows E_row(n) / (T_fwd(B, n, KV) + T_around(B n) + T_spec(B)),  E_row(n) = sum of l over its first n nodes

Ragged steps (`ragged`: rows verify their own sizes, `propd_compile.ragged`) give each row its
own size: nodes join in order of l across all rows (a row's l never grows along its order, so
every prefix of that order is a set of per-row prefixes, and the one of N nodes with the most
expected tokens), and the planner picks the N with the best rate; the forward's cost counts the
N real nodes and the largest row's size T (attention runs each row padded to T).

One node per row (a plain step) is always a candidate, so decoding falls back to plain steps
when drafts are poor. Speculating itself is not free: the costly drafters (the heads, which read
the verification's hidden states) cost an LM-head product per head and row; the cheap ones
(n-gram) cost little, and planning is Python over every candidate node. When the best tree,
speculation included, is clearly (SKIP_MARGIN) slower per token than a plain step without it, the
next steps back off one tier (`next_step`: 1, 2, 4, ... up to MAX_SKIP steps while that keeps
happening, none once a tree pays again): first the costly drafters are left out (steps draft
and plan on the cheap drafts alone), then, if those do not pay either, the steps are plain steps
that neither draft nor plan (unless the cheap tier costs less than SKIP_MARGIN of a plain step
and drafts anything at all: then it always drafts and plans). The costly drafters are also left out while their steps realize
less than the cheap tier's did (at batch 1 on the project's CPU the shipped heads lift a
4-node tree from 2.04 to 2.14 tokens per step for 1.2 ms of an 18 ms step: about even). So
decoding with poor drafts, or at batch sizes where no tree pays, costs what plain decoding
costs, and free drafts still pay where they can. A tree that was expected to pay is judged on what
speculative steps of its tier realized (a running ratio of measured tokens per second to that of
recent plain steps), so over-confident expectations back off too. Each power-of-two bucket of
active rows has its own schedule (`Schedule`): what pays at batch 1 says nothing about batch 16.
After a speculative step the acceptance model learns from what was accepted; the latency models
learn from every step.

Without a saved calibration (`propd calibrate`), or at a batch size larger than it measured, the
planner measures a few step shapes the first time it sees a batch size (at the current KV length,
up to PROBE_TOKENS nodes; about a second on the embedded model), so that the first choices are
already informed, plain steps included: a planner that only ever runs trees at a batch size would
otherwise compare them with an extrapolated plain step. Everything is refit online.
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch

from propd_compile.acceptance import AcceptanceModel, RankStats
from propd_compile.cost_model import LatencyModel, feature_matrix, features, load_calibration, measure_step
from propd_compile.tree import TokenTree

PROBE_SIZES = (1, 2, 4, 8, 16, 32, 64)
PROBE_TOKENS = 256  # nodes in all of a probed step, at most (beyond one per row)
MAX_SKIP = 32  # steps between two of a tier that did not pay, at most
# Speculation is skipped only when the best tree is expected to be this much slower per token
# than a plain step without it: the estimates are about 10% off (latency) and near-ties are as
# likely to pay as not, while skipping also stops the acceptance model's learning.
SKIP_MARGIN = 0.05
REALIZED_WEIGHT = 0.25  # weight of the latest step in the running realized and plain rates


def batch_bucket(rows: int) -> int:
    """The power of two at or above `rows`: batch sizes whose trees pay alike share a schedule."""
    return 1 << max(rows - 1, 0).bit_length()


class Backoff:
    """Steps to go without something that did not pay: 1, 2, 4, ... up to MAX_SKIP while it keeps
    not paying, none once it pays."""

    def __init__(self) -> None:
        self.skip = 0  # steps left before the next try
        self.length = 0  # length of the last skip

    def judge(self, pays: bool) -> None:
        self.length = 0 if pays else min(max(2 * self.length, 1), MAX_SKIP)
        self.skip = self.length

    def due(self) -> bool:
        """Whether this step tries it (counts a step of the skip down otherwise)."""
        if self.skip > 0:
            self.skip -= 1
            return False
        return True


class Schedule:
    """Which tiers speculate at one batch bucket: each tier's back-off and the running ratio of
    what its speculative steps realized to the rate of plain steps. A tree that pays at batch 1
    says nothing about batch 16, where a step costs several times more per extra node."""

    def __init__(self) -> None:
        self.costly, self.speculation = Backoff(), Backoff()
        self.realized: dict[bool, float | None] = {True: None, False: None}
        self.cheap_drafted = True  # the last step on the cheap drafters alone had any draft

    def judge(self, costly: bool, pays: bool) -> None:
        """After a speculative step of a tier: the same tier again next step if it paid, else back
        off that tier (the costly drafters, or all speculation)."""
        if costly:
            self.costly.judge(pays)
        if pays or not costly:  # costly drafters that did not pay leave the cheap tier to try
            self.speculation.judge(pays)

    def judge_realized(self, costly: bool, ratio: float) -> None:
        """After a step of a tier expected to pay, that realized `ratio` times the plain rate:
        the tier's running ratio decides. The costly drafters must also beat what the cheap
        tier realized on its own (when it was measured): drafts that pay against plain steps
        but not against the n-gram drafts alone leave the steps to the cheap tier, which keeps
        speculating."""
        last = self.realized[costly]
        self.realized[costly] = ratio if last is None else last + REALIZED_WEIGHT * (ratio - last)
        pays = self.realized[costly] >= 1.0
        if costly and pays and self.realized[False] is not None and self.realized[True] < self.realized[False]:
            self.costly.judge(False)
            self.speculation.judge(True)
            return
        self.judge(costly, pays)


def best_first(tree: TokenTree, l: Sequence[float]) -> list[int]:
    """Node indices by path probability, parents before children (l never grows along a path)."""
    depths = tree.depths
    return [0] + sorted(range(1, len(tree)), key=lambda i: (-l[i], depths[i], i))


class TreePlanner:
    def __init__(self, acceptance: AcceptanceModel, latency: LatencyModel, max_nodes: int, ragged: bool = False) -> None:
        self.acceptance, self.latency, self.max_nodes, self.ragged = acceptance, latency, max_nodes, ragged
        # seconds a step spends outside the forward, on features [1, N real nodes]
        self.overhead = LatencyModel(refit_every=4)
        # seconds a speculative step spends drafting and planning, on features [1, rows], with
        # the costly drafters (True) and without them (False)
        self.drafting = {True: LatencyModel(refit_every=4), False: LatencyModel(refit_every=4)}
        self.schedules: dict[int, Schedule] = {}  # by batch bucket of the active rows
        # running measured time of a plain step, by active rows, this `generate` call (`start_call`)
        self.plain_seconds: dict[int, float] = {}
        self._plain_due: set[int] = set()  # active row counts whose next step is a plain one, to measure it
        self._forward = 0.0  # the last observed forward's seconds
        self._to_judge: tuple[int, dict] | None = None  # (accepted tokens, plan) of the last step, expected to pay
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

    def start_call(self) -> None:
        """A new `generate` call: plain steps are measured again (their time depends on this
        call's rows and KV lengths)."""
        self.plain_seconds.clear()
        self._plain_due.clear()

    def step_seconds(self, batch: int, tree: int, kv: int, tokens: int) -> tuple[float, float]:
        """(forward, whole step) seconds predicted for `tokens` real nodes in rows padded to `tree`."""
        forward, seconds = self._seconds(batch, np.array([tree]), kv, np.array([tokens]))
        return float(forward[0]), float(seconds[0])

    def _seconds(self, batch: int, tree: np.ndarray, kv: int, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`step_seconds` of many candidate steps (tree, tokens: 1-D) at once."""
        tree = tree.astype(np.float64)
        kept = np.where(tree > 1, tree * self.kept_fraction, 1.0)
        forward = self.latency.predict_many(feature_matrix(batch, tree, kept, kv, tokens))
        around = 0.0
        if self.overhead.ready:
            around = self.overhead.predict_many(np.stack([np.ones_like(tree), tokens.astype(np.float64)], 1))
        return forward, forward + around

    def speculation_seconds(self, rows: int, costly: bool = True) -> float:
        """Predicted seconds a speculative step spends drafting and planning for `rows` rows, with
        or without the costly drafters (0 until one was measured)."""
        model = self.drafting[costly]
        return model.predict([1.0, float(rows)]) if model.ready else 0.0

    def plan(self, trees: Sequence[TokenTree | None], kv: int, costly: bool = True) -> list[TokenTree | None]:
        """Trees for one speculative step; `trees[b]` is row b's candidate tree, or None for a
        finished row (it gets its root only and counts nothing); `costly`: the costly drafters
        proposed too. Whether the step paid, against a plain step without drafting and planning,
        decides the tier of the next steps."""
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
        active = sum(order is not None for order in orders)
        # candidate c adds nodes to candidate c - 1; candidate 0 is the plain step (roots only)
        added, T, rows = self._ragged_additions(gains) if self.ragged else self._shared_additions(gains)
        expected = active + np.concatenate([[0.0], np.cumsum(added)])
        tokens = active + np.arange(len(T)) if self.ragged else B * T
        tokens = np.maximum(tokens, 1)
        forward, seconds = self._seconds(B, T, kv, tokens)
        # each candidate adds nodes to the last one: a fit may not make it cheaper
        forward, seconds = np.maximum.accumulate(forward), np.maximum.accumulate(seconds)
        speculation = self.speculation_seconds(active, costly)
        rates = expected / (seconds + speculation)
        c = int(rates.argmax())  # the first best
        plain = float(expected[0] / seconds[0])  # a plain step, neither drafted nor planned
        # a step whose best candidate is the plain step paid for speculation and gained nothing
        pays = c > 0 and float(rates[c]) > (1 - SKIP_MARGIN) * plain
        if not costly:
            self.schedule(active).cheap_drafted = len(added) > 0
        if not pays:  # a tree expected to pay is judged on what it realizes (`observe_overhead`)
            self.schedule(active).judge(costly, pays=False)
        sizes = _sizes(gains, c, rows)
        self.last_choice = {
            "n": int(T[c]), "tokens": int(tokens[c]), "sizes": sizes, "expected": float(expected[c]),
            "predicted_seconds": float(forward[c]), "pays": pays, "plain_rate": plain,
            "costly": costly, "active": active,
        }
        out = []
        for b, (tree, order) in enumerate(zip(trees, orders)):
            if order is None:
                out.append(None)
            else:
                out.append(tree.subtree(order[: sizes[b]]) if sizes[b] < len(tree) else tree)
        return out

    def schedule(self, rows: int) -> Schedule:
        """The speculation schedule of steps with `rows` active rows (their batch bucket)."""
        return self.schedules.setdefault(batch_bucket(rows), Schedule())

    def _judge(self, accepted: int, seconds: float, choice: dict) -> None:
        """After a speculative step expected to pay, that took `seconds` in all (measured:
        forward, speculation and what happened around them): keep its tier on while the running
        ratio of what such steps realized (tokens per second) to a plain step's rate is at
        least 1. The plain rate is measured, on the latest plain steps of as many rows in this
        call: where there were none, the prediction stands in once and the next step of as many
        rows is a plain one that measures it. Expectations can be over-confident (priors from
        other text, no learning while steps are plain), and the latency model is 10-20% off
        either way (most so where rows finished and few plain steps taught it), which made
        losing trees look like a gain; measured rates are neither."""
        costly, active = choice["costly"], choice["active"]
        if active in self.plain_seconds:
            plain = active / self.plain_seconds[active]
        else:
            plain = choice["plain_rate"]
            self._plain_due.add(active)
        self.schedule(active).judge_realized(costly, accepted / seconds / plain)

    def next_step(self, rows: int) -> tuple[bool, bool]:
        """(speculate, with the costly drafters) for the next step, of `rows` active rows, asked
        once per step before the drafters would prepare it; not speculating is a plain step."""
        if rows in self._plain_due:  # a plain step to measure, outside the schedule
            self._plain_due.discard(rows)
            return False, False
        schedule = self.schedule(rows)
        costly = schedule.costly.due()
        speculate = schedule.speculation.due()
        return speculate or (schedule.cheap_drafted and self._cheap_tier_is_free(rows)), costly

    def _cheap_tier_is_free(self, rows: int) -> bool:
        """Whether drafting and planning without the costly drafters costs less than SKIP_MARGIN
        of a plain step measured in this call: then, while they draft anything at all, those
        steps always draft and plan (the plan still picks a plain step when no tree pays),
        because skipping them saves less than the estimates' own error while the skipped steps
        miss every draft that would have paid (a long n-gram match appears at once). The back-off's judge reads wall-clock steps, whose
        jitter alone sent the n-gram tier into skips: at batch 1 on the project's CPU, n-gram
        drafting that never backed off realized 1.36x plain steps against 1.27x."""
        model = self.drafting[False]
        if not model.ready or rows not in self.plain_seconds:
            return False
        return self.speculation_seconds(rows, False) < SKIP_MARGIN * self.plain_seconds[rows]

    @staticmethod
    def _ragged_additions(gains: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """Ragged steps: one node at a time, the most probable next node of any row. Returns each
        addition's path probability, every candidate's largest row size T, and each addition's row."""
        nodes = sorted((-g[k], k, b) for b, g in enumerate(gains) for k in range(1, len(g)))
        added = np.array([-n[0] for n in nodes], dtype=np.float64)
        T = np.maximum.accumulate(np.array([1] + [n[1] + 1 for n in nodes]))
        return added, T, [n[2] for n in nodes]

    @staticmethod
    def _shared_additions(gains: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray, None]:
        """Padded steps: n = 1, 2, ...; each row grows by one node while it has any."""
        depth = max([len(g) for g in gains] + [1])
        added = np.array([sum(g[n] for g in gains if len(g) > n) for n in range(1, depth)], dtype=np.float64)
        return added, np.arange(1, depth + 1), None

    def observe(
        self, trees: Sequence[TokenTree], paths: Sequence[Sequence[int]], seconds: float, batch: int, nodes: int,
        kv: int, kept: float | None = None, tokens: int | None = None,
    ) -> None:
        """Learn from one verified step: the active rows' trees and accepted paths, and its
        forward's time (`tokens` real nodes in rows padded to `nodes`; padded: batch * nodes)."""
        if any(len(t) > 1 for t in trees):  # a step of roots only tried no draft
            self.acceptance.observe(trees, paths)
        kept = nodes if kept is None else kept
        tokens = batch * nodes if tokens is None else tokens
        choice = self.last_choice
        if choice is not None and (choice["n"], choice["tokens"]) == (nodes, tokens):  # predicted before it ran
            accepted = sum(len(p) for p in paths)
            self.latency_errors.append(abs(choice["predicted_seconds"] - seconds) / seconds)
            self.outcomes.append((choice["expected"], accepted))
            if choice["pays"]:  # judged once the step's time around the forward is known
                self._to_judge = (accepted, choice)
        self.last_choice = None
        self._forward = seconds
        if nodes > 1:
            self.kept_fraction = 0.9 * self.kept_fraction + 0.1 * (kept / nodes)
        self.latency.observe(features(batch, nodes, kept, kv, tokens), seconds)
        self.seen_batches.add(batch)
        self.calibrated_steps += 1

    def observe_overhead(
        self, tokens: int, seconds: float, rows: int = 0, speculation: float | None = None, costly: bool = True,
    ) -> None:
        """Learn what the step just observed (`observe`) cost outside its forward, besides drafting
        and planning (`tokens` real nodes), and (`speculation`, for a speculative step of `rows`
        rows, with or without the costly drafters) what drafting and planning it cost; a step
        expected to pay is judged on its whole time, a plain step's time is the plain rate."""
        self.overhead.observe([1.0, float(tokens)], max(seconds, 0.0))
        total = self._forward + max(seconds, 0.0) + max(speculation or 0.0, 0.0)
        if speculation is not None and rows > 0:
            self.drafting[costly].observe([1.0, float(rows)], max(speculation, 0.0))
        elif rows > 0:
            last = self.plain_seconds.get(rows)
            self.plain_seconds[rows] = total if last is None else last + REALIZED_WEIGHT * (total - last)
        if self._to_judge is not None:
            accepted, choice = self._to_judge
            self._to_judge = None
            self._judge(accepted, total, choice)


def _sizes(gains: Sequence[Sequence[float]], candidate: int, rows: Sequence[int] | None) -> list[int]:
    """Each row's node count in `candidate` (finished rows: 0): padded (`rows` None), the first
    candidate + 1 nodes of every row; ragged, its root and its additions among the first `candidate`."""
    if rows is None:
        return [min(len(g), candidate + 1) for g in gains]
    sizes = [1 if g else 0 for g in gains]
    for b in rows[:candidate]:
        sizes[b] += 1
    return sizes


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
