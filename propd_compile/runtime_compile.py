"""The verification forward through `torch.compile(backend="propd", dynamic=True)`.

Shapes that change every step (tree size T, KV length, cache size) are symbolic, so decoding
does not recompile per step. Dynamo still specialises sizes 0 and 1, so a decode may compile
a few graphs while it warms up (batch 1 vs more rows, a root-only step vs a tree) and then
none; `tests/test_runtime_compile.py` counts them. Prefill stays eager: it runs once per call
at a shape nothing else shares.
"""
from __future__ import annotations

import torch
import torch.fx.experimental._config as fx_config

from propd_compile.cache import TreeKVCache
from propd_compile.config import ProPDConfig
from propd_compile.decoding import Forward, eager_forward

import propd_compile.backend  # noqa: F401  (registers "propd" when the entry point is absent)


def backend_options_for(model: torch.nn.Module, config: ProPDConfig) -> dict:
    """The propd backend's options for `config`: its `backend_options`, plus the resolved early
    predictor when `config.prune`."""
    options = dict(config.backend_options)
    if config.prune:
        from propd_compile.early_head import prune_options

        options["prune"] = prune_options(model, config)
    return options


def compiled_forward(
    model: torch.nn.Module, hidden: bool = False, options: dict | None = None, taps: tuple[int, ...] = ()
) -> Forward:
    """`decoding.eager_forward(model, hidden, taps)` compiled with the propd backend and `options`;
    with `hidden` it returns (logits, last hidden state), with `taps` also the tapped features."""
    compiled = torch.compile(
        eager_forward(model, hidden=hidden, taps=taps), backend="propd", dynamic=True, options=options or {}
    )

    def forward(input_ids, mask, position_ids, cache):
        # No duck sizing: two sizes that happen to be equal at compile time (batch and tree size,
        # say) must not be fused into one symbol, or the first step where they differ recompiles.
        with fx_config.patch(use_duck_shape=False):
            return compiled(input_ids, mask, position_ids, cache)

    return forward


@torch.no_grad()
def warm_up(model: torch.nn.Module, config: ProPDConfig, batch_sizes: tuple[int, ...] = (1, 2)) -> None:
    """Compile every graph decoding can need, so that no decoding step compiles.

    Dynamo specialises size-1 dimensions, and HF attention branches on `q_len > 1`, so the
    graphs are: one row or several, times root-only steps (T = 1) or trees (T > 1).
    """
    from propd_compile.drafters import build_drafter
    from propd_compile.state import state_of

    state = state_of(model)
    if state is None:
        raise ValueError("warm_up compiles an accelerated model's forwards: call propd_compile.accelerate(model, config) first")
    drafter = build_drafter(config, model)
    forward = state.forward(config, hidden=drafter.needs_hidden, taps=drafter.feature_layers)
    device = next(model.parameters()).device
    prefix = 5
    for b in batch_sizes:
        for T in (1, 3):
            cache = TreeKVCache.for_model(model, b, prefix + T + 4)
            cache.lengths = [prefix] * b
            tree = torch.ones(T, T, dtype=torch.bool).tril()
            mask = torch.cat([torch.ones(b, T, prefix, dtype=torch.bool), tree.repeat(b, 1, 1)], 2)[:, None]
            positions = (prefix + torch.arange(T)).repeat(b, 1)
            cache.begin_step(mask.to(device))
            forward(torch.zeros(b, T, dtype=torch.long, device=device), mask.to(device), positions.to(device), cache)
            cache.end_step()
