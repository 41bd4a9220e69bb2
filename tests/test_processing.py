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
from test_sampling import PROMPT, TableDrafter, _chi_square_p_value, _exact_joint, _peaky_model


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


# --- generate with HF's options: token-identical to HF greedy -----------------------------------
def _ngrams(rows: list[list[int]], n_max: int = 3) -> list[list[int]]:
    return sorted({tuple(r[i : i + n]) for r in rows for n in range(1, n_max + 1) for i in range(len(r) - n + 1)})


def _option(name: str, data, out: list[list[int]], P: int, new: int) -> dict:
    """Drawn values of generate option `name`; tokens come from HF's plain greedy output `out`,
    so that bans, biases and EOS choices bite."""
    seen = st.sampled_from(sorted({t for r in out for t in r}))
    grams = st.sampled_from([list(g) for g in _ngrams(out)])
    draw = data.draw
    return {
        "min_new_tokens": lambda: dict(min_new_tokens=draw(st.integers(1, new)), eos_token_id=draw(seen)),
        "min_length": lambda: dict(min_length=draw(st.integers(1, P + new)), eos_token_id=draw(seen)),
        "bad_words_ids": lambda: dict(bad_words_ids=draw(st.lists(grams, min_size=1, max_size=4))),
        "sequence_bias": lambda: dict(sequence_bias=[[g, draw(st.floats(-3, 3))] for g in
                                                     draw(st.lists(grams, min_size=1, max_size=4, unique_by=tuple))]),
        "suppress_tokens": lambda: dict(suppress_tokens=draw(st.lists(seen, min_size=1, max_size=4))),
        "begin_suppress_tokens": lambda: dict(begin_suppress_tokens=draw(st.lists(seen, min_size=1, max_size=4))),
        "forced_eos_token_id": lambda: dict(forced_eos_token_id=draw(seen)),
        "no_repeat_ngram_size": lambda: dict(no_repeat_ngram_size=draw(st.integers(1, 4))),
        "repetition_penalty": lambda: dict(repetition_penalty=draw(st.floats(0.3, 3.0))),
        "encoder_repetition_penalty": lambda: dict(encoder_repetition_penalty=draw(st.floats(0.3, 3.0))),
        "exponential_decay_length_penalty": lambda: dict(
            exponential_decay_length_penalty=(draw(st.integers(0, new)), draw(st.floats(1.0, 3.0))), eos_token_id=draw(seen)),
        "logits_processor": lambda: dict(logits_processor=LogitsProcessorList([EveryOtherBan()])),
        "combined": lambda: dict(repetition_penalty=draw(st.floats(1.05, 2.0)), no_repeat_ngram_size=draw(st.integers(2, 4)),
                                 min_new_tokens=draw(st.integers(1, new)), eos_token_id=draw(seen)),
    }[name]()


OPTIONS = ("min_new_tokens", "min_length", "bad_words_ids", "sequence_bias", "suppress_tokens", "begin_suppress_tokens",
           "forced_eos_token_id", "no_repeat_ngram_size", "repetition_penalty", "encoder_repetition_penalty",
           "exponential_decay_length_penalty", "logits_processor", "combined")


def _propd(model, ids, mask, new, kwargs, drafter, budget):
    """propd's generate with `drafter` (the API builds the drafter; here it is the test's)."""
    accelerate(model, ProPDConfig(tree="fixed", max_tree_nodes=budget))
    with mock.patch.object(api, "build_drafter", lambda *a, **k: drafter):
        return model.generate(ids, attention_mask=mask, max_new_tokens=new, **kwargs)


@pytest.mark.parametrize("name", OPTIONS)
@settings(deadline=None, max_examples=10, suppress_health_check=[HealthCheck.too_slow])
@given(rows=prompts(), mode=st.sampled_from(MODES), budget=st.integers(1, 16), seed=st.integers(0, 3),
       new=st.integers(1, 20), arch=st.sampled_from(("llama", "qwen2", "gpt2")), data=st.data())
def test_generate_with_the_option_equals_hf_greedy(name, rows, mode, budget, seed, new, arch, data):
    """propd greedy == HF greedy token for token with the option drawn, batch 1-4 with padding;
    drafts follow HF's own output (right, wrong, deep, wide, random), so per-node processing is
    exercised deep in the tree: a wrong score anywhere on an accepted path changes the output."""
    model = tiny_model(arch, seed=seed)
    ids, mask = left_padded(rows)
    P = ids.shape[1]
    plain = hf_greedy(model, ids, mask, new)
    kwargs = _option(name, data, [r[P:] for r in plain.tolist()], P, new)
    ref = hf_greedy(model, ids, mask, new, **kwargs)
    drafter = AdversarialDrafter(_reference_rows(ref, P), mode, seed)
    assert torch.equal(_propd(model, ids, mask, new, kwargs, drafter, budget), ref)


def test_every_option_changes_hf_greedy_here():
    """The equality test above can see each option: with these values each one changes HF's
    greedy output on these prompts."""
    model = tiny_model("llama", seed=1)
    ids, mask = left_padded([[7, 8, 9, 7, 8], [10, 11], [12, 13, 14], [6]])
    P, new = ids.shape[1], 16
    plain = hf_greedy(model, ids, mask, new)
    out = [r[P:] for r in plain.tolist()]
    first = out[0][0]
    changes = {
        "min_new_tokens": dict(min_new_tokens=new, eos_token_id=first),
        "min_length": dict(min_length=P + new, eos_token_id=first),
        "bad_words_ids": dict(bad_words_ids=[[first], out[1][:2]]),
        "sequence_bias": dict(sequence_bias=[[[first], -3.0], [out[1][:2], -3.0]]),
        "suppress_tokens": dict(suppress_tokens=[first]),
        "begin_suppress_tokens": dict(begin_suppress_tokens=[first]),
        "forced_eos_token_id": dict(forced_eos_token_id=EOS + 1),
        "no_repeat_ngram_size": dict(no_repeat_ngram_size=1),
        "repetition_penalty": dict(repetition_penalty=3.0),
        "encoder_repetition_penalty": dict(encoder_repetition_penalty=3.0),
        "exponential_decay_length_penalty": dict(exponential_decay_length_penalty=(0, 3.0), eos_token_id=out[2][3]),
        "logits_processor": dict(logits_processor=LogitsProcessorList([EveryOtherBan()])),
    }
    assert set(changes) | {"combined"} == set(OPTIONS)
    for name, kwargs in changes.items():
        assert not torch.equal(hf_greedy(model, ids, mask, new, **kwargs), plain), name


# --- sampling with history-dependent processors: HF's distribution ------------------------------
def test_tree_sampling_with_repetition_penalty_draws_hfs_joint_distribution():
    """Deep accepted trees (drafts from the exact tables), repetition penalty and temperature:
    the sampled triples follow the joint distribution of HF's sampling, each token processed on
    its exact history (chi-square against enumeration)."""
    model = _peaky_model()
    warpers = [RepetitionPenaltyLogitsProcessor(1.5), TemperatureLogitsWarper(0.8)]
    ids = torch.tensor([PROMPT] * 4000)
    out, stats = tree_generate(
        model, ids, torch.ones_like(ids), max_new_tokens=3, eos_token_ids=[], pad_token_id=PAD,
        drafter=TableDrafter(model, "top_tree"), max_tree_nodes=16,
        accept=sampling_rule(torch.Generator().manual_seed(1)), process=NodeProcessing(LogitsProcessorList(warpers), ids),
    )
    assert stats.mean_accepted > 1.3  # drafts were accepted: nodes below the root were sampled from
    joint = _exact_joint(model, warpers)
    assert _chi_square_p_value(out[:, len(PROMPT):], joint) > 1e-3
    # the same test sees the penalty: without it the distribution differs
    assert _chi_square_p_value(out[:, len(PROMPT):], _exact_joint(model, warpers[1:])) < 1e-6


def test_generate_samples_hfs_distribution_with_repetition_penalty_and_num_return_sequences():
    """Through `generate`: one prompt, num_return_sequences=4000, repetition_penalty and the
    n-gram drafter on a repetitive prompt, EOS on: HF's sampling distribution."""
    model = _peaky_model(seed=5)
    accelerate(model, ProPDConfig(max_tree_nodes=8, tree="fixed"))
    torch.manual_seed(3)
    out = model.generate(torch.tensor([PROMPT]), max_new_tokens=3, do_sample=True, num_return_sequences=4000,
                         repetition_penalty=1.6, eos_token_id=EOS, pad_token_id=PAD)
    assert out.shape[0] == 4000 and model.propd.stats.mean_tree_nodes > 2
    joint = _exact_joint(model, [RepetitionPenaltyLogitsProcessor(1.6)], eos=EOS)
    assert _chi_square_p_value(out[:, len(PROMPT):], joint) > 1e-3


# --- output_scores / output_logits --------------------------------------------------------------
def _assert_scores_match(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to the rounding of the forward (tree verification vs HF's incremental steps):
    the same -inf entries, the finite ones within 1e-4."""
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    assert torch.allclose(got[finite], want[finite], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kwargs", [{}, dict(repetition_penalty=1.7, no_repeat_ngram_size=2, bad_words_ids=[[9]])])
def test_greedy_output_scores_and_logits_are_hfs(kwargs):
    """return_dict_in_generate with output_scores / output_logits: per generated position the
    scores (processed) and logits (raw) HF returns, for every emitted token; after a row's end
    (HF keeps scoring padding there) the entries are -inf but 0 at the padding token."""
    model = tiny_model("llama", seed=2)
    ids, mask = left_padded([[7, 8, 9, 7, 8, 9, 7], [10, 11, 12], [13]])
    P, new = ids.shape[1], 20
    plain = [r[P:] for r in hf_greedy(model, ids, mask, new, **kwargs).tolist()]
    eos = plain[1][5]  # row 1 stops after 6 tokens (others maybe earlier or later)
    opts = dict(return_dict_in_generate=True, output_scores=True, output_logits=True, eos_token_id=eos, **kwargs)
    ref = hf_greedy(model, ids, mask, new, **opts)
    accelerate(model, ProPDConfig(tree="fixed", max_tree_nodes=8))
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, **opts)
    assert torch.equal(out.sequences, ref.sequences)
    assert len(out.scores) == len(ref.scores) == len(out.logits) == out.sequences.shape[1] - P
    ends = [row.index(eos) + 1 if eos in row else len(row) for row in out.sequences[:, P:].tolist()]
    assert min(ends) < len(out.scores)  # some row stopped early
    for k in range(len(out.scores)):
        for b, end in enumerate(ends):
            if k < end:
                _assert_scores_match(out.scores[k][b], ref.scores[k][b])
                _assert_scores_match(out.logits[k][b], ref.logits[k][b])
            else:
                pad = model.generation_config.pad_token_id
                assert out.scores[k][b, pad] == 0 and torch.isinf(out.scores[k][b]).sum() == VOCAB - 1
    if kwargs:
        assert any(torch.isinf(s).any() for s in out.scores[:1])  # the processed scores, not the logits


def test_sampled_output_scores_are_the_warped_scores_of_the_emitted_tokens():
    """Sampling: each position's scores are HF's processors and warpers on that token's history
    (recomputed here by teacher forcing), and the emitted token has a finite score."""
    model = tiny_model("qwen2", seed=1)
    ids, mask = left_padded([[7, 8, 9, 7, 8, 9, 7], [10, 11, 12]])
    P = ids.shape[1]
    accelerate(model, ProPDConfig(tree="fixed", max_tree_nodes=8))
    torch.manual_seed(0)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True, temperature=0.7, top_k=8,
                         repetition_penalty=1.3, return_dict_in_generate=True, output_scores=True, eos_token_id=[])
    procs = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.3, prompt_ignore_length=(mask == 0).sum(1)),
                                 TemperatureLogitsWarper(0.7), TopKLogitsWarper(8)])
    seqs = out.sequences
    full = torch.cat([mask, torch.ones_like(seqs[:, P:])], 1)
    logits = model(seqs, attention_mask=full).logits.float()
    for k, scores in enumerate(out.scores):
        want = procs(seqs[:, : P + k], logits[:, P + k - 1])
        _assert_scores_match(scores, want)
        assert torch.isfinite(scores.gather(1, seqs[:, P + k, None])).all()
