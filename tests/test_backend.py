"""The `propd` torch.compile backend: registration, options, purity, and HF models end to end.

Inductor compiles take seconds on a 2-core CPU box, so every model configuration is compiled
once (dynamic=True) and hypothesis draws the inputs for that compile.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

import propd_compile.backend as backend_mod
from propd_compile.backend import propd_backend, validate_options

SDPA = torch._C._nn.scaled_dot_product_attention
TREE = torch.ops.propd.tree_attention.default


def run_fresh(code: str, timeout: int = 240) -> dict:
    """Run `code` in a fresh interpreter; it prints one JSON line last.

    Runs outside the repo root: there `python -c` puts the root on sys.path and transformers'
    `import kernels` probe (is_kernels_available) picks up the repo's top-level kernels/
    directory, which imports propd_compile as a side effect."""
    with tempfile.TemporaryDirectory() as cwd:
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                              timeout=timeout, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def capture(fn, *args) -> tuple[torch.fx.GraphModule, list]:
    box: dict = {}

    def recorder(gm, example_inputs):
        box["gm"], box["ex"] = gm, list(example_inputs)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=recorder, fullgraph=True)(*args)
    return box["gm"], box["ex"]


def gqa_attention(q, k, v, mask):
    b, h, s, d = k.shape
    n = q.shape[1] // h
    k = k[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)
    v = v[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)
    return SDPA(q, k, v, attn_mask=mask, dropout_p=0.0, scale=0.25, is_causal=False)


def gqa_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(2, 4, 3, 8, generator=g), torch.randn(2, 2, 7, 8, generator=g), torch.randn(2, 2, 7, 8, generator=g)
    mask = torch.rand(2, 1, 3, 7, generator=g) > 0.3
    mask[..., 0] = True
    return q, k, v, mask


# ---- registration ----------------------------------------------------------------------------
_TINY_LLAMA = """
    import sys, json, torch, transformers, warnings
    warnings.filterwarnings("ignore")
    from transformers import LlamaConfig, LlamaForCausalLM
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      attn_implementation="sdpa")
    m = LlamaForCausalLM(cfg).eval()
    B, P, T = 2, 5, 4
    ids = torch.randint(0, 96, (B, P + T))
    mask = torch.tril(torch.ones(P + T, P + T, dtype=torch.bool)).repeat(B, 1, 1, 1)
    mask[:, :, P + 2, P + 1] = False          # siblings: node 2 does not see node 1
    mask[:, :, P + 3, P + 1] = False
    pos = torch.cat([torch.arange(P), P + torch.tensor([0, 1, 1, 2])]).repeat(B, 1)
    kw = dict(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
"""


def test_entry_point_fresh_interpreter():
    """backend='propd' resolves through the entry point without importing propd_compile first."""
    res = run_fresh(_TINY_LLAMA + """
    before = "propd_compile" in sys.modules
    with torch.no_grad():
        ref = m(**kw).logits
        out = torch.compile(m, backend="propd")(**kw).logits
    print(json.dumps({"before": before, "after": "propd_compile.backend" in sys.modules,
                      "diff": (out - ref).abs().max().item(),
                      "rewritten": counters["propd"]["tree_attention.rewritten"],
                      "skipped": counters["propd"]["tree_attention.skipped"]}))
    """)
    assert res["before"] is False and res["after"] is True
    assert res["diff"] < 1e-4
    assert res["rewritten"] == 2 and res["skipped"] == 0


def test_import_then_compile_no_duplicate_registration():
    res = run_fresh("""
    import json, torch
    import propd_compile.backend as b
    f = torch.compile(lambda x: x.sin() + 1, backend="propd", options={"inductor": False})
    x = torch.randn(5)
    ok = torch.allclose(f(x), x.sin() + 1)
    from torch._dynamo.backends.registry import lookup_backend
    print(json.dumps({"ok": ok, "listed": "propd" in torch._dynamo.list_backends(),
                      "same": lookup_backend("propd") is b.propd_backend}))
    """)
    assert res == {"ok": True, "listed": True, "same": True}


def test_registers_itself_without_entry_point():
    """Source tree without the installed entry point: importing the module registers 'propd'."""
    res = run_fresh("""
    import json, importlib.metadata as md
    real = md.entry_points
    def no_propd(**kw):
        eps = real(**kw)
        if kw.get("group") == "torch_dynamo_backends":
            return md.EntryPoints([e for e in eps if e.name != "propd"])
        return eps
    md.entry_points = no_propd
    import torch
    import propd_compile.backend as b
    import propd_compile.backend  # second import is a no-op
    from torch._dynamo.backends.registry import _COMPILER_FNS
    f = torch.compile(lambda x: x * 2, backend="propd", options={"inductor": False})
    print(json.dumps({"registered": _COMPILER_FNS.get("propd") is b.propd_backend,
                      "ok": bool((f(torch.ones(3)) == 2).all())}))
    """)
    assert res == {"registered": True, "ok": True}


# ---- options, purity, logging ---------------------------------------------------------------
@pytest.mark.parametrize(
    "options",
    [{"tree_attention": "yes"}, {"prune": 3}, {"inductor": 1}, {"inductor_config": [("a", 1)]}, {"debug": None}],
)
def test_option_types_validated(options):
    with pytest.raises(TypeError, match=next(iter(options))):
        validate_options(options)


def test_options_unknown_keys_ignored(caplog):
    caplog.set_level(logging.DEBUG, logger="propd_compile.backend")
    assert validate_options(None) == {}
    opts = validate_options({"prune": {"layer": 1, "predictor": 0}, "whatever": 3, "tree_attention": True})
    assert opts["whatever"] == 3
    assert any("whatever" in r.getMessage() for r in caplog.records)
    with pytest.raises(TypeError):
        validate_options([("prune", True)])


def test_backend_is_pure_and_deterministic():
    """Dynamo may call the backend twice for one compile: the input graph is never mutated and
    both calls give the same rewritten graph."""
    q, k, v, mask = gqa_inputs()
    gm, ex = capture(gqa_attention, q, k, v, mask)
    code = gm.code
    n_reports = len(backend_mod.REPORTS)
    f1 = propd_backend(gm, ex, options={"inductor": False})
    f2 = propd_backend(gm, ex, options={"inductor": False})
    assert gm.code == code and any(n.target is SDPA for n in gm.graph.nodes)
    assert f1.__self__.code == f2.__self__.code and f1.__self__ is not gm
    assert sum(n.target is TREE for n in f1.__self__.graph.nodes) == 1
    ref = gqa_attention(q, k, v, mask)
    torch.testing.assert_close(f1(*ex)[0], ref)
    torch.testing.assert_close(f2(*ex)[0], ref)
    assert len(backend_mod.REPORTS) == n_reports + 2
    reports = {r.name: r for r in backend_mod.REPORTS[-1][1]}
    assert reports["tree_attention"].rewritten == 1
    assert not reports["early_prune"].enabled  # no prune option: the pass stays off


def test_tree_attention_option_disables_pass():
    q, k, v, mask = gqa_inputs()
    gm, ex = capture(gqa_attention, q, k, v, mask)
    f = propd_backend(gm, ex, options={"inductor": False, "tree_attention": False})
    assert not any(n.target is TREE for n in f.__self__.graph.nodes)
    assert backend_mod.REPORTS[-1][1][0].enabled is False


def test_propd_debug_dumps_graphs(monkeypatch, caplog):
    pkg_logger = logging.getLogger("propd_compile")
    old_level, old_handlers = pkg_logger.level, list(pkg_logger.handlers)
    monkeypatch.setattr(backend_mod, "_debug_handler", None)
    monkeypatch.setenv("PROPD_DEBUG", "1")
    try:
        q, k, v, mask = gqa_inputs()
        gm, ex = capture(gqa_attention, q, k, v, mask)
        with caplog.at_level(logging.DEBUG, logger="propd_compile"):
            propd_backend(gm, ex, options={"inductor": False})
    finally:  # PROPD_DEBUG turned the package logger to DEBUG with a stderr handler: undo it
        for h in list(pkg_logger.handlers):
            if h not in old_handlers:
                pkg_logger.removeHandler(h)
        pkg_logger.setLevel(old_level)
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == "propd_compile.backend")
    assert "before passes" in text and "after passes" in text
    assert "scaled_dot_product_attention" in text and "propd.tree_attention" in text


# ---- HF models end to end: backend logits == eager logits -------------------------------------
CONFIGS = {
    # name: (architecture, hidden, heads, kv heads, mask kind)
    "llama-gqa-bool": ("llama", 64, 4, 2, "bool"),
    "llama-mha-additive": ("llama", 32, 4, 4, "additive"),
    "qwen2-gqa-additive": ("qwen2", 48, 6, 2, "additive"),
    "qwen2-mha-bool": ("qwen2", 64, 2, 2, "bool"),
}
N_LAYERS = 2
VOCAB = 128


class HFCase:
    def __init__(self, name: str):
        from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

        arch, hidden, heads, kv, self.mask_kind = CONFIGS[name]
        cls_cfg, cls_model = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
        cfg = cls_cfg(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=N_LAYERS, num_attention_heads=heads, num_key_value_heads=kv,
                      max_position_embeddings=64, attn_implementation="sdpa")
        torch.manual_seed(sum(map(ord, name)))
        self.model = cls_model(cfg).eval()
        torch._dynamo.reset()
        counters["propd"].clear()
        backend_mod.REPORTS.clear()
        self.compiled = torch.compile(self.model, backend="propd", dynamic=True)
        self.batch_classes: set[bool] = set()


@pytest.fixture(scope="module", params=list(CONFIGS))
def backend_hf_case(request):
    case = HFCase(request.param)
    yield case
    torch._dynamo.reset()


def tree_inputs(draw, mask_kind: str):
    """Prefix of P tokens + a random forest of T nodes per row.

    The tree rows of the mask are the runtime's [B, 1, T, P+T] tree mask (prefix visible, then the
    node's ancestors and itself); the prefix rows are causal, so one cache-free forward computes the
    same tree logits as prefill + tree step. Positions: 0..P-1, then P + depth."""
    b = draw(st.integers(1, 3), label="B")
    p = draw(st.integers(1, 8), label="P")
    t = draw(st.integers(1, 12), label="T")
    seed = draw(st.integers(0, 2**16), label="seed")
    mask = torch.zeros(b, 1, p + t, p + t, dtype=torch.bool)
    mask[:, 0, :p, :p] = torch.tril(torch.ones(p, p, dtype=torch.bool))
    mask[:, 0, p:, :p] = True
    pos = torch.zeros(b, p + t, dtype=torch.long)
    pos[:, :p] = torch.arange(p)
    for row in range(b):
        parents = [draw(st.integers(-1, i - 1)) for i in range(t)]
        depth = []
        for i, par in enumerate(parents):
            depth.append(0 if par < 0 else depth[par] + 1)
            mask[row, 0, p + i, p + i] = True
            a = par
            while a >= 0:
                mask[row, 0, p + i, p + a] = True
                a = parents[a]
        pos[row, p:] = p + torch.tensor(depth)
    if mask_kind == "additive":
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    ids = torch.randint(0, VOCAB, (b, p + t), generator=torch.Generator().manual_seed(seed))
    return dict(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)


@settings(deadline=None, max_examples=20, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_hf_tree_logits_match_eager(backend_hf_case, data):
    case = backend_hf_case
    kw = tree_inputs(data.draw, case.mask_kind)
    case.batch_classes.add(kw["input_ids"].shape[0] == 1)
    with torch.no_grad():
        ref = case.model(**kw).logits
        out = case.compiled(**kw).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)

    # Every compiled graph had all N_LAYERS SDPA calls rewritten, nothing skipped.
    reports = list(backend_mod.REPORTS)
    assert reports, "propd backend never ran"
    for _, passes in reports:
        (rep,) = [r for r in passes if r.name == "tree_attention"]
        assert rep.rewritten == N_LAYERS and not rep.skipped, rep
    # One dynamic compile serves all shapes; Dynamo 0/1-specializes B == 1, which costs one more.
    assert counters["propd"]["graphs"] <= len(case.batch_classes)
    assert counters["propd"]["tree_attention.rewritten"] == N_LAYERS * counters["propd"]["graphs"]
