"""The embedded SmolLM2-135M-Instruct on real MT-Bench prompts (slower; CI runs them)."""
import pytest
import torch

from propd_compile import ProPDConfig, accelerate, models, prompts, restore

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm():
    return models.load()


@pytest.mark.parametrize("batch_size", [1, 4])
def test_identical_to_hf_greedy_on_mt_bench(smollm, batch_size):
    model, tok = smollm
    texts = [prompts.chat_prompt(tok, q.turns[0]) for q in prompts.mt_bench_sample(1)[:4]]
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i : i + batch_size], return_tensors="pt", padding=True)
        ref = model.generate(**enc, max_new_tokens=48, do_sample=False)
        accelerate(model, ProPDConfig(max_tree_nodes=16))
        try:
            out = model.generate(**enc, max_new_tokens=48)
        finally:
            restore(model)
        assert torch.equal(out, ref), tok.batch_decode(torch.cat([out, ref])[:, enc["input_ids"].shape[1]:])


def test_embedded_model_loads_from_the_cache(smollm):
    model, tok = smollm
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert tok.padding_side == "left" and tok.pad_token is not None
    again, _ = models.load()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_compiled_decoding_of_smollm2_is_identical_and_compiles_nothing(smollm):
    """Through the compiled package (frozen weights, autotuned GEMM templates): the same tokens as
    HF greedy, batch 1 and a padded batch, and nothing compiled while decoding."""
    from torch._dynamo.utils import counters

    model, tok = smollm
    config = ProPDConfig(compile=True)
    accelerate(model, config)
    try:
        assert model.propd.compiled(config, hidden=True)
        built, graphs = counters["propd"]["packages_built"], counters["stats"]["unique_graphs"]
        qs = prompts.mt_bench_sample(1)[2:5]
        for texts in ([prompts.chat_prompt(tok, qs[0].turns[0])], [prompts.chat_prompt(tok, q.turns[0]) for q in qs[1:]]):
            tok.padding_side = "left"
            enc = tok(texts, return_tensors="pt", padding=True)
            ref = type(model).generate(model, **enc, max_new_tokens=64, do_sample=False)  # HF's own
            assert torch.equal(model.generate(**enc, max_new_tokens=64), ref)
        assert counters["propd"]["packages_built"] == built and counters["stats"]["unique_graphs"] == graphs
    finally:
        restore(model)


def test_identical_to_hf_greedy_with_repetition_penalty_and_no_repeat_ngram(smollm):
    """16 MT-Bench prompts (2 per category), batch 4, fixed 8-node trees (every node processed on
    its own history): the options small chat models are run with."""
    model, tok = smollm
    texts = [prompts.chat_prompt(tok, q.turns[0]) for q in prompts.mt_bench_sample(2)]
    options = dict(max_new_tokens=48, repetition_penalty=1.2, no_repeat_ngram_size=4)
    accelerate(model, ProPDConfig(tree="fixed", max_tree_nodes=8))
    try:
        for i in range(0, len(texts), 4):
            enc = tok(texts[i : i + 4], return_tensors="pt", padding=True)
            ref = type(model).generate(model, **enc, do_sample=False, **options)  # HF's own
            out = model.generate(**enc, **options)
            assert torch.equal(out, ref), tok.batch_decode(torch.cat([out, ref])[:, enc["input_ids"].shape[1]:])
    finally:
        restore(model)


def test_text_generation_pipeline_on_chat_inputs(smollm):
    """pipeline("text-generation") on the accelerated model: a chat input and a batch of them
    give HF's answers."""
    from transformers import pipeline

    model, tok = smollm
    chats = [[{"role": "user", "content": q.turns[0]}] for q in prompts.mt_bench_sample(1)[:4]]
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    kw = dict(max_new_tokens=24, do_sample=False)
    ref = [pipe(chats[0], **kw), pipe(chats, batch_size=4, **kw)]
    accelerate(model, ProPDConfig(max_tree_nodes=16))
    try:
        assert [pipe(chats[0], **kw), pipe(chats, batch_size=4, **kw)] == ref
    finally:
        restore(model)
