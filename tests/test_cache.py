import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from propd_compile.cache import TreeKVCache


def _cache(B=3, L=2, H=2, S=40, D=4):
    c = TreeKVCache(L, B, H, D, S, torch.float32, "cpu")
    for buf in (*c.keys, *c.values):
        buf.copy_(torch.randn_like(buf))
    return c


def _stacked(c):
    return torch.stack(c.keys), torch.stack(c.values)  # [L, B, H, S, D]


@settings(deadline=None, max_examples=100)
@given(st.data())
def test_compaction_keeps_exactly_the_accepted_entries(data):
    c = _cache()
    B, S = 3, 40
    lengths = [data.draw(st.integers(0, 15)) for _ in range(B)]
    for b, n in enumerate(lengths):
        c.valid[b, :n] = True
    c.lengths = list(lengths)
    W = c.write_start
    T = data.draw(st.integers(1, 10))
    before_k, before_v = _stacked(c)
    before_valid = c.valid.clone()
    kept = {}
    for b in range(B):
        nodes = sorted(data.draw(st.sets(st.integers(0, T - 1), max_size=T)))
        kept[b] = nodes
    c.compact(W, kept)
    after_k, after_v = _stacked(c)
    for b in range(B):
        n0, nodes = lengths[b], kept[b]
        # accepted tree entries moved to [n0, n0 + len): same values, in path order
        for j, node in enumerate(nodes):
            assert torch.equal(after_k[:, b, :, n0 + j], before_k[:, b, :, W + node])
            assert torch.equal(after_v[:, b, :, n0 + j], before_v[:, b, :, W + node])
        # the row's earlier entries are untouched
        assert torch.equal(after_k[:, b, :, :n0], before_k[:, b, :, :n0])
        assert c.lengths[b] == n0 + len(nodes)
        assert c.valid[b].tolist() == [True] * (n0 + len(nodes)) + [False] * (S - n0 - len(nodes))
    assert before_valid.sum() <= c.valid.sum()


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
