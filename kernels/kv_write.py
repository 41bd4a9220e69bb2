"""`propd::kv_write`: the cache write a compiled graph keeps.

The runtime owns the KV cache (a preallocated buffer) and compacts it after acceptance. The
verification graph only appends the tree's keys/values at `start`. As an opaque mutating op
the write survives dead-code elimination (an in-place `index_copy_` without users does not)
and Inductor keeps it in place on the graph input.
"""
from __future__ import annotations

import torch


@torch.library.custom_op("propd::kv_write", mutates_args=("cache",))
def kv_write(cache: torch.Tensor, new: torch.Tensor, start: int) -> None:
    """cache[:, :, start:start + new.shape[2]] = new   (cache: [B, H, S, D], new: [B, H, T, D])."""
    cache.narrow(2, start, new.shape[2]).copy_(new)


@kv_write.register_fake
def _(cache: torch.Tensor, new: torch.Tensor, start: int) -> None:
    return None
