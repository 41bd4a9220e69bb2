"""Per-node logits processing: every tree node gets exactly the scores HF's processors give its
history, so greedy decoding with HF's history-dependent options stays token-identical to HF's
greedy `generate` and sampling with them keeps HF's distribution."""
import random
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
)
from transformers.generation.logits_process import (
    EncoderRepetitionPenaltyLogitsProcessor,
    ExponentialDecayLengthPenalty,
    ForcedEOSTokenLogitsProcessor,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    SequenceBiasLogitsProcessor,
    SuppressTokensAtBeginLogitsProcessor,
    SuppressTokensLogitsProcessor,
)

from models_tiny import EOS, PAD, VOCAB, hf_greedy, left_padded, tiny_model
from propd_compile import ProPDConfig, accelerate, api
from propd_compile.decoding import tree_generate
from propd_compile.processing import NodeProcessing
from propd_compile.sampling import sampling_rule
from propd_compile.tree import TokenTree, TreeBatch
from test_decoding import MODES, AdversarialDrafter, _reference_rows, prompts
from test_sampling import PROMPT, V, TableDrafter, _chi_square_p_value, _peaky_model


class EveryOtherBan(LogitsProcessor):
    """A user processor that reads the history: bans the token two positions back (generic path)."""

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] >= 2:
            scores = scores.clone()
            scores[torch.arange(len(scores)), input_ids[:, -2]] = -float("inf")
        return scores


# --- the processing itself, exactly -----------------------------------------------------------
@st.composite
def tree_steps(draw):
    """Padded prompts, then 1-3 decode steps: the tokens each row emitted before the step, and a
    random tree per row rooted at its last history token."""
    B = draw(st.integers(1, 3))
    small = st.integers(6, 13)  # few distinct tokens: repeats, n-gram matches and bias hits happen
    prompt, _ = left_padded([draw(st.lists(small, min_size=1, max_size=7)) for _ in range(B)])
    generated: list[list[int]] = [[] for _ in range(B)]
    steps = []
    for _ in range(draw(st.integers(1, 3))):
        for g in generated:
            g += draw(st.lists(small, max_size=5))
        trees = []
        for b in range(B):
            root = generated[b][-1] if generated[b] else int(prompt[b, -1])
            paths = draw(st.lists(st.tuples(st.lists(small, min_size=1, max_size=4), st.floats(0.1, 1.0)), max_size=6))
            trees.append(TokenTree.from_paths(root, paths, budget=draw(st.integers(1, 12))))
        steps.append(([list(g) for g in generated], TreeBatch.stack(trees, pad_token=PAD)))
    return prompt, steps


def _draw_params(kind: str, data, P: int) -> dict:
    """Drawn parameters of a processor of `kind` for prompts of P (padded) tokens."""
    small = st.integers(6, 13)
    seqs = st.lists(st.lists(small, min_size=1, max_size=3), min_size=1, max_size=6, unique_by=tuple)
    return {
        "repetition": lambda: dict(penalty=data.draw(st.floats(0.5, 3.0)),
                                   ignore=data.draw(st.one_of(st.sampled_from(["none", "padding"]), st.integers(max(P - 2, 0), P + 8)))),
        "encoder_repetition": lambda: dict(penalty=data.draw(st.floats(0.5, 3.0))),
        "ngram": lambda: dict(n=data.draw(st.integers(1, 4))),
        "min_length": lambda: dict(length=data.draw(st.integers(0, P + 12))),
        "min_new": lambda: dict(length=data.draw(st.integers(0, 12))),
        "forced_eos": lambda: dict(length=data.draw(st.integers(P, P + 12))),
        "begin_suppress": lambda: dict(tokens=data.draw(st.lists(small, min_size=1))),
        "suppress": lambda: dict(tokens=data.draw(st.lists(small, min_size=1))),
        "bad_words": lambda: dict(words=data.draw(seqs)),
        "sequence_bias": lambda: dict(bias=[[w, data.draw(st.floats(-4, 4))] for w in data.draw(seqs)]),
        "decay": lambda: dict(start=data.draw(st.integers(0, 8)), factor=data.draw(st.floats(1.0, 2.0))),
        "warpers": lambda: {},
        "user": lambda: {},
    }[kind]()


def _build(kind: str, q: dict, prompt: torch.Tensor, rows: list[int]) -> list:
    """The processors of `kind` with parameters `q`, for the prompt rows `rows` (processors that
    hold per-row state, like the padding lengths of the repetition penalty, are built per row)."""
    P = prompt.shape[1]
    eos = torch.tensor([EOS, 7])
    if kind == "repetition":
        ignore = {"none": None, "padding": (prompt[rows] == PAD).sum(1)}.get(q["ignore"], q["ignore"])
        return [RepetitionPenaltyLogitsProcessor(q["penalty"], prompt_ignore_length=ignore)]
    return {
        "encoder_repetition": lambda: [EncoderRepetitionPenaltyLogitsProcessor(q["penalty"], prompt[rows])],
        "ngram": lambda: [NoRepeatNGramLogitsProcessor(q["n"])],
        "min_length": lambda: [MinLengthLogitsProcessor(q["length"], eos)],
        "min_new": lambda: [MinNewTokensLengthLogitsProcessor(P, q["length"], eos)],
        "forced_eos": lambda: [ForcedEOSTokenLogitsProcessor(q["length"], eos)],
        "begin_suppress": lambda: [SuppressTokensAtBeginLogitsProcessor(q["tokens"], P)],
        "suppress": lambda: [SuppressTokensLogitsProcessor(q["tokens"])],
        "bad_words": lambda: [NoBadWordsLogitsProcessor(q["words"], eos)],
        "sequence_bias": lambda: [SequenceBiasLogitsProcessor(q["bias"])],
        "decay": lambda: [ExponentialDecayLengthPenalty((q["start"], q["factor"]), eos, P)],
        "warpers": lambda: [TemperatureLogitsWarper(0.7), TopKLogitsWarper(5)],
        "user": lambda: [EveryOtherBan()],
    }[kind]()


KINDS = ("repetition", "encoder_repetition", "ngram", "min_length", "min_new", "forced_eos", "begin_suppress",
         "suppress", "bad_words", "sequence_bias", "decay", "warpers", "user")


@settings(deadline=None, max_examples=80, suppress_health_check=[HealthCheck.too_slow])
@given(case=tree_steps(), kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=4), data=st.data())
def test_node_scores_are_hf_processors_on_each_nodes_history(case, kinds, data):
    """Bit for bit: each node's processed scores equal HF's processor list called on that node's
    history alone (a 1-row batch), whatever the trees, the histories and the processors, step
    after step (the processing keeps per-row state between steps)."""
    prompt, steps = case
    params = [_draw_params(kind, data, prompt.shape[1]) for kind in kinds]

    def build(rows):
        return LogitsProcessorList(p for kind, q in zip(kinds, params) for p in _build(kind, q, prompt, rows))

    processing = NodeProcessing(build(list(range(prompt.shape[0]))), prompt)
    for generated, batch in steps:
        B, T = batch.tokens.shape
        logits = torch.randn(B, T, VOCAB, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 2**16))))
        got = processing(batch, logits, generated)
        for b in range(B):
            row_procs = build([b])
            history = prompt[b].tolist() + generated[b]
            tree_tokens, parents = batch.tokens[b].tolist(), batch.parents[b].tolist()
            for i in range(T):
                if not batch.valid[b, i]:
                    continue
                path, node = [], i
                while parents[node] >= 0:
                    path.append(tree_tokens[node])
                    node = parents[node]
                want = row_procs(torch.tensor([history + path[::-1]]), logits[b, i][None].clone())[0]
                assert torch.equal(got[b, i], want), (kinds, params, b, i, (got[b, i] != want).nonzero())


def test_processing_refuses_a_tree_not_rooted_at_the_last_token():
    prompt = torch.tensor([[7, 8, 9]])
    rule = NodeProcessing(LogitsProcessorList(), prompt).wrap(lambda batch, scores: ([[0]], [0]), [[10]])
    with pytest.raises(RuntimeError, match="not rooted"):
        rule(TreeBatch.stack([TokenTree.root_only(9)]), torch.zeros(1, 1, VOCAB))
