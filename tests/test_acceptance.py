"""The acceptance model: per-rank statistics and calibration converge to the true rates."""
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from propd_compile.acceptance import AcceptanceModel, Calibrator, RankStats, conditional_confidences
from propd_compile.tree import TokenTree

rates = st.lists(st.floats(0.0, 1.0), min_size=1, max_size=5).map(
    lambda r: [x / max(sum(r), 1.0) for x in r]  # P(rank r) sums to <= 1
)


@settings(deadline=None, max_examples=40)
@given(table=st.lists(rates, min_size=1, max_size=3), seed=st.integers(0, 10**6))
def test_rank_stats_converge_on_a_stream_with_known_rates(table, seed):
    rng = random.Random(seed)
    ranks = max(len(r) for r in table)
    stats = RankStats(len(table), ranks, decay=0.9995)
    for _ in range(4000):
        for d, row in enumerate(table):
            u, rank, acc = rng.random(), None, 0.0
            for r, p in enumerate(row):
                acc += p
                if u < acc:
                    rank = r
                    break
            stats.observe(d, rank)
    for d, row in enumerate(table):
        for r, p in enumerate(row):
            assert stats.p(d, r) == pytest.approx(p, abs=0.05)


def test_rank_stats_warm_start_and_forget():
    stats = RankStats.warm([[0.5, 0.2], [0.3]], weight=50)
    assert stats.p(0, 0) == pytest.approx(0.5) and stats.p(1, 1) == 0.0
    for _ in range(3000):
        stats.observe(0, 1)
    assert stats.p(0, 1) > 0.95 and stats.p(0, 0) < 0.05


@settings(deadline=None, max_examples=40)
@given(true_rate=st.floats(0.0, 1.0), conf=st.floats(0.0, 1.0), rank=st.sampled_from([-1, 0, 2]), seed=st.integers(0, 10**6))
def test_calibrator_learns_the_acceptance_rate_of_a_cell(true_rate, conf, rank, seed):
    """Whatever the drafter claims (conf) and the rank prior say, observed outcomes win."""
    rng = random.Random(seed)
    cal = Calibrator(decay=1.0)
    prior = RankStats.warm([[0.9, 0.05, 0.01]])
    for _ in range(3000):
        cal.observe(1, rank, conf, rng.random() < true_rate)
    assert cal.conditional(1, rank, conf, prior) == pytest.approx(true_rate, abs=0.04)


@settings(deadline=None, max_examples=40)
@given(factor=st.floats(0.3, 0.8), conf=st.floats(0.5, 1.0), other=st.floats(0.3, 1.0), seed=st.integers(0, 10**6))
def test_cells_without_trials_borrow_what_their_source_realized(factor, conf, other, seed):
    """A drafter whose confidences run high by `factor`: cells it never reached (a deeper depth,
    another confidence bin) start from what the source realized, not from its raw claim."""
    rng = random.Random(seed)
    cal = Calibrator(decay=1.0)
    for _ in range(2000):
        cal.observe(1 + rng.randrange(3), -1, conf, rng.random() < factor * conf)
    assert cal.conditional(6, -1, conf, None) == pytest.approx(factor * conf, abs=0.06)  # same bin, new depth
    if cal.cells(6, -1, other)[1] != cal.cells(6, -1, conf)[1]:  # another bin: the source's ratio
        assert cal.conditional(6, -1, other, None) == pytest.approx(min(factor * other, 1.0), abs=0.08)


def test_priors_before_any_outcome():
    cal = Calibrator()
    prior = RankStats.warm([[0.6, 0.2]])
    assert cal.conditional(1, 0, 0.1, prior) == pytest.approx(0.6)  # heads node: P_k^i
    assert cal.conditional(1, -1, 0.35, prior) == pytest.approx(0.35)  # other drafters: their confidence


trees = st.integers(1, 12).flatmap(
    lambda n: st.tuples(
        st.just(n), st.lists(st.integers(0, 10**6), min_size=n - 1, max_size=n - 1),
        st.lists(st.floats(0.0, 1.0), min_size=n - 1, max_size=n - 1), st.lists(st.integers(-1, 5), min_size=n - 1, max_size=n - 1),
    )
)


def build(n, seeds, confs, ranks):
    parents, scores = [-1], [1.0]
    for i in range(1, n):
        p = seeds[i - 1] % i
        parents.append(p)
        scores.append(scores[p] * confs[i - 1])
    return TokenTree(tuple(range(100, 100 + n)), tuple(parents), tuple(scores), (-1, *ranks))


@settings(deadline=None, max_examples=100)
@given(spec=trees, outcomes=st.lists(st.booleans(), min_size=30, max_size=30))
def test_path_probabilities_never_grow_along_a_path(spec, outcomes):
    tree = build(*spec)
    model = AcceptanceModel(rank_stats=RankStats.warm([[0.5, 0.2, 0.1], [0.3, 0.1], [0.2]]))
    for k, o in enumerate(outcomes):  # some random history
        model.calibrator.observe(1 + k % 3, k % 4 - 1, (k % 10) / 10, o)
    l = model.path_probabilities(tree)
    assert l[0] == 1.0
    for i in range(1, len(tree)):
        assert 0.0 <= l[i] <= l[tree.parents[i]]
    conf = conditional_confidences(tree)
    assert all(0.0 <= c <= 1.0 for c in conf)


def test_observe_counts_children_of_accepted_nodes_only():
    tree = TokenTree((1, 2, 3, 4, 5), (-1, 0, 0, 1, 3), (1.0, 0.5, 0.4, 0.25, 0.1))
    model = AcceptanceModel(calibrator=Calibrator(decay=1.0))
    model.observe([tree], [[0, 1]])  # root -> node 1 accepted; nodes 1, 2 and 3 were trials
    trials = sum(c[1] for c in model.calibrator.counts.values())
    hits = sum(c[0] for c in model.calibrator.counts.values())
    assert trials == 3 and hits == 1


def test_statistics_round_trip(tmp_path):
    model = AcceptanceModel(rank_stats=RankStats.warm([[0.5, 0.2]]))
    model.calibrator.observe(1, 0, 0.3, True)
    model.rank_stats.observe(0, 1)
    model.save(tmp_path / "s.json")
    other = AcceptanceModel(rank_stats=RankStats.warm([[0.1, 0.1]]))
    other.load(tmp_path / "s.json")
    assert other.calibrator.counts == model.calibrator.counts
    assert other.calibrator.pooled == model.calibrator.pooled
    assert other.rank_stats.table() == model.rank_stats.table()
