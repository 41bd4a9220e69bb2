"""Sampling on the token tree: the exact rule draws exactly the model's sampling distribution
(checked analytically on synthetic distributions and by chi-square tests against enumerated
joint distributions of a tiny model), typical acceptance does what its rule says, and sampling
decodes batches with EOS and stopping criteria like greedy does."""
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import (
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from models_tiny import EOS, PAD, hf_greedy, left_padded, q4_1_weights, tiny_model
from propd_compile import ProPDConfig, accelerate
from propd_compile.decoding import tree_generate
from propd_compile.drafters import Drafter
from propd_compile.processing import NodeProcessing
from propd_compile.sampling import sampling_rule, sibling_acceptance, typical_threshold, typical_tree_accept
from propd_compile.tree import TokenTree, TreeBatch

V = 16
PROMPT = [7, 8, 9, 10, 7, 8]
WARPERS = {
    "t1": [],
    "t0.7": [TemperatureLogitsWarper(0.7)],
    "top_k": [TopKLogitsWarper(4)],
    "top_p": [TemperatureLogitsWarper(0.7), TopPLogitsWarper(0.8)],
}
HF_KWARGS = {"t1": {}, "t0.7": dict(temperature=0.7), "top_k": dict(top_k=4), "top_p": dict(temperature=0.7, top_p=0.8)}


# --- the acceptance function, exactly ------------------------------------------------------
def _exact_output(p: torch.Tensor, cand: list[int]) -> torch.Tensor:
    """P(token leaving the node) by enumerating the rejection chain: no sampling."""
    a, residual = sibling_acceptance(p, torch.tensor(cand), torch.ones(len(cand), dtype=torch.bool))
    out = torch.zeros_like(p)
    reach = torch.tensor(1.0, dtype=p.dtype)  # P(every earlier candidate was rejected)
    for k, x in enumerate(cand):
        out[x] += reach * a[k]
        reach = reach * (1 - a[k])
    if residual.sum() > 0:
        out += reach * residual / residual.sum()
    return out


@settings(deadline=None, max_examples=300)
@given(
    weights=st.lists(st.one_of(st.just(0.0), st.floats(1e-3, 1.0)), min_size=2, max_size=12).filter(lambda w: sum(w) > 0),
    data=st.data(),
)
def test_sibling_acceptance_draws_exactly_p(weights, data):
    p = torch.tensor(weights, dtype=torch.float64)
    p = p / p.sum()
    cand = data.draw(st.lists(st.integers(0, len(weights) - 1), unique=True, max_size=len(weights)))
    assert torch.allclose(_exact_output(p, cand), p, atol=1e-12)


def test_a_candidate_with_all_remaining_mass_is_always_accepted():
    p = torch.tensor([0.0, 0.25, 0.0, 0.75])
    a, residual = sibling_acceptance(p, torch.tensor([1, 3, 0]), torch.tensor([True, True, False]))
    assert a[1] == 1.0 and a[2] == 0.0 and residual.sum() == 0


# --- typical acceptance ---------------------------------------------------------------------
def test_typical_acceptance_accepts_what_its_rule_defines():
    #      0 (root)
    #    /    |    \
    #  1:a   2:b   3:c
    #   |     |
    #  4:d   5:e
    a, b, c, d, e = 1, 2, 3, 4, 5
    tree = TokenTree((7, a, b, c, d, e), (-1, 0, 0, 0, 1, 2), (1.0,) * 6)
    probs = torch.full((1, 6, 32), 1e-9)
    probs[0, 0, [a, b, c]] = torch.tensor([0.05, 0.5, 0.45])  # entropy ~0.9: bar = min(0.09, 0.3 e^-0.9) = 0.09
    probs[0, 1, d] = 1.0
    probs[0, 2, e] = 0.06  # flat after b (entropy ~3.2): bar = 0.3 * exp(-entropy) ~ 0.012
    probs[0, 2, 8:] = 0.94 / 24
    probs = probs / probs.sum(-1, keepdim=True)
    bar = typical_threshold(probs, 0.09, 0.3)[0]
    entropy = -(probs[0] * probs[0].log()).sum(-1)
    assert torch.allclose(bar, torch.clamp(0.3 * torch.exp(-entropy), max=0.09))
    assert bar[0] == 0.09 and probs[0, 2, e] > bar[2] and probs[0, 2, e] < 0.09
    # a fails (0.05 < 0.09) although d after it is certain; b and e pass; c passes but is shallower
    paths, bonus = typical_tree_accept(TreeBatch.stack([tree]), probs, 0.09, 0.3)
    assert paths == [[0, 2, 5]] and probs[0, 5, bonus[0]] > 1e-3
    # a larger alpha lifts the bar after b above p(e): b and c remain, b first in tree order
    paths, _ = typical_tree_accept(TreeBatch.stack([tree]), probs, 0.09, 0.3 * float(probs[0, 2, e] / bar[2]) * 1.1)
    assert paths == [[0, 2]]


def test_greedy_ignores_the_acceptance_fields():
    model = tiny_model("llama", seed=3)
    ids, mask = left_padded([[7, 8, 9, 7, 8, 9, 7], [10, 11, 12]])
    ref = hf_greedy(model, ids, mask, 16)
    accelerate(model, ProPDConfig(acceptance="typical", posterior_threshold=0.5, posterior_alpha=0.9))
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=16), ref)
    with pytest.raises(ValueError, match="acceptance"):
        ProPDConfig(acceptance="lossy")


# --- the decode loop's output distribution ----------------------------------------------------
def _peaky_model(seed: int = 0) -> torch.nn.Module:
    """A tiny model with confident (entropy ~1-2 nats) next-token distributions, so that drafts
    are accepted often and deep."""
    model = tiny_model("llama", seed=seed, vocab=V)
    model.lm_head.weight.data *= 25
    return model


@torch.no_grad()
def _exact_joint(model, warpers: list, eos: int | None = None) -> torch.Tensor:
    """P(first three sampled tokens = (a, b, c)) [V, V, V] by enumeration: p(a) p(b|a) p(c|a,b),
    each processed on its exact history. A row that emits `eos` stops: its later tokens are PAD."""
    seqs = torch.tensor([PROMPT + [a, b] for a in range(V) for b in range(V)])
    logits = model(seqs).logits[:, -3:].float()
    procs = LogitsProcessorList(warpers)
    p = [torch.softmax(procs(seqs[:, : len(PROMPT) + i], logits[:, i]), -1) for i in range(3)]
    p1, p2, p3 = p[0][0], p[1].view(V, V, V)[:, 0], p[2].view(V, V, V)
    joint = p1[:, None, None] * p2[:, :, None] * p3
    if eos is not None:
        joint[:, eos] = 0
        joint[:, eos, PAD] = p1 * p2[:, eos]
        joint[eos] = 0
        joint[eos, PAD, PAD] = p1[eos]
    return joint


def _chi_square_p_value(samples: torch.Tensor, joint: torch.Tensor) -> float:
    """Pearson's test of sampled token triples [N, <= 3] (short when every row stopped early)
    against `joint`; cells expecting fewer than 5 draws are pooled into one."""
    n = samples.shape[0]
    samples = torch.cat([samples, torch.full((n, 3 - samples.shape[1]), PAD, dtype=samples.dtype)], 1)
    counts = torch.bincount(samples[:, 0] * V * V + samples[:, 1] * V + samples[:, 2], minlength=V**3).double()
    expected = joint.flatten().double() * n
    small = expected < 5
    assert counts[expected == 0].sum() == 0, "sampled a sequence of probability zero"
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


class TableDrafter(Drafter):
    """Drafts from the exact next-token tables: the likeliest tokens ("right"), the unlikeliest
    ("wrong"), two levels of the top tokens ("top_tree") or random wide trees ("random")."""

    def __init__(self, model, mode: str, seed: int = 0) -> None:
        seqs = torch.tensor([PROMPT + [a, b] for a in range(V) for b in range(V)])
        with torch.no_grad():
            logits = model(seqs).logits
        self.after1 = logits[::V, -2].argsort(-1, descending=True).tolist()  # [a] -> tokens by p(.|a)
        self.after2 = logits[:, -1].argsort(-1, descending=True).view(V, V, V).tolist()  # [a][b] -> ...
        self.mode, self.rng = mode, random.Random(seed)

    def start(self, sequences):
        self.gen = [[] for _ in sequences]

    def advance(self, row, tokens):
        self.gen[row] += tokens

    def _ranked(self, history: list[int]) -> list[int]:
        return self.after1[history[0]] if len(history) == 1 else self.after2[history[0]][history[1]]

    def propose(self, row, budget):
        h = self.gen[row]
        if len(h) > 2:
            return TokenTree.root_only(h[-1])
        first = self._ranked(h)
        if self.mode == "right":
            paths = [([first[0]] + ([self._ranked(h + [first[0]])[0]] if len(h) == 1 else []), 1.0)]
        elif self.mode == "wrong":
            paths = [([t], 1.0) for t in first[-3:]]
        elif self.mode == "top_tree":
            paths = [([t], 1.0) for t in first[:3]]
            if len(h) == 1:
                paths += [([t, u], 0.5) for t in first[:3] for u in self._ranked(h + [t])[:3]]
        else:
            paths = [([t], self.rng.random()) for t in self.rng.sample(range(V), self.rng.randrange(1, 8))]
            paths += [([t, self.rng.randrange(V)], self.rng.random()) for t in self.rng.sample(range(V), 4)]
        return TokenTree.from_paths(h[-1], paths, budget)


@pytest.mark.parametrize(
    "mode,warp", [("right", "t1"), ("wrong", "t1"), ("top_tree", "t0.7"), ("random", "top_k"), ("top_tree", "top_p")]
)
def test_tree_sampling_draws_the_models_joint_distribution(mode, warp):
    model = _peaky_model()
    n = 4000
    ids = torch.tensor([PROMPT] * n)
    out, stats = tree_generate(
        model, ids, torch.ones_like(ids), max_new_tokens=3, eos_token_ids=[], pad_token_id=PAD,
        drafter=TableDrafter(model, mode), max_tree_nodes=16, accept=sampling_rule(torch.Generator().manual_seed(1)),
        process=NodeProcessing(LogitsProcessorList(WARPERS[warp]), ids),
    )
    assert _chi_square_p_value(out[:, len(PROMPT):], _exact_joint(model, WARPERS[warp])) > 1e-3
    if mode in ("right", "top_tree"):  # drafts are accepted: fewer steps than tokens
        assert stats.mean_accepted > 1.3


def test_typical_acceptance_is_lossy():
    """The same check rejects typical acceptance, which over-accepts likely drafts: the tests
    above can see a wrong distribution."""
    model = _peaky_model()
    ids = torch.tensor([PROMPT] * 4000)
    rule = sampling_rule(torch.Generator().manual_seed(1), acceptance="typical")
    out, stats = tree_generate(
        model, ids, torch.ones_like(ids), max_new_tokens=3, eos_token_ids=[], pad_token_id=PAD,
        drafter=TableDrafter(model, "top_tree"), max_tree_nodes=16, accept=rule,
    )
    assert _chi_square_p_value(out[:, len(PROMPT):], _exact_joint(model, [])) < 1e-6


@pytest.mark.parametrize("warp", ["t1", "t0.7"])
@pytest.mark.parametrize("tree", ["fixed", "dynamic"])
def test_generate_samples_exactly_with_the_ngram_drafter_and_eos(warp, tree):
    model = _peaky_model(seed=5)
    accelerate(model, ProPDConfig(max_tree_nodes=8, tree=tree))
    n = 4000
    ids = torch.tensor([PROMPT] * n)
    torch.manual_seed(3)
    out = model.generate(ids, max_new_tokens=3, do_sample=True, eos_token_id=EOS, pad_token_id=PAD, **HF_KWARGS[warp])
    joint = _exact_joint(model, WARPERS[warp], eos=EOS)
    assert joint[:, :, EOS].sum() + joint[:, EOS].sum() + joint[EOS].sum() > 0.1  # EOS matters here
    if tree == "fixed":  # (the dynamic tree mostly picks plain steps for 4000 rows at once)
        assert model.propd.stats.mean_tree_nodes > 2  # the prompt repeats: the drafter proposes trees
    assert _chi_square_p_value(out[:, len(PROMPT):], joint) > 1e-3


# --- the decode loop's behaviour -------------------------------------------------------------
def test_sampling_is_reproducible_and_handles_eos_and_stopping_in_batches():
    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            return torch.tensor([input_ids.shape[1] >= 13] * input_ids.shape[0])

    model = _peaky_model(seed=4)
    accelerate(model, ProPDConfig(tree="fixed"))  # dynamic tree shapes follow measured times: not reproducible
    ids, mask = left_padded([[7, 8, 9, 7, 8, 9, 7], [10, 11, 12], [13], [6, 6, 6, 6]] * 8)
    P = ids.shape[1]
    kw = dict(attention_mask=mask, max_new_tokens=24, do_sample=True, temperature=0.8, eos_token_id=EOS)
    outs = [model.generate(ids, generator=torch.Generator().manual_seed(7), **kw) for _ in range(2)]
    assert torch.equal(outs[0], outs[1])
    gen = outs[0][:, P:]
    ends = [row.index(EOS) if EOS in row else None for row in gen.tolist()]
    assert any(e is not None for e in ends) and any(e is None for e in ends)
    for row, end in zip(gen.tolist(), ends):
        if end is not None:  # nothing after the first EOS but padding
            assert all(t == PAD for t in row[end + 1 :])
    stopped = model.generate(ids, stopping_criteria=StoppingCriteriaList([StopAfter()]), **kw)
    assert stopped.shape[1] <= 13


@pytest.mark.parametrize("compile", [False, True])
def test_sampling_from_a_point_mass_is_greedy(compile):
    """top_k=1 leaves one token of probability 1: sampling must then reproduce greedy exactly,
    whatever the drafts, on the eager and the compiled forward (the session's compiled tiny
    Llama: its package is built once)."""
    model = q4_1_weights(tiny_model("llama", seed=1))
    ids, mask = left_padded([[7, 8, 9, 7, 8, 9, 7], [10, 11, 12], [13]])
    ref = hf_greedy(model, ids, mask, 20)
    accelerate(model, ProPDConfig(compile=compile, max_tree_nodes=8))
    for acceptance in ("exact", "typical"):
        model.propd.config = model.propd.config.with_(acceptance=acceptance)
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=True, top_k=1), ref)
