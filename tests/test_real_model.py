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
