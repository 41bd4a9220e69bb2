import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from propd_compile.cache import TreeKVCache


def _cache(B=3, L=2, H=2, S=40, D=4, gaps=0):
    c = TreeKVCache(L, B, H, D, S, torch.float32, "cpu", gap_slots=gaps)
    for buf in (*c.keys, *c.values):
        buf.copy_(torch.randn_like(buf))
    return c


def _stacked(c):
    return torch.stack(c.keys), torch.stack(c.values)  # [L, B, H, S, D]


def _own_compaction_end(c, kept):
    """The next write start if every row moved its kept entries to its own next slots."""
    return max([*c.lengths, *(c.lengths[b] + len(nodes) for b, nodes in kept.items())])


@settings(deadline=None, max_examples=100)
@given(st.data())
def test_compaction_keeps_exactly_the_accepted_entries(data):
    """Over a run of steps, each row's valid slots hold, in order, its earlier entries and then
    the entries of its kept nodes in path order; a step never moves the write start past what
    moving every row's entries to its own next slots would, and no row skips more than the
    reserved gap slots."""
    B, S, gaps = 3, 60, data.draw(st.integers(0, 8))
    c = _cache(B=B, S=S, gaps=gaps)
    lengths = [data.draw(st.integers(0, 15)) for _ in range(B)]
    for b, n in enumerate(lengths):
        c.valid[b, :n] = True
    c.lengths = list(lengths)
    k0, v0 = _stacked(c)
    expected = [(k0[:, b, :, :n], v0[:, b, :, :n]) for b, n in enumerate(lengths)]
    for _ in range(data.draw(st.integers(1, 4))):
        W = c.write_start
        T = data.draw(st.integers(1, 6))
        for buf in (*c.keys, *c.values):  # this step's tree entries
            buf[:, :, W : W + T] = torch.randn_like(buf[:, :, W : W + T])
        before_k, before_v = _stacked(c)
        kept = {}
        for b in range(B):
            chain = data.draw(st.booleans())  # plain steps and accepted chains: the tree's first n
            n = data.draw(st.integers(0, T))
            kept[b] = list(range(n)) if chain else sorted(data.draw(st.sets(st.integers(0, T - 1), max_size=T)))
        bound = _own_compaction_end(c, kept)
        c.compact(W, kept)
        assert c.write_start <= bound
        for b, nodes in kept.items():
            idx = [W + node for node in nodes]
            expected[b] = (
                torch.cat([expected[b][0], before_k[:, b, :, idx]], dim=2),
                torch.cat([expected[b][1], before_v[:, b, :, idx]], dim=2),
            )
        after_k, after_v = _stacked(c)
        for b in range(B):
            slots = c.valid[b].nonzero().flatten()
            assert torch.equal(after_k[:, b, :, slots], expected[b][0])
            assert torch.equal(after_v[:, b, :, slots], expected[b][1])
            assert c.lengths[b] == (int(slots[-1]) + 1 if slots.numel() else 0)
            assert c.lengths[b] - slots.numel() == c.gaps[b] <= gaps


@settings(deadline=None, max_examples=100)
@given(st.data())
def test_retired_rows_leave_and_the_others_keep_their_entries(data):
    """After `retire`, the cache holds exactly the rows that were not retired, each with its own
    entries, validity, prune flags, length and gaps, as one contiguous batch."""
    B = data.draw(st.integers(1, 6))
    c = _cache(B=B, S=20, gaps=4)
    c.valid.copy_(torch.rand(c.valid.shape) < 0.5)
    c.keep.copy_(torch.rand(c.keep.shape) < 0.5)
    c.lengths = [data.draw(st.integers(0, 20)) for _ in range(B)]
    c.gaps = [data.draw(st.integers(0, 4)) for _ in range(B)]
    before = [(k.clone(), v.clone()) for k, v in zip(c.keys, c.values)], c.valid.clone(), c.keep.clone(), list(c.lengths), list(c.gaps)
    gone = data.draw(st.sets(st.integers(0, B - 1), max_size=B - 1))
    order = c.retire(sorted(gone))
    assert sorted(order) == [b for b in range(B) if b not in gone]
    (kv, valid, keep, lengths, gaps), left = before, B - len(gone)
    for (k, v), (k0, v0) in zip(zip(c.keys, c.values), kv):
        assert k.shape[0] == v.shape[0] == left and k.is_contiguous() and v.is_contiguous()
        assert torch.equal(k, k0[order]) and torch.equal(v, v0[order])
    assert torch.equal(c.valid, valid[order]) and torch.equal(c.keep, keep[order])
    assert c.lengths == [lengths[b] for b in order] and c.gaps == [gaps[b] for b in order]


def test_plain_steps_after_uneven_acceptance_copy_nothing():
    """Rows at different lengths each keep a plain step's token where it was written: no copy,
    and the rows line up at the same next write start."""
    c = _cache(B=3, S=40, gaps=3)
    for b, n in enumerate([10, 7, 9]):
        c.valid[b, :n] = True
    c.lengths = [10, 7, 9]
    before = [buf.clone() for buf in (*c.keys, *c.values)]
    c.compact(10, {0: [0], 1: [0], 2: [0]})
    assert c.lengths == [11, 11, 11]
    assert all(torch.equal(a, b) for a, b in zip(before, (*c.keys, *c.values)))
    assert c.valid[1].tolist()[:12] == [True] * 7 + [False] * 3 + [True] + [False]
    c.compact(11, {0: [0, 1], 1: [0], 2: [0]})
    assert c.lengths == [13, 12, 12] and c.gaps == [0, 3, 1]
    c.compact(13, {0: [0], 1: [0], 2: [0]})  # row 1 would skip 4 slots in all, one more than reserved
    assert c.lengths == [14, 13, 14] and c.gaps == [0, 3, 2]


def test_update_writes_at_the_end_of_the_masked_window_and_returns_it():
    c = _cache(B=1, L=1, H=1, S=10, D=2)
    mask = torch.ones(1, 1, 3, 7, dtype=torch.bool)  # W + T = 7, T = 3 -> slots 4..6
    c.begin_step(mask)
    k_new, v_new = torch.full((1, 1, 3, 2), 5.0), torch.full((1, 1, 3, 2), 6.0)
    k, v = c.update(k_new, v_new, 0)
    c.end_step()
    assert k.shape == (1, 1, 7, 2) and torch.equal(k[:, :, 4:], k_new) and torch.equal(v[:, :, 4:], v_new)
    assert torch.equal(c.keys[0][:, :, 4:7], k_new)


def test_prefill_marks_left_padding_invalid():
    c = _cache(B=2, S=10)
    c.commit_prefill(torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]))
    assert c.lengths == [4, 4]
    assert c.valid[:, :5].tolist() == [[False, False, True, True, False], [True, True, True, True, False]]
