"""Per-request draft lengths: prefixes of each chain, the budget that maximises expected tokens/s."""
import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from propd_compile.acceptance import AcceptanceModel
from propd_compile.cost_model import LatencyModel, features
from propd_compile.integrations.draft_lengths import ChainPlanner
from propd_compile.tree import TokenTree


def chain(root: int, scores: list[float]) -> TokenTree:
    """A chain whose drafter scores never grow along it (as the n-gram trie's paths)."""
    return TokenTree((root, *range(100, 100 + len(scores))), (-1, *range(len(scores))), (1.0, *scores))


def fitted(per_token: float, draft_step: float, base: float = 0.05) -> LatencyModel:
    """A latency model fit on steps that cost base + per_token * tokens (+ draft_step with drafts)."""
    lat = LatencyModel(half_life=float("inf"))
    for b in (1, 2, 4, 8):
        for t in (1, 1.5, 2, 3, 5, 9):
            lat.observe(features(b, t, t, 100), base + per_token * b * t + draft_step * (t > 1))
    lat.fit()
    return lat


def trained_planner(lat: LatencyModel) -> ChainPlanner:
    planner = ChainPlanner(AcceptanceModel(), lat)
    planner.measured = [planner.explore_steps] * 2
    return planner


scores = st.lists(st.floats(0.0, 1.0), min_size=0, max_size=4).map(lambda s: sorted(s, reverse=True))


@settings(deadline=None, max_examples=40)
@given(rows=st.lists(st.one_of(st.none(), scores), min_size=1, max_size=3),
       per_token=st.sampled_from([0.0005, 0.005, 0.05]), kv=st.integers(1, 500))
def test_plan_is_the_best_allocation_of_chain_prefixes(rows, per_token, kv):
    """Every row sends a prefix of its chain, and no other choice of prefixes has a larger
    expected rate (accepted + bonus tokens over predicted seconds) than the planner's."""
    chains = [None if s is None else chain(7 + r, s) for r, s in enumerate(rows)]
    planner = trained_planner(fitted(per_token, 0.01))
    plan = planner.plan(chains, [kv] * len(rows))
    live = [r for r, c in enumerate(chains) if c is not None]
    l = {r: planner.acceptance.path_probabilities(chains[r]) for r in live}
    B = max(len(live), 1)

    def rate(lengths):
        n = sum(lengths[r] for r in live)
        expected = sum(sum(l[r][: lengths[r] + 1]) for r in live)
        return expected / planner.latency.predict(features(B, 1 + n / B, 1 + n / B, kv))

    for r, c in enumerate(chains):
        sent = plan.chains[r]
        if c is None:
            assert sent is None
        else:
            assert sent.tokens == c.tokens[: len(sent)] and sent.parents == c.parents[: len(sent)]
    options = [range(len(c)) if c is not None else [0] for c in chains]
    best = max(rate(list(ls)) for ls in itertools.product(*options))
    assert rate(plan.lengths) >= best * (1 - 1e-9)
    assert abs(plan.expected_tokens - sum(sum(l[r][: plan.lengths[r] + 1]) for r in live)) < 1e-9


def test_speculation_turns_off_when_tokens_are_dear_and_on_when_cheap():
    """Doubtful drafts are sent when extra tokens cost next to nothing, and not at all when every
    token costs as much as a plain step's."""
    doubtful = [chain(3, [0.6, 0.3, 0.1]) for _ in range(4)]
    assert trained_planner(fitted(0.0005, 0.0)).plan(doubtful, [50] * 4).lengths == [3] * 4
    assert trained_planner(fitted(0.2, 0.05)).plan(doubtful, [50] * 4).lengths == [0] * 4


def test_exploration_alternates_full_drafts_and_none_until_both_were_measured():
    planner = ChainPlanner(AcceptanceModel(), LatencyModel())
    chains = [chain(3, [0.9, 0.5]), chain(4, [0.2])]
    seen = []
    for _ in range(2 * planner.explore_steps):
        plan = planner.plan(chains, [10, 10])
        seen.append(plan.lengths)
        planner.learn_latency(plan, 0.05 + 0.01 * sum(plan.lengths))
    assert seen == [[2, 1], [0, 0]] * planner.explore_steps
    assert planner.latency.ready and planner.plan(chains, [10, 10]).predicted_seconds is not None


def test_acceptance_learns_from_verified_chains():
    """Chains that are always rejected lose calibrated probability; accepted ones keep it."""
    planner = ChainPlanner(AcceptanceModel(), LatencyModel())
    bad, good = chain(3, [0.9, 0.8]), chain(4, [0.9, 0.8])
    before = planner.acceptance.path_probabilities(bad)[1]
    for _ in range(30):
        planner.learn_acceptance([bad], [0])
    assert planner.acceptance.path_probabilities(bad)[1] < before / 2
    planner2 = ChainPlanner(AcceptanceModel(), LatencyModel())
    for _ in range(30):
        planner2.learn_acceptance([good], [2])
    assert planner2.acceptance.path_probabilities(good)[2] > 0.8
