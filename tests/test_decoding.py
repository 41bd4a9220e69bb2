"""Losslessness of tree decoding: token-identical to the model's own greedy `generate`."""
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models_tiny import ARCHS, EOS, PAD, VOCAB, hf_greedy, left_padded, tiny_model
from propd_compile.decoding import greedy_accept, tree_generate
from propd_compile.drafters import Drafter, NGramDrafter
from propd_compile.tree import TokenTree, TreeBatch

MODES = ("empty", "wrong", "right", "deep", "wide", "random", "mixed")


class AdversarialDrafter(Drafter):
    """Drafts built from the reference continuation: all right, all wrong, deep, wide, random."""

    def __init__(self, reference: list[list[int]], mode: str, seed: int) -> None:
        self.reference, self.mode, self.rng = reference, mode, random.Random(seed)

    def start(self, sequences):
        self.pos = [0] * len(sequences)  # how many reference tokens each row has emitted

    def advance(self, row, tokens):
        self.pos[row] += len(tokens)

    def propose(self, row, budget):
        ref = self.reference[row][self.pos[row] :]
        root = self.reference[row][self.pos[row] - 1]
        right = [t for t in ref][: budget - 1]
        wrong = [(t + 1) % VOCAB for t in right]
        rnd = lambda k: [self.rng.randrange(VOCAB) for _ in range(k)]  # noqa: E731
        mode = self.rng.choice(MODES[:-1]) if self.mode == "mixed" else self.mode
        if mode == "empty" or budget == 1:
            paths = []
        elif mode == "right":
            paths = [(right, 1.0)]
        elif mode == "wrong":
            paths = [(wrong, 1.0)]
        elif mode == "deep":  # a long chain, right for a while, then wrong
            k = self.rng.randrange(len(right) + 1)
            paths = [(right[:k] + wrong[k:] + rnd(budget), 1.0)]
        elif mode == "wide":  # many first-level siblings, the right one among them
            paths = [([t], 1.0) for t in self.rng.sample(range(VOCAB), min(budget - 1, VOCAB))] + [(right[:3], 0.5)]
        else:
            paths = [(rnd(self.rng.randrange(1, 6)), self.rng.random()) for _ in range(self.rng.randrange(1, 6))]
            paths += [(right[: self.rng.randrange(len(right) + 1)], self.rng.random())]
        return TokenTree.from_paths(root, [p for p in paths if p[0]], budget)


@st.composite
def prompts(draw):
    B = draw(st.integers(1, 4))
    lens = [draw(st.integers(1, 12)) for _ in range(B)]
    # tokens avoid EOS in the prompt; repeated patterns give the n-gram drafter something to find
    base = draw(st.lists(st.integers(6, VOCAB - 1), min_size=3, max_size=6))
    rows = [[base[(i * draw(st.integers(1, 2))) % len(base)] if draw(st.booleans()) else draw(st.integers(6, VOCAB - 1)) for i in range(n)] for n in lens]
    return rows


def _reference_rows(ref: torch.Tensor, P: int) -> list[list[int]]:
    out = []
    for row in ref.tolist():
        gen = row[P:]
        out.append(gen + [PAD] * 64)  # padding past the end: drafts beyond EOS are just wrong
    return out


@pytest.mark.parametrize("arch", ARCHS)
@settings(deadline=None, max_examples=15, suppress_health_check=[HealthCheck.too_slow])
@given(rows=prompts(), mode=st.sampled_from(MODES), budget=st.integers(1, 24), seed=st.integers(0, 3), new=st.integers(1, 24))
def test_tree_decoding_equals_hf_greedy(arch, rows, mode, budget, seed, new):
    model = tiny_model(arch, seed=seed)
    ids, mask = left_padded(rows)
    ref = hf_greedy(model, ids, mask, new)
    P = ids.shape[1]
    drafter = AdversarialDrafter(_reference_rows(ref, P), mode, seed)
    out, stats = tree_generate(
        model, ids, mask, max_new_tokens=new, eos_token_ids=[EOS], pad_token_id=PAD, drafter=drafter, max_tree_nodes=budget
    )
    assert torch.equal(out, ref), (out, ref)
    assert all(1 <= n <= budget for n in stats.tree_sizes)
    if mode == "right":  # every step accepts the whole chain plus the bonus token
        assert stats.steps <= -(-(new - 1) // budget)


@settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])
@given(rows=prompts(), budget=st.integers(1, 32), arch=st.sampled_from(ARCHS), new=st.integers(1, 40))
def test_ngram_drafter_is_lossless(rows, budget, arch, new):
    model = tiny_model(arch)
    ids, mask = left_padded(rows)
    ref = hf_greedy(model, ids, mask, new)
    out, _ = tree_generate(
        model, ids, mask, max_new_tokens=new, eos_token_ids=[EOS], pad_token_id=PAD,
        drafter=NGramDrafter(), max_tree_nodes=budget,
    )
    assert torch.equal(out, ref)


def test_greedy_accept_takes_the_longest_agreeing_path():
    #        0(root)
    #      /   |   \
    #   1:a   2:b   3:c
    #    |           |
    #   4:d         5:e
    tree = TokenTree((9, 10, 11, 12, 13, 14), (-1, 0, 0, 0, 1, 3), (1.0,) * 6)
    batch = TreeBatch.stack([tree, TokenTree.root_only(9)])
    pred = torch.zeros(2, 6, dtype=torch.long)
    pred[0, 0] = 12  # root -> c (node 3)
    pred[0, 3] = 14  # c -> e (node 5)
    pred[0, 5] = 40  # bonus after e
    pred[0, 1] = 13  # a -> d would match, but a itself is not accepted
    assert greedy_accept(batch, pred) == [[0, 3, 5], [0]]


def test_eos_stops_rows_independently():
    model = tiny_model("llama", seed=1)
    rows = [[7, 8, 9, 10], [11, 12]]
    ids, mask = left_padded(rows)
    ref = hf_greedy(model, ids, mask, 30)
    for eos in set(ref[:, ids.shape[1]:].flatten().tolist()) - {PAD}:  # force early stops
        ref = hf_greedy(model, ids, mask, 30, eos_token_id=eos)
        drafter = AdversarialDrafter(_reference_rows(ref, ids.shape[1]), "right", 0)
        out, _ = tree_generate(model, ids, mask, max_new_tokens=30, eos_token_ids=[eos], pad_token_id=PAD, drafter=drafter, max_tree_nodes=8)
        assert torch.equal(out, ref)


class RecordingDrafter(NGramDrafter):
    """n-gram drafts; records the hidden states and tapped features the loop hands each row."""

    needs_hidden = True
    feature_layers = (1,)

    def start(self, sequences):
        super().start(sequences)
        self.emitted = [0] * len(sequences)
        self.hidden = [[] for _ in sequences]  # (tokens emitted then, hidden state)
        self.features = [[] for _ in sequences]

    def advance(self, row, tokens):
        super().advance(row, tokens)
        self.emitted[row] += len(tokens)

    def set_hidden(self, rows, hidden):
        for b, h in zip(rows, hidden):
            self.hidden[b].append((self.emitted[b], h.clone()))

    def set_features(self, rows, features):
        for b, f in zip(rows, features):
            self.features[b].append(f.clone())


@settings(deadline=None, max_examples=15, suppress_health_check=[HealthCheck.too_slow])
@given(rows=prompts().filter(lambda r: len(r) > 1), new=st.integers(2, 20), stop_at=st.integers(0, 8), budget=st.integers(1, 8))
def test_each_row_gets_its_own_hidden_states_and_features_while_rows_finish(rows, new, stop_at, budget):
    """Rows that finish leave the cache and the others move into their places; every hand-off
    still gives row b the final hidden state at the token before its last emitted one and the
    tapped features of the positions it verified, in order: what the model computes on row b's
    own history."""
    model = tiny_model("llama", seed=3)
    ids, mask = left_padded(rows)
    free = hf_greedy(model, ids, mask, new)[0, ids.shape[1] :].tolist()
    eos = free[min(stop_at, len(free) - 1)]  # the first row stops there, the others go on
    drafter = RecordingDrafter()
    out, _ = tree_generate(model, ids, mask, max_new_tokens=new, eos_token_ids=[eos], pad_token_id=PAD, drafter=drafter, max_tree_nodes=budget)
    assert torch.equal(out, hf_greedy(model, ids, mask, new, eos_token_id=eos, pad_token_id=PAD))
    for b, prompt in enumerate(rows):
        answer = out[b, ids.shape[1] :].tolist()
        answer = answer[: answer.index(eos) + 1] if eos in answer else answer
        history = prompt + answer
        with torch.no_grad():
            ref = model.model(torch.tensor([history]), output_hidden_states=True)
        for emitted, h in drafter.hidden[b]:
            torch.testing.assert_close(h, ref.last_hidden_state[0, len(prompt) + emitted - 2], atol=1e-4, rtol=1e-4)
        if len(answer) == 1:  # finished at its first token: nothing more to draft
            continue
        got = torch.cat(drafter.features[b])
        assert len(prompt) <= got.shape[0] < len(history)
        torch.testing.assert_close(got, ref.hidden_states[1][0, : got.shape[0]], atol=1e-4, rtol=1e-4)
