"""Decoding through `torch.compile(backend="propd", dynamic=True)`: lossless, and no recompiles
once warm, whatever the tree sizes, KV lengths and prompt lengths."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

from models_tiny import VOCAB, hf_greedy, left_padded, tiny_model
from propd_compile import ProPDConfig, accelerate
from propd_compile.backend import REPORTS
from propd_compile.runtime_compile import warm_up


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def compiled_model(request):
    torch._dynamo.reset()
    model = tiny_model(request.param, seed=5)
    config = ProPDConfig(compile=True, max_tree_nodes=12)
    accelerate(model, config)
    before = _graphs()
    warm_up(model, config)
    assert _graphs() - before == 4  # {batch 1, batch > 1} x {root-only step, tree}
    model._test_reports = list(REPORTS)[-4:]
    return model


@settings(deadline=None, max_examples=12, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(st.lists(st.integers(6, VOCAB - 1), min_size=1, max_size=14), min_size=1, max_size=4),
    new=st.integers(1, 40),
)
def test_compiled_decoding_is_lossless_without_recompiles(compiled_model, rows, new):
    ids, mask = left_padded(rows)
    ref = hf_greedy(compiled_model, ids, mask, new)
    before = _graphs()
    out = compiled_model.generate(ids, attention_mask=mask, max_new_tokens=new)
    assert torch.equal(out, ref)
    assert _graphs() == before, "decoding recompiled after warm-up"


def test_the_backend_rewrote_every_attention(compiled_model):
    layers = compiled_model.config.num_hidden_layers
    reports = [r for _, rs in compiled_model._test_reports for r in rs if r.name == "tree_attention"]
    assert len(reports) == 4 and all(r.rewritten == layers and not r.skipped for r in reports)


def test_compile_switch_off_is_eager():
    model = tiny_model("llama")
    accelerate(model, ProPDConfig(compile=False))
    ids, mask = left_padded([[7, 8, 9]])
    before = _graphs()
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=5), hf_greedy(model, ids, mask, 5))
    assert _graphs() == before
