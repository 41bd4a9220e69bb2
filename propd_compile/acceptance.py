"""How likely a drafted node is to be accepted: ProPD's acceptance estimator, calibrated online.

Two statistics, both updated from verification outcomes:

* `RankStats`: ProPD's P_k^i. For head i and rank k, the recency-weighted frequency with which
  the verified token at depth i + 1 is head i's rank-k candidate, counted whenever verification
  reached that depth (so it is conditional on the path above being right, as acceptance is).
  Warm-started from the heads' held-out `rank_accuracy`.
* `Calibrator`: P(node accepted | parent accepted) per cell (depth, head rank or "not from the
  heads", bin of the drafter's own conditional confidence: head softmax, n-gram evidence share,
  or their noisy-or when both drafted the node). A cell's estimate is a Beta posterior mean
  refined by the cell's own hits and trials, so the per-step confidence sharpens the per-rank
  statistic once there is evidence that it is informative. Cells are many and most see few
  trials, so their prior is pooled (a hierarchy of Beta means): the node's raw estimate (P_k^i
  for its head rank, ProPD's context-free estimate, or the drafter's confidence itself) scaled by
  what that source realized against its raw estimates so far, then the same (source, confidence
  bin) over all depths. Raw estimates run high where it matters: an n-gram continuation seen
  once claims certainty, held-out head accuracies come from the heads' own training
  distribution, and the planner verifies the nodes whose estimates are highest, so the pooled
  ratio corrects the level of a source's claims after a few steps, depth by depth after more.

A node's path probability l(c) is the product of the calibrated conditionals from the root, and
E[tokens per step] = sum over the tree of l (the root's l = 1 is the bonus token). l never grows
along a path, so the n nodes with the largest l form an ancestor-closed tree, for every n.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from propd_compile.tree import TokenTree

NOT_FROM_HEADS = -1


@dataclass
class RankStats:
    """P(verified token at depth d + 1 is head d's rank-r candidate), recency weighted."""

    num_heads: int
    ranks: int
    decay: float = 0.995  # per observation of a head: a half-life of ~140 steps
    hits: list[list[float]] = field(default_factory=list)
    trials: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.hits = self.hits or [[0.0] * self.ranks for _ in range(self.num_heads)]
        self.trials = self.trials or [0.0] * self.num_heads

    @classmethod
    def warm(cls, rank_accuracy: Sequence[Sequence[float]], weight: float = 50.0, ranks: int | None = None) -> "RankStats":
        """Start from held-out accuracies as if `weight` observations per head had been made."""
        ranks = ranks or max(len(r) for r in rank_accuracy)
        stats = cls(len(rank_accuracy), ranks)
        for d, row in enumerate(rank_accuracy):
            stats.hits[d] = [weight * float(row[r]) if r < len(row) else 0.0 for r in range(ranks)]
            stats.trials[d] = weight
        return stats

    @classmethod
    def for_heads(cls, heads, ranks: int) -> "RankStats":
        """Statistics for draft heads (`heads.MedusaHeads`): warm from their held-out accuracies, if they have any."""
        acc = (heads.accuracy or {}).get("rank_accuracy")
        return cls.warm(acc, ranks=ranks) if acc else cls(heads.num_heads, ranks)

    def observe(self, depth: int, rank: int | None) -> None:
        """Head `depth` was checked against a verified token that was its rank `rank` (None: missed)."""
        if depth >= self.num_heads:
            return
        self.trials[depth] = self.trials[depth] * self.decay + 1.0
        row = self.hits[depth]
        for r in range(self.ranks):
            row[r] *= self.decay
        if rank is not None and rank < self.ranks:
            row[rank] += 1.0

    def p(self, depth: int, rank: int) -> float:
        if depth >= self.num_heads or rank >= self.ranks or self.trials[depth] <= 0:
            return 0.0
        return self.hits[depth][rank] / self.trials[depth]

    def table(self) -> list[list[float]]:
        return [[self.p(d, r) for r in range(self.ranks)] for d in range(self.num_heads)]


@dataclass
class Calibrator:
    """Beta-posterior P(accept | parent accepted) per (depth, rank bucket, confidence bin), with
    pooled priors: (source, bin) over all depths, and per source the ratio of its realized
    acceptances to its raw estimates."""

    max_depth: int = 8
    rank_buckets: int = 4  # head ranks 0..rank_buckets-2 apart, the rest together
    bins: int = 10
    prior_strength: float = 4.0
    decay: float = 0.999  # per step
    counts: dict[str, list[float]] = field(default_factory=dict)  # "depth,source,bin" -> [hits, trials]
    # "source,bin" -> [hits, trials] over all depths; "source" -> [hits, sum of raw estimates]
    pooled: dict[str, list[float]] = field(default_factory=dict)

    def cells(self, depth: int, rank: int, conf: float) -> tuple[str, str, str]:
        """A node's cell, its (source, bin) pool over depths and its source's pool."""
        source = NOT_FROM_HEADS if rank == NOT_FROM_HEADS else min(rank, self.rank_buckets - 1)
        b = min(int(max(conf, 0.0) * self.bins), self.bins - 1)
        return f"{min(depth, self.max_depth)},{source},{b}", f"{source},{b}", f"{source}"

    @staticmethod
    def raw(depth: int, rank: int, conf: float, rank_stats: RankStats | None) -> float:
        """The uncalibrated estimate: P_k^i for a heads node whose head has statistics, else the
        drafter's confidence."""
        if rank != NOT_FROM_HEADS and rank_stats is not None and rank_stats.trials[min(depth - 1, rank_stats.num_heads - 1)] > 0:
            return rank_stats.p(depth - 1, rank)
        return conf

    def _mean(self, cell: list[float] | tuple[float, float], prior: float) -> float:
        return min(max((cell[0] + self.prior_strength * prior) / (cell[1] + self.prior_strength), 0.0), 1.0)

    def conditional(self, depth: int, rank: int, conf: float, rank_stats: RankStats | None) -> float:
        """Calibrated P(accept | parent accepted) for one node."""
        cell, by_bin, source = self.cells(depth, rank, conf)
        hits, raw_sum = self.pooled.get(source, (0.0, 0.0))
        ratio = (hits + self.prior_strength) / (raw_sum + self.prior_strength)
        prior = min(self.raw(depth, rank, conf, rank_stats) * ratio, 1.0)
        prior = self._mean(self.pooled.get(by_bin, (0.0, 0.0)), prior)
        return self._mean(self.counts.get(cell, (0.0, 0.0)), prior)

    def observe(self, depth: int, rank: int, conf: float, accepted: bool, raw: float | None = None) -> None:
        """One trial of a node whose parent was accepted; `raw`: its uncalibrated estimate
        (`Calibrator.raw`; default: `conf`, right for nodes not from the heads)."""
        cell, by_bin, source = self.cells(depth, rank, conf)
        for table, k, add in ((self.counts, cell, 1.0), (self.pooled, by_bin, 1.0), (self.pooled, source, conf if raw is None else raw)):
            entry = table.setdefault(k, [0.0, 0.0])
            entry[0] += float(accepted)
            entry[1] += add

    def step(self) -> None:
        """Age all counts by one step (recent steps count more)."""
        for cell in (*self.counts.values(), *self.pooled.values()):
            cell[0] *= self.decay
            cell[1] *= self.decay


def conditional_confidences(tree: TokenTree) -> list[float]:
    """The drafter's P(node right | parent right): its path score over its parent's (root: 1)."""
    out = [1.0]
    for i in range(1, len(tree)):
        parent = tree.scores[tree.parents[i]]
        out.append(min(tree.scores[i] / parent, 1.0) if parent > 0 else 0.0)
    return out


@dataclass
class AcceptanceModel:
    """Calibrated path probabilities for drafted trees, learned from verification outcomes."""

    calibrator: Calibrator = field(default_factory=Calibrator)
    rank_stats: RankStats | None = None

    def path_probabilities(self, tree: TokenTree) -> list[float]:
        conf = conditional_confidences(tree)
        depths, ranks = tree.depths, tree.head_ranks
        l = [1.0] * len(tree)
        for i in range(1, len(tree)):
            l[i] = l[tree.parents[i]] * self.calibrator.conditional(depths[i], ranks[i], conf[i], self.rank_stats)
        return l

    def observe(self, trees: Sequence[TokenTree], paths: Sequence[Sequence[int]]) -> None:
        """Every node whose parent was accepted was a trial; accepted iff it is on the path."""
        for tree, path in zip(trees, paths):
            on_path = set(path)
            conf = conditional_confidences(tree)
            depths, ranks = tree.depths, tree.head_ranks
            for i in range(1, len(tree)):
                if tree.parents[i] in on_path:
                    raw = self.calibrator.raw(depths[i], ranks[i], conf[i], self.rank_stats)
                    self.calibrator.observe(depths[i], ranks[i], conf[i], i in on_path, raw)
        self.calibrator.step()

    # --- persistence (warm starts) ----------------------------------------------------------
    def to_dict(self) -> dict:
        out = {"calibrator": {"counts": self.calibrator.counts, "pooled": self.calibrator.pooled}}
        if self.rank_stats is not None:
            out["rank_stats"] = {"hits": self.rank_stats.hits, "trials": self.rank_stats.trials}
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()) + "\n")

    def load(self, path: str | Path) -> None:
        """Continue from saved statistics (same heads and shapes)."""
        d = json.loads(Path(path).read_text())
        self.calibrator.counts = {k: list(v) for k, v in d["calibrator"]["counts"].items()}
        self.calibrator.pooled = {k: list(v) for k, v in d["calibrator"].get("pooled", {}).items()}
        if "rank_stats" in d and self.rank_stats is not None:
            self.rank_stats.hits, self.rank_stats.trials = d["rank_stats"]["hits"], d["rank_stats"]["trials"]
