"""Ragged verification steps: each row verifies its own number of tree nodes.

A batched step used to pad every row's tree to the largest one, so one row with a good draft
made every row pay for its size, and finished rows rode along. Here the linear layers (most of a
step) see only the real nodes, packed into one token dimension of N = sum of the rows' sizes;
attention, the only part that needs the rows apart, gathers each row's queries back into the
padded [B, T] layout and reads that row's own cache, and the cache writes go to each node's own
(row, slot). The model's outputs come back in the [B, T] layout the decode loop expects (zeros
at padding and finished rows, which are never accepted).

`RaggedStep` describes the packing; `TreeKVCache.begin_step(mask, nodes)` makes one when some
node of the step is not real. Attention reads it through the model's keyword arguments, which
Hugging Face models hand to their attention function: `accelerate` switches the model to
`propd_sdpa` / `propd_eager`, which are HF's own `sdpa` / `eager` attention, on the padded
layout when the call carries a packing (so a ragged step computes what the padded step did).
`propd_sdpa` computes grouped-query attention without repeating K/V (`grouped_sdpa`), where HF's
sdpa would copy every layer's cache slice once per query group each step.
"""
from __future__ import annotations

from dataclasses import dataclass

import sys

import torch

PACK_KWARG, FLAT_KWARG = "propd_pack", "propd_flat"


@dataclass(frozen=True)
class RaggedStep:
    """Real node (b, t) of a [B, T] step is packed at position n of the token dimension."""

    pack: torch.Tensor  # [B, T] long: n of node (b, t); padding points at 0 (its output is dropped)
    flat: torch.Tensor  # [N] long: b * T + t of packed position n
    rows: torch.Tensor  # [N] long: b
    slots: torch.Tensor  # [N] long: the cache slot W + t that node's K/V goes to

    @classmethod
    def of(cls, nodes: torch.Tensor, write_start: int | torch.Tensor) -> "RaggedStep":
        """From nodes [B, T] bool (True = a real node of this step)."""
        B, T = nodes.shape
        flat = nodes.reshape(-1).nonzero().squeeze(1)
        pack = torch.zeros(B * T, dtype=torch.long, device=nodes.device)
        pack[flat] = torch.arange(flat.numel(), device=nodes.device)
        return cls(pack.view(B, T), flat, flat // T, write_start + flat % T)

    def pack_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T] -> [1, N]."""
        return x.reshape(1, -1)[:, self.flat]

    def unpack(self, y: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """[1, N, ...] -> [B, T, ...] with zeros where no node was packed."""
        if self.flat.numel() == shape[0] * shape[1]:  # every node packed, in order
            return y.view(*shape, *y.shape[2:])
        out = y.new_zeros((shape[0] * shape[1], *y.shape[2:]))
        out[self.flat] = y[0]
        return out.view(*shape, *y.shape[2:])


def _base_attention(base: str, module):
    """HF's own attention function for `base`: `sdpa` from the registry, `eager` from the
    module's modeling file (transformers registers no global eager function)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base == "sdpa":
        return ALL_ATTENTION_FUNCTIONS["sdpa"]
    return sys.modules[type(module).__module__].eager_attention_forward


def _attention(base: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        pack, flat = kwargs.pop(PACK_KWARG, None), kwargs.pop(FLAT_KWARG, None)
        if pack is None:
            return _delegate(base, module, query, attention_mask, kwargs)(module, query, key, value, attention_mask, **kwargs)
        # query [1, H, N, D] of packed nodes -> [B, H, T, D], each row's queries beside its own
        # cache rows key/value [B, Hkv, S, D] and mask [B, 1, T, S]; HF's attention on that
        # padded layout, then back to the packed order: [1, N, H, D]
        B, T = pack.shape
        H, D = query.shape[1], query.shape[3]
        q = query[0].index_select(1, pack.reshape(-1)).view(H, B, T, D).transpose(0, 1)
        out, weights = _delegate(base, module, q, attention_mask, kwargs)(module, q, key, value, attention_mask, **kwargs)
        return out.reshape(B * T, H, -1).index_select(0, flat)[None], weights

    attention.__name__ = f"propd_{base}_attention"
    return attention


def _delegate(base: str, module, query: torch.Tensor, mask: torch.Tensor | None, kwargs: dict):
    """The attention function for this call: `grouped_sdpa` where it computes HF's sdpa, else HF's own."""
    if base == "sdpa" and grouped_sdpa_applies(module, query, mask, kwargs):
        return grouped_sdpa
    return _base_attention(base, module)


# HF's sdpa arguments `grouped_sdpa` handles like HF does (others it ignores, as HF does); with
# any of these set it leaves the call to HF
_HF_ONLY = ("softcap", "position_bias", "output_attentions", "s_aux")


def grouped_sdpa_applies(module, query: torch.Tensor, mask: torch.Tensor | None, kwargs: dict) -> bool:
    """Whether `grouped_sdpa` computes HF's sdpa attention for this call: grouped-query heads
    (Hq = g Hkv, g > 1), a 4-D mask shared by all heads (decode steps always pass one, so HF would
    not take SDPA's causal path), and nothing HF treats specially. Not while torch.compile traces
    for the `propd` backend (exports for packages do fold): its tree-attention pass folds HF's
    `repeat_kv` itself, and the early-prune pass reads that layout."""
    if torch.compiler.is_compiling() and not torch.compiler.is_exporting():
        return False
    groups = getattr(module, "num_key_value_groups", 1)
    return (
        groups > 1 and query.shape[1] % groups == 0 and isinstance(mask, torch.Tensor) and mask.dim() == 4
        and mask.shape[1] == 1 and mask.shape[2] == query.shape[2] and not any(kwargs.get(k) for k in _HF_ONLY)
    )


def grouped_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """HF's sdpa attention with the query heads of each KV head folded into the query length:
    query [B, Hkv g, T, D] -> [B, Hkv, g T, D] and the mask repeated per group, so SDPA reads
    K/V as they are. HF repeats K/V g times instead (`repeat_kv`) whenever there is a mask and
    more than one query, and so does Inductor's CPU flash-attention lowering of `enable_gqa`: a
    copy of every layer's cache slice each step (at batch 32, KV 600: 13 ms a row of a 437 ms step).
    Each query row's softmax is over its own mask row either way: the same attention."""
    B, Hq, T, D = query.shape
    g = module.num_key_value_groups
    q = query.contiguous().view(B, Hq // g, g * T, D)  # (a reshape of strided queries guards on sizes under export)
    Bm, S = attention_mask.shape[0], attention_mask.shape[-1]
    mask = attention_mask[:, :, None].expand(Bm, 1, g, T, S).reshape(Bm, 1, g * T, S)
    out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
    # out [B, Hkv, g T, Dv] -> [B, T, Hkv g, Dv], HF's layout (SDPA's CPU output is [B, g T, Hkv, Dv] in memory)
    out = out.transpose(1, 2).unflatten(1, (g, T)).permute(0, 2, 3, 1, 4)
    return out.reshape(B, T, Hq, value.shape[-1]).contiguous(), None


def register() -> None:
    """Register `propd_sdpa` and `propd_eager` with transformers' attention registry (once)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for base in ("sdpa", "eager"):
        name = f"propd_{base}"
        if name not in ALL_ATTENTION_FUNCTIONS:
            AttentionInterface.register(name, _attention(base))
            # HF builds the masks of a model's own calls per implementation: the base's masks
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])


def takes_ragged_steps(model) -> bool:
    """Whether the model's attention reads packings (`propd_compile.accelerate` switched it)."""
    return str(getattr(model.config, "_attn_implementation", "")).startswith("propd_")


def model_kwargs(step: RaggedStep | None) -> dict:
    """The keyword arguments that carry a packing to the attention layers."""
    return {} if step is None else {PACK_KWARG: step.pack, FLAT_KWARG: step.flat}
