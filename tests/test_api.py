"""The one-line API: same generate habits, same tokens, clear errors, nothing corrupted."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

import propd_compile
from models_tiny import EOS, PAD, hf_greedy, left_padded, tiny_model, tiny_tokenizer
from propd_compile import ProPDConfig, accelerate, restore


@pytest.fixture
def model():
    return tiny_model("llama", seed=3)


def _batch():
    return left_padded([[7, 8, 9, 7, 8, 9, 7], [10, 11, 12], [13]])


def test_accelerate_returns_the_same_model_and_is_idempotent(model):
    ids, mask = _batch()
    ref = hf_greedy(model, ids, mask, 20)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert accelerate(model) is model
    assert accelerate(model) is model
    out = model.generate(ids, attention_mask=mask, max_new_tokens=20)
    assert torch.equal(out, ref)
    assert model.state_dict().keys() == state.keys()  # no submodule was added
    st = model.propd.stats
    assert st.new_tokens == (out[:, ids.shape[1]:] != PAD).sum() or st.new_tokens > 0
    assert st.steps >= 1 and st.mean_accepted >= 1.0 and st.mean_tree_nodes >= 1.0 and st.seconds > 0
    assert propd_compile.is_accelerated(model)
    restore(model)
    assert not propd_compile.is_accelerated(model) and not hasattr(model, "propd")
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False), ref)


def test_decorator_forms():
    @accelerate
    def make():
        return tiny_model("qwen2")

    @accelerate(config=ProPDConfig(max_tree_nodes=4))
    def make_small():
        return tiny_model("qwen2")

    assert propd_compile.is_accelerated(make())
    m = make_small()
    assert m.propd.config.max_tree_nodes == 4


def test_hf_arguments_are_honoured(model):
    ids, mask = _batch()
    accelerate(model)
    # generation_config, max_length, positional inputs, 1-D input, eos override
    gc = GenerationConfig(max_new_tokens=9, eos_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(model.generate(ids, attention_mask=mask, generation_config=gc), hf_greedy(model, ids, mask, 9))
    assert torch.equal(
        model.generate(input_ids=ids, attention_mask=mask, max_length=ids.shape[1] + 5),
        hf_greedy(model, ids, mask, 5),
    )
    one = torch.tensor([7, 8, 9, 7, 8])
    assert torch.equal(model.generate(one, max_new_tokens=6), hf_greedy(model, one[None], torch.ones(1, 5, dtype=torch.long), 6))
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12, return_dict_in_generate=True)
    assert torch.equal(out.sequences, hf_greedy(model, ids, mask, 12))


def test_stopping_criteria_and_streamer(model):
    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            return torch.tensor([input_ids.shape[1] >= self.n] * input_ids.shape[0])

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.flatten().tolist())

        def end(self):
            self.ended = True

    ids = torch.tensor([[7, 8, 9, 7, 8, 9, 7]])
    crit = StopAfter()
    crit.n = ids.shape[1] + 7
    ref = hf_greedy(model, ids, None, 30, stopping_criteria=StoppingCriteriaList([crit]))
    accelerate(model)
    streamer = Collect()
    out = model.generate(ids, max_new_tokens=30, stopping_criteria=StoppingCriteriaList([crit]), streamer=streamer)
    assert torch.equal(out, ref)
    assert streamer.ended and streamer.chunks[0] == ids[0].tolist()
    assert sum(streamer.chunks[1:], []) == out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(num_beams=2), NotImplementedError, "num_beams=2.*hypotheses.*propd_compile.restore"),
        (dict(do_sample=True, num_beams=2), NotImplementedError, "beam_sample.*propd_compile.restore"),
        (dict(penalty_alpha=0.6, top_k=4), NotImplementedError, "contrastive.*hidden states.*propd_compile.restore"),
        (dict(prompt_lookup_num_tokens=3), NotImplementedError, "assisted.*propd_compile.restore"),
        (dict(dola_layers="low"), NotImplementedError, "dola.*early-layer.*propd_compile.restore"),
        (dict(guidance_scale=1.5), NotImplementedError, "guidance_scale.*unconditional.*propd_compile.restore"),
        (dict(encoder_no_repeat_ngram_size=2), NotImplementedError, "encoder_no_repeat.*propd_compile.restore"),
        (dict(prefix_allowed_tokens_fn=lambda b, ids: [7]), NotImplementedError, "batch index.*propd_compile.restore"),
        (dict(return_dict_in_generate=True, output_hidden_states=True), NotImplementedError, "hidden.*restore"),
        (dict(max_new_tokens=10_000), ValueError, "context"),
        (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
        (dict(bogus_argument=1), TypeError, "bogus_argument"),
    ],
)
def test_unsupported_arguments_fail_clearly_and_leave_the_model_working(model, kwargs, exc, match):
    ids, mask = _batch()
    accelerate(model)
    with pytest.raises(exc, match=match):
        model.generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=8), hf_greedy(model, ids, mask, 8))


def test_bad_prompts(model):
    accelerate(model)
    with pytest.raises(ValueError, match="empty prompt"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=4)
    ids, mask = _batch()
    mask[2] = 0
    with pytest.raises(ValueError, match="empty prompt in batch rows \\[2\\]"):
        model.generate(ids, attention_mask=mask, max_new_tokens=4)
    right = torch.tensor([[1, 1, 0]])
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(torch.tensor([[7, 8, 0]]), attention_mask=right, max_new_tokens=4)


def test_unsupported_models_are_rejected():
    from transformers import BertConfig, BertModel

    with pytest.raises(TypeError, match="causal LM"):
        accelerate(BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)))
    flash = tiny_model("llama")
    flash.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match='set_attn_implementation\\("sdpa"\\)'):
        accelerate(flash)


def test_nan_logits_raise_and_corrupt_nothing(model):
    ids, mask = _batch()
    ref = hf_greedy(model, ids, mask, 8)
    accelerate(model)
    w = model.lm_head.weight
    saved = w.data[3].clone()
    w.data[3] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        model.generate(ids, attention_mask=mask, max_new_tokens=8)
    w.data[3] = saved
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=8), ref)


def test_config_validation():
    with pytest.raises(ValueError, match="max_tree_nodes"):
        ProPDConfig(max_tree_nodes=0)
    with pytest.raises(ValueError, match="unknown drafters"):
        ProPDConfig(drafters=("oracle",))
    with pytest.raises(ValueError, match="tree="):
        ProPDConfig(tree="star")


# --- HF generate habits: stop strings, num_return_sequences, pipelines ---------------------------
@settings(deadline=None, max_examples=20, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(st.lists(st.integers(6, 20), min_size=1, max_size=8), min_size=1, max_size=4),
       seed=st.integers(0, 3), data=st.data())
def test_stop_strings_stop_where_hf_stops(rows, seed, data):
    """stop_strings (with tokenizer=) end each row where HF's StopStringCriteria ends it; the stop
    string is drawn from the text HF generates without it (whole tokens or across a boundary)."""
    model, tok = tiny_model("llama", seed=seed), tiny_tokenizer()
    ids, mask = left_padded(rows)
    P, new = ids.shape[1], 16
    text = tok.decode(hf_greedy(model, ids, mask, new)[data.draw(st.integers(0, len(rows) - 1)), P:])
    start = data.draw(st.integers(0, len(text) - 2))
    stop = text[start : start + data.draw(st.integers(1, 6))].strip() or text[:2]
    ref = hf_greedy(model, ids, mask, new, stop_strings=[stop], tokenizer=tok)
    accelerate(model, ProPDConfig(tree="fixed"))
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=new, stop_strings=stop, tokenizer=tok), ref)


def test_stop_strings_need_the_tokenizer_as_in_hf(model):
    ids, mask = _batch()
    accelerate(model)
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(ids, attention_mask=mask, max_new_tokens=4, stop_strings=["w9"])


def test_num_return_sequences(model):
    """Sampling: rows repeated in place as HF does (a point mass reproduces greedy per copy);
    greedy: HF's own refusal."""
    ids, mask = _batch()
    ref = hf_greedy(model, ids, mask, 10)
    accelerate(model)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True, top_k=1, num_return_sequences=3)
    assert torch.equal(out, ref.repeat_interleave(3, 0))
    with pytest.raises(ValueError, match="num_return_sequences"):
        model.generate(ids, attention_mask=mask, max_new_tokens=4, num_return_sequences=2)


def test_text_generation_pipeline_matches_hf():
    """transformers.pipeline on an accelerated model: single and batched inputs (padding), the
    same text as the pipeline on the original model."""
    from transformers import pipeline

    tok = tiny_tokenizer()
    texts = ["w7 w8 w9 w7 w8", "w10 w11", "w12", "w13 w14 w15"]
    pipes = [pipeline("text-generation", model=m, tokenizer=tok) for m in (tiny_model("llama", 3), accelerate(tiny_model("llama", 3)))]
    kw = dict(max_new_tokens=12, do_sample=False)
    hf, ours = ([p(texts[0], **kw), p(texts, batch_size=4, **kw), p(texts, batch_size=2, repetition_penalty=1.5, **kw)]
                for p in pipes)
    assert hf == ours and hf[1][1][0]["generated_text"].startswith(texts[1])
