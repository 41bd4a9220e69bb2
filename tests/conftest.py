"""Shared fixtures: a tiny model compiled once for the whole session (compiles take minutes)."""
import pytest
import torch

from models_tiny import q4_1_weights, tiny_model


@pytest.fixture(scope="session")
def compiled_llama():
    """Tiny Llama (seed 1) with its compiled verification package built: (model, config). Its
    decoder weights are Q4_1 values (as in a model dequantized from GGUF), so the package's
    decoder linears read the block format; its LM head stays fp32."""
    import propd_compile
    from propd_compile import ProPDConfig

    model = q4_1_weights(tiny_model("llama", seed=1))
    config = ProPDConfig(compile=True, max_tree_nodes=12)
    propd_compile.accelerate(model, config)
    assert model.propd.compiled(config, hidden=True)
    yield model, config
    propd_compile.restore(model)
    torch._dynamo.reset()
