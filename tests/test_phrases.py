"""The phrase corpus: its index finds what a brute-force scan finds, it is refused for other
models, and decoding with it stays token-identical to HF greedy."""
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import propd_compile
from models_tiny import EOS, PAD, hf_greedy, left_padded, tiny_model
from propd_compile import ProPDConfig
from propd_compile.heads import model_identity
from propd_compile.phrases import CONFIG, FORMAT, PROMPT_TAIL, SEPARATOR, TOKENS, VERSION, PhraseIndex, Phrases


def _occurrences(stream: list[int], suffix: list[int]) -> list[int]:
    """Positions p with stream[p - n:p] == suffix, no separator in it or at p (brute force)."""
    n = len(suffix)
    return [p for p in range(n, len(stream)) if stream[p - n : p] == suffix and stream[p] != SEPARATOR]


@st.composite
def stream_and_history(draw):
    """A history, and a stream of pieces of it (so suffixes match at several lengths), random
    tokens and separators."""
    history = draw(st.lists(st.integers(0, 3), min_size=1, max_size=8))
    pieces = draw(st.lists(st.one_of(
        st.tuples(st.integers(0, len(history) - 1), st.integers(1, len(history))).map(lambda ab: history[ab[0] : ab[0] + ab[1]]),
        st.lists(st.integers(0, 3), min_size=1, max_size=4),
        st.just([SEPARATOR]),
    ), min_size=1, max_size=30))
    return [t for p in pieces for t in p], history


@settings(deadline=None, max_examples=300)
@given(data=stream_and_history(), n_max=st.integers(1, 5), per_n=st.integers(1, 6), depth=st.integers(1, 5))
def test_index_finds_the_longest_suffix_matches_a_scan_finds(data, n_max, per_n, depth):
    stream, history = data
    index = PhraseIndex(torch.tensor(stream, dtype=torch.long).numpy(), n_max)
    found = index.continuations(history, depth, per_n)
    longest = next((n for n in range(min(n_max, len(history)), 0, -1) if _occurrences(stream, history[-n:])), None)
    if longest is None:
        assert found == []
        return
    occ = _occurrences(stream, history[-longest:])
    top = [c for c, w in found if w == longest * longest]
    assert len(top) == min(per_n, len(occ))  # the longest match comes first and is never skipped
    for cont, w in found:
        n = int(round(w ** 0.5))
        assert n <= longest and 1 <= len(cont) <= depth and SEPARATOR not in cont
        # every continuation follows a real occurrence of the n-token suffix, up to a separator
        assert any(stream[p : p + len(cont)] == cont and (p + len(cont) == len(stream) or len(cont) == depth
                   or stream[p + len(cont)] == SEPARATOR) for p in _occurrences(stream, history[-n:]))
    if len(occ) < per_n:  # shorter suffixes fill up only what the longest left
        assert len(found) <= per_n + len(occ)


def _corpus_dir(tmp_path, model, answers) -> str:
    Phrases.from_answers(answers, {"format": FORMAT, "version": VERSION, "base_model": model_identity(model)}).save(tmp_path)
    return str(tmp_path)


def test_decoding_with_the_models_own_phrases_accepts_them_and_stays_identical(tmp_path):
    model = tiny_model("llama", seed=3)
    rows = [[7, 9, 11, 13, 8, 21], [30, 31, 6, 40]]
    ids, mask = left_padded(rows)
    ref = hf_greedy(model, ids, mask, 40)
    # the corpus: the model's own greedy answers to the same prompts, after the prompts' tails
    answers = [r[-4:] + ref[b, ids.shape[1]:].tolist() for b, r in enumerate(rows)]
    steps = {}
    for name, phrases in (("with", _corpus_dir(tmp_path, model, answers)), ("without", False)):
        propd_compile.accelerate(model, ProPDConfig(compile=False, drafters=("ngram",), phrases=phrases, tree="fixed", max_tree_nodes=8))
        out = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
        steps[name] = model.propd.stats.steps
        propd_compile.restore(model)
        assert torch.equal(out, ref)
    assert steps["with"] < steps["without"], steps


@settings(deadline=None, max_examples=10, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    prompt_rows=st.lists(st.lists(st.integers(6, 63), min_size=1, max_size=10), min_size=1, max_size=4),
    corpus=st.lists(st.lists(st.integers(0, 63), min_size=1, max_size=30), max_size=6),
    new=st.integers(1, 30), budget=st.integers(1, 16),
)
def test_any_corpus_keeps_decoding_identical_to_hf_greedy(tmp_path, prompt_rows, corpus, new, budget):
    model = tiny_model("qwen2", seed=1)
    ids, mask = left_padded(prompt_rows)
    ref = hf_greedy(model, ids, mask, new)
    # drafts from unrelated text, and from the reference itself, at once
    corpus = corpus + [r[-3:] + ref[b, ids.shape[1]:].tolist()[: new // 2] for b, r in enumerate(prompt_rows)]
    propd_compile.accelerate(model, ProPDConfig(compile=False, phrases=_corpus_dir(tmp_path, model, corpus), max_tree_nodes=budget))
    try:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
    finally:
        propd_compile.restore(model)
    assert torch.equal(out, ref)


def test_a_corpus_made_for_another_model_is_refused_naming_both(tmp_path):
    mine, other = tiny_model("llama", seed=0), tiny_model("llama", seed=0, layers=3)
    path = _corpus_dir(tmp_path, other, [[7, 8, 9]])
    with pytest.raises(ValueError, match="does not fit this model.*build-phrases"):
        Phrases.load(path, mine)
    assert Phrases.load(path, other).tokens.tolist() == [7, 8, 9, SEPARATOR]


def test_missing_or_broken_corpus_names_the_fix(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(FileNotFoundError, match="build-phrases"):
        Phrases.load(tmp_path, model)
    path = _corpus_dir(tmp_path, model, [[1, 2, 3]])
    (tmp_path / TOKENS).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="rebuild"):
        Phrases.load(path, model)
    Phrases.from_answers([[1, 2, 10_000]], json.loads((tmp_path / CONFIG).read_text())).save(tmp_path)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        Phrases.load(path, model)
    with pytest.raises(ValueError, match="phrases"):
        ProPDConfig(phrases=True)


def test_builder_writes_the_models_greedy_answers_and_resumes(tmp_path):
    """The self-prompting path with the real tokenizer and chat template, on a tiny random model."""
    from propd_compile import models
    from propd_compile.distill_data import chat_ids
    from propd_compile.phrases import build_phrases
    from propd_compile.train_heads import TrainSettings

    _, tok = models.load()
    model = tiny_model("llama", vocab=len(tok))
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = tok.eos_token_id
    settings = TrainSettings(num_prompts=3, prompt_tokens=12, answer_tokens=10, gen_batch_size=4)
    built = build_phrases(model, tok, tmp_path, settings, batch_size=2)
    prompts = json.loads((tmp_path / "work" / "prompts.json").read_text())
    assert 1 <= len(prompts) <= 3 and built.config["recipe"]["prompts"] == len(prompts)
    expected = []
    for p in prompts:  # each answer is the model's own greedy answer, after its prompt's tail
        ids = torch.tensor([chat_ids(tok, p)[0]])
        answer = hf_greedy(model, ids, torch.ones_like(ids), 10, pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
        while answer and answer[-1] == tok.eos_token_id:
            answer.pop()
        expected += ids[0, -PROMPT_TAIL:].tolist() + answer + [SEPARATOR]
    loaded = Phrases.load(tmp_path, model)
    assert loaded.tokens.tolist() == expected
    answers = (tmp_path / "work" / "answers.jsonl").read_text()
    build_phrases(model, tok, tmp_path, settings, batch_size=2)  # resumes: nothing answered again
    assert (tmp_path / "work" / "answers.jsonl").read_text() == answers
    with pytest.raises(ValueError, match="other settings"):
        build_phrases(model, tok, tmp_path, TrainSettings(num_prompts=3, prompt_tokens=12, answer_tokens=20, gen_batch_size=4))


@pytest.mark.real_model
def test_shipped_phrases_draft_for_the_embedded_model_and_stay_identical():
    from propd_compile import models
    from propd_compile.drafters import build_drafter
    from propd_compile.prompts import chat_prompt, mt_bench_sample

    model, tok = models.load()
    drafter = build_drafter(ProPDConfig(drafters=("ngram",)), model)
    if drafter.phrases is None:
        pytest.skip("no phrase corpus shipped for the embedded model")
    # an answer's usual opening is drafted from the corpus before the row has text of its own
    prompt = tok(chat_prompt(tok, "Give me three tips for a job interview."))["input_ids"]
    drafter.start([prompt])
    assert len(drafter.propose(0, 8)) > 1
    texts = [chat_prompt(tok, q.turns[0]) for q in mt_bench_sample(1)[4:6]]
    enc = tok(texts, return_tensors="pt", padding=True)
    ref = hf_greedy(model, enc.input_ids, enc.attention_mask, 48)
    propd_compile.accelerate(model, ProPDConfig(drafters=("ngram",), compile=False))
    try:
        out = model.generate(**enc, max_new_tokens=48)
    finally:
        propd_compile.restore(model)
    assert torch.equal(out, ref)
