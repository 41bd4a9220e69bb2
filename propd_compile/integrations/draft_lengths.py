"""Per-request draft lengths for engines that verify one draft chain per request (vLLM).

vLLM verifies request r's chain of k_r drafted tokens in one forward with every other request's,
unpadded, so a step costs T(B, B + sum_r k_r tokens, KV). ProPD's dynamic tree carries over with
"one tree size for the batch" replaced by "one token budget for the batch": the acceptance model
(`acceptance.AcceptanceModel`) turns each chain's drafter scores into calibrated path
probabilities l (l never grows along a chain, so the N best tokens over all rows are a prefix of
every row's chain), and the planner picks

    N* = argmax_N  (B + sum of the N largest l) / T_est(B, 1 + N / B, KV)

with T_est from the latency model (`cost_model.LatencyModel`) fit on the engine's own measured
steps. N = 0, no speculation at all, is always a candidate: under high load, or with poor
drafts, the engine runs plain decoding steps. The first steps alternate full drafts and none, so
that the latency model sees both regimes before it decides; afterwards a step that would not
speculate drafts anyway every `probe_every` steps, so the model keeps measuring what drafting
costs at the current load.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from propd_compile.acceptance import AcceptanceModel
from propd_compile.cost_model import LatencyModel, features
from propd_compile.tree import TokenTree


@dataclass
class ChainPlan:
    """One step's decision: the chain each row sends (root and drafted tokens) and its cost features."""

    chains: list[TokenTree | None]  # None: the row does not decode this step
    x: list[float]  # latency-model features of the step that will verify these chains
    predicted_seconds: float | None  # None while exploring (no fit yet)
    expected_tokens: float

    @property
    def lengths(self) -> list[int]:
        return [0 if c is None else len(c) - 1 for c in self.chains]


@dataclass
class ChainPlanner:
    acceptance: AcceptanceModel = field(default_factory=AcceptanceModel)
    latency: LatencyModel = field(default_factory=LatencyModel)
    explore_steps: int = 4  # measured steps with and without drafts before the latency model decides
    probe_every: int = 32
    measured: list[int] = field(default_factory=lambda: [0, 0])  # latency observations without / with drafts
    plans: int = 0
    latency_errors: list[float] = field(default_factory=list)  # |predicted - measured| / measured

    def plan(self, chains: Sequence[TokenTree | None], kv: Sequence[int]) -> ChainPlan:
        """How much of each row's candidate chain to send; `kv[r]` is row r's context length."""
        self.plans += 1
        rows = [r for r, c in enumerate(chains) if c is not None]
        B = max(len(rows), 1)
        kv_mean = sum(kv[r] for r in rows) / B
        probs = {r: self.acceptance.path_probabilities(chains[r])[1:] for r in rows}
        # every drafted token of every row, best first; per row the order follows the chain
        ranked = sorted(((l, d, r) for r in rows for d, l in enumerate(probs[r])), key=lambda t: (-t[0], t[1], t[2]))
        cum = [float(len(rows))]
        for l, _, _ in ranked:
            cum.append(cum[-1] + l)

        def x_of(n: int) -> list[float]:
            t = 1.0 + n / B
            return features(B, t, t, kv_mean)

        exploring = min(self.measured) < self.explore_steps or not self.latency.ready
        if exploring:
            n = len(ranked) if self.plans % 2 else 0
            seconds = None
        else:
            rates = [(cum[n] / self.latency.predict(x_of(n)), n) for n in range(len(ranked) + 1)]
            rate, n = max(rates, key=lambda t: (t[0], -t[1]))
            if n == 0 and ranked and self.plans % self.probe_every == 0:
                rate, n = max(rates[1:], key=lambda t: (t[0], -t[1]))
            seconds = self.latency.predict(x_of(n))
        take = {r: 0 for r in rows}
        for _, _, r in ranked[:n]:
            take[r] += 1
        sent = [None if c is None else c.subtree(range(take[r] + 1)) for r, c in enumerate(chains)]
        return ChainPlan(sent, x_of(n), seconds, cum[n])

    def learn_acceptance(self, chains: Sequence[TokenTree], accepted: Sequence[int]) -> None:
        """Row chains that were verified, and how many drafted tokens of each were accepted."""
        drafted = [(c, a) for c, a in zip(chains, accepted) if len(c) > 1]
        if drafted:
            self.acceptance.observe([c for c, _ in drafted], [list(range(a + 1)) for _, a in drafted])

    def learn_latency(self, plan: ChainPlan, seconds: float) -> None:
        """The measured time of the step that verified `plan`."""
        if plan.predicted_seconds is not None:
            self.latency_errors.append(abs(plan.predicted_seconds - seconds) / seconds)
        self.measured[int(any(n > 0 for n in plan.lengths))] += 1
        self.latency.observe(plan.x, seconds)
