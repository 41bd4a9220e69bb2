import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from propd_compile.tree import TokenTree, TreeBatch


@st.composite
def trees(draw, max_nodes=24, vocab=20):
    n = draw(st.integers(1, max_nodes))
    tokens, parents, used = [draw(st.integers(0, vocab - 1))], [-1], set()
    for i in range(1, n):
        p = draw(st.integers(0, i - 1))
        free = [t for t in range(vocab) if (p, t) not in used]
        if not free:
            break
        t = draw(st.sampled_from(free))
        used.add((p, t))
        tokens.append(t)
        parents.append(p)
    return TokenTree(tuple(tokens), tuple(parents), tuple([1.0] * len(tokens)))


@settings(deadline=None, max_examples=200)
@given(trees())
def test_ancestor_mask_depth_and_paths_agree(tree):
    anc = tree.ancestor_mask()
    depths = tree.depths
    for i in range(len(tree)):
        path = tree.path(i)
        assert path[0] == 0 and path[-1] == i
        assert len(path) == depths[i] + 1
        assert all(tree.parents[c] == p for p, c in zip(path, path[1:]))
        assert set(anc[i].nonzero().flatten().tolist()) == set(path)
    assert anc.diagonal().all() and anc[:, 0].all()


@settings(deadline=None, max_examples=200)
@given(
    st.lists(
        st.tuples(st.lists(st.integers(0, 6), min_size=1, max_size=6), st.floats(0.0, 1.0)), min_size=0, max_size=8
    ),
    st.integers(1, 20),
)
def test_from_paths_is_ancestor_closed_within_budget(paths, budget):
    tree = TokenTree.from_paths(99, paths, budget)  # construction validates order and sibling tokens
    assert 1 <= len(tree) <= budget
    assert tree.tokens[0] == 99
    for i in range(1, len(tree)):  # the root (always accepted) scores 1 by definition
        if tree.parents[i] != 0:
            assert tree.scores[i] <= tree.scores[tree.parents[i]] + 1e-12
    # every kept root-to-node path is a prefix of some input path
    prefixes = {tuple(p[:k]) for p, _ in paths for k in range(1, len(p) + 1)}
    for i in range(1, len(tree)):
        assert tuple(tree.tokens[j] for j in tree.path(i)[1:]) in prefixes
    # with a budget large enough, every prefix is kept
    if budget > sum(len(p) for p, _ in paths):
        assert len(tree) == len(prefixes) + 1


def test_from_paths_sums_evidence_of_shared_prefixes():
    tree = TokenTree.from_paths(0, [([1, 2], 0.25), ([1, 3], 0.5), ([4], 0.25)], budget=10)
    by_path = {tuple(tree.tokens[j] for j in tree.path(i)[1:]): tree.scores[i] for i in range(1, len(tree))}
    assert by_path == {(1,): 0.75, (1, 2): 0.25, (1, 3): 0.5, (4,): 0.25}
    best3 = TokenTree.from_paths(0, [([1, 2], 0.25), ([1, 3], 0.5), ([4], 0.25)], budget=3)
    assert best3.tokens == (0, 1, 3)


@pytest.mark.parametrize(
    "tokens,parents,msg",
    [((), (), "root"), ((1, 2), (0, 0), "root"), ((1, 2, 3), (-1, 2, 0), "precede"), ((1, 2, 2), (-1, 0, 0), "siblings")],
)
def test_invalid_trees_are_rejected(tokens, parents, msg):
    with pytest.raises(ValueError, match=msg):
        TokenTree(tokens, parents, tuple([1.0] * len(tokens)))


@settings(deadline=None, max_examples=100)
@given(st.lists(trees(max_nodes=10), min_size=1, max_size=4))
def test_batch_padding_is_inert(tree_list):
    batch = TreeBatch.stack(tree_list, pad_token=7)
    T = max(len(t) for t in tree_list)
    assert batch.tokens.shape == (len(tree_list), T)
    for b, tree in enumerate(tree_list):
        n = len(tree)
        assert batch.valid[b].tolist() == [True] * n + [False] * (T - n)
        assert torch.equal(batch.ancestors[b, :n, :n], tree.ancestor_mask())
        # padding sees only itself and nobody sees padding
        for i in range(n, T):
            assert batch.ancestors[b, i].nonzero().flatten().tolist() == [i]
            assert not batch.ancestors[b, :, i][torch.arange(T) != i].any()


@settings(deadline=None, max_examples=100)
@given(trees(), st.data())
def test_best_path_takes_the_best_scored_child_at_every_level(tree, data):
    scores = [1.0] + [data.draw(st.floats(0.0, 1.0)) for _ in range(len(tree) - 1)]
    tree = TokenTree(tree.tokens, tree.parents, tuple(scores))
    depth = data.draw(st.none() | st.integers(0, 6))
    path = tree.best_path(depth)
    assert path == tree.path(path[-1])  # a chain from the root
    children = lambda p: [i for i in range(1, len(tree)) if tree.parents[i] == p]  # noqa: E731
    for p, c in zip(path, path[1:]):
        assert tree.scores[c] == max(tree.scores[i] for i in children(p))
    assert (depth is not None and len(path) == depth + 1) or not children(path[-1])
