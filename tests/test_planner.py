"""Dynamic trees: the planner's choice is the best of a nested ancestor-closed family, and
decoding with it stays identical to HF greedy."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import propd_compile
from models_tiny import ARCHS, EOS, PAD, VOCAB, hf_greedy, left_padded, tiny_model
from propd_compile import ProPDConfig
from propd_compile.acceptance import AcceptanceModel, Calibrator
from propd_compile.cost_model import LatencyModel, features
from propd_compile.planner import TreePlanner, best_first
from propd_compile.tree import TokenTree


@st.composite
def candidate(draw):
    n = draw(st.integers(1, 20))
    parents, scores = [-1], [1.0]
    for i in range(1, n):
        p = draw(st.integers(0, i - 1))
        parents.append(p)
        scores.append(scores[p] * draw(st.floats(0.0, 1.0)))
    return TokenTree(tuple(range(50, 50 + n)), tuple(parents), tuple(scores))


def fixed_latency(base, tree_cost, per_token):
    return LatencyModel(coef=[base, tree_cost, 0.0, 0.0, per_token, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])


def ancestor_closed(tree, nodes):
    return all(tree.parents[i] in nodes for i in nodes if i != 0)


@settings(deadline=None, max_examples=150)
@given(
    rows=st.lists(st.one_of(candidate(), st.none()), min_size=1, max_size=4), base=st.floats(0.01, 0.1),
    tree_cost=st.floats(0.0, 0.1), per_token=st.floats(0.0, 0.01),
)
def test_plan_maximises_expected_tokens_per_second_over_a_nested_family(rows, base, tree_cost, per_token):
    acceptance = AcceptanceModel(calibrator=Calibrator())
    planner = TreePlanner(acceptance, fixed_latency(base, tree_cost, per_token), max_nodes=20)
    out = planner.plan(rows, kv=100)
    B = len(rows)
    chosen = planner.last_choice["n"]
    rates = {}
    for n in range(1, max((len(t) for t in rows if t is not None), default=1) + 1):
        expected = 0.0
        for tree in rows:
            if tree is None:
                continue
            l = acceptance.path_probabilities(tree)
            order = best_first(tree, l)
            prefix = order[:n]
            assert ancestor_closed(tree, set(prefix))  # every member of the family is a tree
            if n > 1:
                assert set(order[: n - 1]) <= set(prefix)  # nested
            expected += sum(l[i] for i in prefix)
        rates[n] = expected / planner.latency.predict(features(B, n, n, 100))
    assert rates[chosen] == pytest.approx(max(rates.values()), rel=1e-9)
    for tree, planned in zip(rows, out):
        if tree is None:
            assert planned is None
            continue
        assert len(planned) == min(chosen, len(tree))
        assert planned.tokens[0] == tree.tokens[0]
        for i in range(1, len(planned)):  # the planned tree is the candidate's restriction
            p = planned.parents[i]
            assert (planned.tokens[p], planned.tokens[i]) in {
                (tree.tokens[tree.parents[j]], tree.tokens[j]) for j in range(1, len(tree))
            }


@settings(deadline=None, max_examples=150)
@given(
    rows=st.lists(st.one_of(candidate(), st.none()), min_size=1, max_size=3).filter(lambda r: any(t is not None for t in r)),
    base=st.floats(0.01, 0.1), step_cost=st.floats(0.0, 0.1), per_token=st.floats(0.0, 0.02),
)
def test_ragged_plan_gives_each_row_its_own_size_and_is_optimal(rows, base, step_cost, per_token):
    """With a step cost that depends on the real node count N only, the ragged plan is the best of
    every per-row size assignment (each row a best-first prefix, finished rows nothing): nodes
    join by path probability, so for every N the plan holds the most expected tokens."""
    import itertools

    acceptance = AcceptanceModel(calibrator=Calibrator())
    latency = LatencyModel(coef=[base, step_cost, 0.0, 0.0, per_token, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    planner = TreePlanner(acceptance, latency, max_nodes=20, ragged=True)
    rows = [t if t is None else t.subtree(list(range(min(len(t), 6)))) for t in rows]  # small enough to enumerate
    out = planner.plan(rows, kv=100)
    ls = [None if t is None else acceptance.path_probabilities(t) for t in rows]
    orders = [None if t is None else best_first(t, l) for t, l in zip(rows, ls)]

    def rate(sizes):
        expected = sum(sum(ls[b][i] for i in orders[b][:n]) for b, n in enumerate(sizes) if orders[b] is not None)
        return expected / planner.step_seconds(len(rows), max(sizes), 100, sum(sizes))[1]

    ranges = [range(0, 1) if t is None else range(1, len(t) + 1) for t in rows]
    best = max(rate(s) for s in itertools.product(*ranges))
    sizes = planner.last_choice["sizes"]
    assert rate(sizes) == pytest.approx(best, rel=1e-9)
    for b, (tree, planned) in enumerate(zip(rows, out)):
        if tree is None:
            assert planned is None and sizes[b] == 0
            continue
        assert len(planned) == sizes[b] >= 1
        assert ancestor_closed(tree, set(orders[b][: sizes[b]]))
        assert planned == (tree.subtree(orders[b][: sizes[b]]) if sizes[b] < len(tree) else tree)


def test_the_step_cost_counts_what_happens_around_the_forward():
    """Drafting and bookkeeping learnt per node make large trees less attractive."""
    tree = TokenTree((1, 2, 3, 4), (-1, 0, 1, 2), (1.0, 0.6, 0.5, 0.4))
    planner = TreePlanner(AcceptanceModel(), fixed_latency(0.05, 0.0, 0.001), max_nodes=4, ragged=True)
    assert len(planner.plan([tree], kv=10)[0]) == 4
    for n in (1, 2, 3, 4, 1, 4):
        planner.observe_overhead(n, 0.1 * n)  # each node costs 100 ms around the forward
    assert planner.step_seconds(1, 4, 10, 4)[1] == pytest.approx(0.05 + 0.004 + 0.4, rel=1e-3)
    assert len(planner.plan([tree], kv=10)[0]) == 1


def test_poor_drafts_fall_back_to_plain_steps():
    tree = TokenTree((1, 2, 3, 4), (-1, 0, 1, 2), (1.0, 0.02, 0.01, 0.005))
    planner = TreePlanner(AcceptanceModel(), fixed_latency(0.05, 0.03, 0.001), max_nodes=4)
    assert planner.plan([tree], kv=10) == [TokenTree((1,), (-1,), (1.0,))]
    good = TokenTree((1, 2, 3, 4), (-1, 0, 1, 2), (1.0, 0.95, 0.9, 0.85))
    assert len(planner.plan([good], kv=10)[0]) == 4


def test_the_planner_learns_that_drafts_are_useless():
    """A drafter claiming 0.9 that is never right: after some steps the planner stops trusting it."""
    claim = TokenTree((1, 2, 3), (-1, 0, 1), (1.0, 0.9, 0.81))
    planner = TreePlanner(AcceptanceModel(), fixed_latency(0.05, 0.03, 0.001), max_nodes=3)
    assert len(planner.plan([claim], kv=10)[0]) == 3
    for _ in range(40):
        planner.observe([claim], [[0]], 0.08, 1, 3, 10)
    assert len(planner.plan([claim], kv=10)[0]) == 1


def _planned_step(planner, tree, accepted: int = 1, costly: bool = True) -> None:
    """One planned step of `tree` (ragged, batch 1) that accepts `accepted` tokens."""
    planner.plan([tree], kv=10, costly=costly)
    n = planner.last_choice["n"]
    planner.observe([tree.subtree(list(range(n)))], [list(range(min(accepted, n)))], 0.05 + 0.001 * n, 1, n, 10)
    planner.observe_overhead(n, 0.0, rows=1, speculation=planner.speculation_seconds(1, costly), costly=costly)


def _plain_steps(planner, seconds: float = 0.051, rows: int = 1) -> None:
    """Plain steps of `rows` rows, measured (what a call's plain steps give the judge)."""
    for _ in range(4):
        planner.observe([TokenTree.root_only(1)] * rows, [[0]] * rows, seconds, rows, 1, 10)
        planner.observe_overhead(rows, 0.0, rows=rows)


POOR = TokenTree((1, 2, 3), (-1, 0, 1), (1.0, 0.3, 0.2))
GOOD = TokenTree((1, 2, 3), (-1, 0, 1), (1.0, 0.99, 0.98))
WEAK = TokenTree((1, 2), (-1, 0), (1.0, 0.001))


def test_speculation_that_does_not_pay_is_skipped_and_probed_again():
    """When the best tree, drafting and planning included, is slower per token than a plain step
    without them, the next 1, 2, 4, ... (at most MAX_SKIP) steps are plain; a tree that pays turns
    speculation back on at once."""
    from propd_compile.planner import MAX_SKIP

    planner = TreePlanner(AcceptanceModel(), fixed_latency(0.05, 0.0, 0.001), max_nodes=3, ragged=True)
    _plain_steps(planner)
    for _ in range(8):  # speculating (cheap drafters only: no costly tier) costs 80% of a plain step
        planner.observe_overhead(1, 0.0, rows=1, speculation=0.04, costly=False)
    assert planner.speculation_seconds(1, costly=False) == pytest.approx(0.04)
    assert planner.speculation_seconds(1, costly=True) == 0.0  # not measured

    def skipped_after(tree, accepted: int = 1) -> int:
        _planned_step(planner, tree, accepted, costly=False)
        n = 0
        while not planner.next_step(1)[0]:
            n += 1
        return n

    assert [skipped_after(POOR) for _ in range(7)] == [1, 2, 4, 8, 16, 32, 32] and MAX_SKIP == 32
    assert skipped_after(GOOD, accepted=3) == 0  # 3 tokens for 1.8 plain steps' time: speculating pays
    assert skipped_after(POOR) == 1  # the back-off starts again
    # a tree expected to pay that realizes one token a step (its drafts all rejected) backs off
    # too, once the running realized rate has fallen below a plain step's: not after one bad
    # step, and longer the longer it goes on
    assert skipped_after(GOOD, accepted=3) == 0
    skips = [skipped_after(GOOD) for _ in range(5)]
    assert skips[0] == 0 and skips == sorted(skips) and skips[-1] >= 2
    free = TreePlanner(AcceptanceModel(), fixed_latency(0.05, 0.0, 0.001), max_nodes=3, ragged=True)
    free.plan([POOR], kv=10, costly=False)
    assert free.next_step(1)[0]  # with speculation free, the poor tree still pays
    free.plan([TokenTree.root_only(1)], kv=10, costly=False)
    assert not free.next_step(1)[0]  # no draft at all: speculating gained nothing


def test_trees_are_judged_against_measured_plain_steps():
    """The realized rate of a tree expected to pay is compared with what plain steps of as many
    rows measured, not with the latency model's plain step: plain steps faster than predicted
    make the same tree a loss."""
    def realized_skip(plain_seconds: float | None) -> int:
        planner = TreePlanner(AcceptanceModel(), fixed_latency(0.05, 0.0, 0.001), max_nodes=3, ragged=True)
        if plain_seconds is not None:
            for _ in range(4):  # plain steps: forward, then what happened around it
                planner.observe([TokenTree.root_only(1)], [[0]], plain_seconds, 1, 1, 10)
                planner.observe_overhead(1, 0.0, rows=1)
        for _ in range(3):  # each realizes 2 tokens in 0.07 s + 0.01 s of drafting: 25 tokens/s
            planner.plan([GOOD], kv=10, costly=False)
            n = planner.last_choice["n"]
            planner.observe([GOOD.subtree(list(range(n)))], [[0, 1]], 0.07, 1, n, 10)
            planner.observe_overhead(n, 0.0, rows=1, speculation=0.01, costly=False)
        skipped = 0
        while not planner.next_step(1)[0]:
            skipped += 1
        return skipped

    # against the predicted plain step (20 tokens/s) it pays, and the next step is a plain one
    # that measures the rate, outside the schedule
    assert realized_skip(None) == 1
    assert realized_skip(0.06) == 0  # measured plain steps at 17 tokens/s: it pays
    assert realized_skip(0.03) > 0  # measured plain steps at 33 tokens/s: it loses


def test_a_row_count_without_measured_plain_steps_gets_one_each_call():
    """Rows that finish change the active row count; a tree judged at a count whose plain steps
    this call has not measured makes the next step of that count plain (once), so the judge
    compares with a measured rate; a new call measures again."""
    planner = TreePlanner(AcceptanceModel(), fixed_latency(0.05, 0.0, 0.001), max_nodes=3, ragged=True)
    _plain_steps(planner, rows=2)
    _planned_step(planner, GOOD, accepted=3, costly=False)  # one active row: none measured
    assert planner.next_step(1) == (False, False)
    assert planner.next_step(1)[0]  # one plain step, not more (the tree paid: speculation goes on)
    _plain_steps(planner)
    _planned_step(planner, GOOD, accepted=3, costly=False)
    assert planner.next_step(1)[0]
    planner.start_call()
    assert not planner.plain_seconds
    _planned_step(planner, GOOD, accepted=3, costly=False)
    assert planner.next_step(1) == (False, False)


def test_costly_drafters_back_off_before_speculation_does():
    """Costly drafts that do not pay leave the next steps to the cheap drafters (speculating
    without them), tried again after 1, 2, 4, ... steps; cheap steps that do not pay either make
    the steps plain unless the cheap tier costs less than SKIP_MARGIN of a plain step and drafts
    anything at all; a costly
    step that pays brings both back at once, if it beats what the cheap tier realized."""
    planner = TreePlanner(AcceptanceModel(), fixed_latency(0.05, 0.0, 0.001), max_nodes=3, ragged=True)
    _plain_steps(planner)
    for _ in range(8):
        planner.observe_overhead(1, 0.0, rows=1, speculation=0.04, costly=True)  # the heads: 80% of a step
        planner.observe_overhead(1, 0.0, rows=1, speculation=0.001, costly=False)  # n-gram: 2%
    _planned_step(planner, POOR, costly=True)
    assert planner.next_step(1) == (True, False)  # the cheap tier still speculates
    _planned_step(planner, POOR, accepted=2, costly=False)  # with nearly free drafting the poor tree pays
    assert planner.next_step(1) == (True, True)  # the costly drafters' skip of 1 is over
    _planned_step(planner, POOR, costly=True)
    assert [planner.next_step(1) for _ in range(3)] == [(True, False), (True, False), (True, True)]
    _planned_step(planner, POOR, costly=True)
    planner.plan([WEAK], kv=10, costly=False)
    assert planner.last_choice["n"] == 1  # a draft that does not pay: the plan picks a plain step
    _planned_step(planner, WEAK, costly=False)
    # but the cheap tier costs 2% of a plain step: it keeps drafting and planning, and the costly
    # skip counts down meanwhile
    assert planner.next_step(1) == (True, False)
    _planned_step(planner, TokenTree.root_only(1), costly=False)  # no cheap draft at all: nothing gained
    assert planner.next_step(1) == (False, False)  # plain, however cheap the tier
    _planned_step(planner, GOOD, accepted=3, costly=True)  # 1.6x the plain rate: speculation back on
    assert planner.next_step(1) == (True, False)  # but less than the cheap tier realized (1.9x): no heads


def test_costly_drafters_must_beat_what_the_cheap_tier_realizes():
    """The costly drafters keep their steps while those realize more than plain steps and, once
    the cheap tier has been measured, more than it: otherwise the cheap tier takes the steps."""
    planner = TreePlanner(AcceptanceModel(), fixed_latency(0.05, 0.0, 0.001), max_nodes=3, ragged=True)
    _plain_steps(planner)
    for _ in range(8):
        planner.observe_overhead(1, 0.0, rows=1, speculation=0.02, costly=True)
        planner.observe_overhead(1, 0.0, rows=1, speculation=0.001, costly=False)
    _planned_step(planner, GOOD, accepted=3, costly=True)  # 3 tokens in 0.073 s: 2.1x the plain rate
    assert planner.next_step(1) == (True, True)  # nothing to compare with but plain steps
    _planned_step(planner, GOOD, accepted=3, costly=False)  # the same tokens without the heads: 2.8x
    assert planner.next_step(1) == (True, True)
    _planned_step(planner, GOOD, accepted=3, costly=True)
    assert planner.next_step(1) == (True, False)  # the heads pay against plain steps, not against n-gram alone
    assert planner.next_step(1) == (True, True)  # tried again after the skip
    _planned_step(planner, GOOD, accepted=3, costly=True)
    assert [planner.next_step(1) for _ in range(3)] == [(True, False), (True, False), (True, True)]


def test_each_batch_bucket_keeps_its_own_schedule():
    """Speculation that did not pay at one batch size backs off there only: steps of another
    power-of-two bucket of active rows keep their own back-off and realized rates."""
    from propd_compile.planner import batch_bucket

    assert [batch_bucket(r) for r in (1, 2, 3, 4, 5, 8, 9, 16, 17, 32)] == [1, 2, 4, 4, 8, 8, 16, 16, 32, 32]
    planner = TreePlanner(AcceptanceModel(), fixed_latency(0.05, 0.0, 0.001), max_nodes=3, ragged=True)
    for _ in range(8):
        planner.observe_overhead(1, 0.0, rows=1, speculation=0.04, costly=False)
    _planned_step(planner, POOR, costly=False)  # one row: does not pay, backs off
    assert planner.next_step(16) == (True, True) and planner.next_step(9) == (True, True)
    assert planner.next_step(2) == (True, True)
    assert planner.next_step(1)[0] is False
    assert planner.schedule(12) is planner.schedule(16) and planner.schedule(1) is not planner.schedule(2)


def test_batch_sizes_beyond_the_calibration_are_probed_plain_steps_included(monkeypatch):
    """A loaded calibration covers the batch sizes it measured; a larger batch gets its own probe
    (plain steps and small trees, up to PROBE_TOKENS nodes), once."""
    import propd_compile.planner as planner_mod

    calibration = LatencyModel(coef=[0.02, -0.015, 0.014, 0.002, 0.004, 1e-4, 0.017, 7e-4, 0.0, 0.0, 0.0])  # a real CPU fit's shape
    probed = []

    def measure(model, forward, b, n, kv):  # this machine: half what the calibration extrapolates to
        probed.append((b, n))
        return 0.5 * calibration.predict(features(b, n, n, kv))

    monkeypatch.setattr(planner_mod, "measure_step", measure)
    latency = LatencyModel.from_dict(calibration.to_dict())  # a loaded calibration: the prior
    latency.max_batch = 8  # as `load_calibration` sets it
    planner = TreePlanner(AcceptanceModel(), latency, max_nodes=32)
    for batch in (1, 8, 32, 32):
        planner.warm_up(None, None, batch, kv=600)
    assert probed == [(32, 1), (32, 2), (32, 4), (32, 8)]
    plain = features(32, 1, 1, 600)
    assert planner.latency.predict(plain) == pytest.approx(0.5 * calibration.predict(plain), rel=0.15)  # measured, not extrapolated


class CountingDrafter:
    """A drafter that reads hidden states, like the heads, and whose drafts are never right (a
    high claimed confidence on a token greedy never picks); counts its costly calls."""

    needs_hidden, feature_layers = True, ()

    def __init__(self):
        self.hidden_calls = self.proposals = 0

    def start(self, sequences):
        self.last, self.ready = [s[-1] for s in sequences], [False] * len(sequences)

    def advance(self, row, tokens):
        if tokens:
            self.last[row], self.ready[row] = tokens[-1], False

    def set_hidden(self, rows, hidden):
        self.hidden_calls += 1
        for r in rows:
            self.ready[r] = True

    def propose(self, row, budget):
        self.proposals += 1
        if not self.ready[row]:  # no hidden state for this step
            return TokenTree.root_only(self.last[row])
        return TokenTree((self.last[row], 1, 1), (-1, 0, 1), (1.0, 0.5, 0.25))  # token 1 is never generated


def test_decoding_stops_speculating_when_it_does_not_pay_and_stays_identical():
    from propd_compile.decoding import tree_generate

    model = tiny_model("llama", seed=0)
    ids, mask = left_padded([[7, 8, 9], [10, 11, 12, 13]])
    ref = hf_greedy(model, ids, mask, 40)
    drafter = CountingDrafter()
    planner = TreePlanner(AcceptanceModel(), fixed_latency(0.05, 0.0, 0.001), max_nodes=3, ragged=True)
    for _ in range(8):
        planner.observe_overhead(1, 0.0, rows=2, speculation=0.04)
    planner.calibrated = True  # no probing of step shapes
    propd_compile.accelerate(model, ProPDConfig(compile=False))  # attention that reads ragged steps
    try:
        out, stats = tree_generate(
            model, ids, mask, max_new_tokens=40, eos_token_ids=[EOS], pad_token_id=PAD, drafter=drafter,
            max_tree_nodes=3, planner=planner, ragged=True,
        )
    finally:
        propd_compile.restore(model)
    assert torch.equal(out, ref)
    # the costly drafter reads hidden states in about one step in eight; the cheap tier (which
    # has no drafts here) backs off alike, so most steps are plain: each tier tries at most
    # 1 + log2(MAX_SKIP) + steps / MAX_SKIP times (both rows propose in either)
    assert stats.steps >= 30 and drafter.hidden_calls <= 8 and drafter.proposals <= 2 * (8 + 8)


@st.composite
def prompts(draw):
    rows = []
    for _ in range(draw(st.integers(1, 3))):
        rows.append(draw(st.lists(st.integers(6, VOCAB - 1), min_size=1, max_size=10)))
    return rows


@pytest.mark.parametrize("arch", ARCHS)
@settings(deadline=None, max_examples=12, suppress_health_check=[HealthCheck.too_slow])
@given(rows=prompts(), budget=st.integers(1, 24), new=st.integers(1, 30), seed=st.integers(0, 1))
def test_dynamic_decoding_equals_hf_greedy(arch, rows, budget, new, seed):
    model = tiny_model(arch, seed=seed)
    ids, mask = left_padded(rows)
    ref = hf_greedy(model, ids, mask, new)
    propd_compile.accelerate(model, ProPDConfig(tree="dynamic", max_tree_nodes=budget))
    try:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new)
        out2 = model.generate(ids, attention_mask=mask, max_new_tokens=new)  # statistics carried over
    finally:
        propd_compile.restore(model)
    assert torch.equal(out, ref) and torch.equal(out2, ref)


def test_dynamic_tree_with_heads_is_lossless_and_updates_rank_statistics(tmp_path):
    from test_heads import random_heads

    model = tiny_model("llama", seed=0)
    random_heads(model, root_token=True).save(tmp_path, accuracy={"rank_accuracy": [[0.3, 0.1], [0.2, 0.1], [0.1], [0.1]]})
    rows = [[7, 8, 9, 10, 7, 8], [11, 12]]
    ids, mask = left_padded(rows)
    ref = hf_greedy(model, ids, mask, 30)
    config = ProPDConfig(heads=str(tmp_path), tree="dynamic", max_tree_nodes=12)
    propd_compile.accelerate(model, config)
    try:
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=30), ref)
        planner = model.propd.planner(config)
    finally:
        propd_compile.restore(model)
    stats = planner.acceptance.rank_stats
    assert stats is not None and stats.trials[0] > 50  # warm start (weight 50) plus observed steps
    assert planner.latency.ready and planner.calibrated_steps > 0


def test_heads_that_are_never_right_are_skipped_but_probed():
    from propd_compile.acceptance import RankStats
    from propd_compile.drafters import HeadsDrafter
    from test_heads import random_heads

    model = tiny_model("llama")
    heads = random_heads(model, 3)
    stats = RankStats.warm([[0.4, 0.1], [0.2], [0.1]])
    drafter = HeadsDrafter(heads, model.get_output_embeddings(), max_depth=6, topk=2, rank_stats=stats)
    drafter.start([[4, 5]])
    h = torch.randn(1, 32)
    drafter.set_hidden([0], h)
    assert len(drafter.top[0][0]) == 3  # all heads useful so far
    for _ in range(2000):
        stats.observe(1, None)  # head 1 is never right
    depths = []
    for _ in range(32):
        drafter.set_hidden([0], h)
        depths.append(len(drafter.top[0][0]))
    assert depths.count(1) == 30 and depths.count(3) == 2  # head 0 only, all heads every 16th step
