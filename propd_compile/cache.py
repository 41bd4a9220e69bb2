"""The KV cache the runtime owns: one preallocated buffer, compacted after every step.

Rows of a batch advance by different amounts, so each row keeps its own count of used slots
(`lengths`) and a validity mask over slots (`valid`: left padding and not-yet-used slots are
False). A verification step writes the tree of every row at the same slots
[W, W + T), W = max(lengths), and attention only reads slots the row's mask allows. After
acceptance, `compact` moves each row's accepted tree entries down to its own
[length, length + accepted) and marks them valid. A row whose entries need no move where they
were written (a plain step's token, an accepted chain) keeps them there instead, skipping the
invalid slots before them, when that does not raise the next write start and the row's skipped
slots stay within the `gap_slots` the cache reserves: after rows accepted different counts, plain
steps then cost no copies (one gather and scatter per layer buffer each, ~5 ms a step at batch 32).

A row that finishes leaves (`retire`): the last live rows take its place and the buffers become
views of the live rows, so attention, which reads every row of the batch, no longer pays for it.

Inside the model the cache is a transformers `Cache`: attention layers call `update`, which
writes through `propd::kv_write` and returns the first W + T slots. W + T is read from the shape
of the current attention mask, so under `torch.compile(dynamic=True)` it is a symbolic size,
not a constant that would recompile every step.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from transformers.cache_utils import Cache

import propd_compile.kernels  # noqa: F401  (registers torch.ops.propd.*)
from propd_compile.ragged import RaggedStep


class TreeKVCache(Cache):
    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str,
        gap_slots: int = 0,
    ) -> None:
        super().__init__(layers=[])
        max_len += gap_slots
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        # One tensor per layer, not views of one buffer: aliased graph inputs would send
        # AOTAutograd down its slow synthetic-base path.
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.valid = torch.zeros((batch_size, max_len), dtype=torch.bool, device=device)
        self.lengths = [0] * batch_size
        self.gap_slots = gap_slots  # slots a row may skip in all (reserved beyond the tokens' max_len)
        self.gaps = [0] * batch_size  # slots each row skipped
        self.attn_mask: torch.Tensor | None = None  # the current step's 4D mask (sets W + T)
        # Early pruning (kernels/early_prune.py): keep[b, i] is False iff a prune point in the
        # forward dropped tree node i of row b; layer 0 resets it, so no prune point = all kept.
        self.keep = torch.ones((batch_size, max_len), dtype=torch.bool, device=device)
        # Exported graphs (AOTInductor packages) write with a plain in-place copy, which Inductor
        # keeps in place on the input buffer in C++; torch.compile graphs use `propd::kv_write`,
        # which the FX passes can see and rewrite (early pruning scatters the deep layers' writes).
        self.native_writes = False
        self.ragged: RaggedStep | None = None  # this step's packing when rows verify different sizes

    @classmethod
    def over(
        cls, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], keep: torch.Tensor, attn_mask: torch.Tensor,
        ragged: RaggedStep | None = None,
    ) -> "TreeKVCache":
        """The cache interface over given buffers for one forward (inside an exported graph, where
        the buffers are the graph's inputs); the runtime-side bookkeeping is not set."""
        cache = cls.__new__(cls)
        Cache.__init__(cache, layers=[])
        cache.keys, cache.values, cache.keep, cache.attn_mask = list(keys), list(values), keep, attn_mask
        cache.max_len = keys[0].shape[2]
        cache.native_writes, cache.ragged = True, ragged
        return cache

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, max_len: int, gap_slots: int = 0) -> "TreeKVCache":
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        param = next(model.parameters())
        return cls(cfg.num_hidden_layers, batch_size, kv_heads, head_dim, max_len, param.dtype, param.device, gap_slots)

    # --- the transformers Cache interface used by attention layers -----------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        assert self.attn_mask is not None, "TreeKVCache.begin_step must precede a forward"
        kv_len = self.attn_mask.shape[-1]
        if self.ragged is not None:  # packed nodes [1, Hkv, N, D], each to its own (row, slot)
            r = self.ragged
            self.keys[layer_idx][r.rows, :, r.slots] = key_states[0].transpose(0, 1)
            self.values[layer_idx][r.rows, :, r.slots] = value_states[0].transpose(0, 1)
            return self.keys[layer_idx][:, :, :kv_len], self.values[layer_idx][:, :, :kv_len]
        start = kv_len - key_states.shape[2]
        if self.native_writes:  # no prune point in these graphs: `keep` stays all True
            self.keys[layer_idx][:, :, start:kv_len].copy_(key_states)
            self.values[layer_idx][:, :, start:kv_len].copy_(value_states)
        else:
            if layer_idx == 0:
                torch.ops.propd.keep_reset(self.keep)
            torch.ops.propd.kv_write(self.keys[layer_idx], key_states, start)
            torch.ops.propd.kv_write(self.values[layer_idx], value_states, start)
        return self.keys[layer_idx][:, :, :kv_len], self.values[layer_idx][:, :, :kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.lengths)

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_len

    @property
    def is_compileable(self) -> bool:
        return True

    # --- runtime side ---------------------------------------------------------------------
    @property
    def write_start(self) -> int:
        """W: where the next step's tree goes (the same slots for every row)."""
        return max(self.lengths)

    def begin_step(self, attn_mask: torch.Tensor, nodes: torch.Tensor | None = None) -> None:
        """A forward with `attn_mask` [B, 1, T, W + T] comes; `nodes` [B, T] bool marks the real
        tree nodes when rows verify different sizes (padding and finished rows are left out of
        the forward: `propd_compile.ragged`)."""
        if attn_mask.shape[-1] > self.max_len:
            raise RuntimeError(f"KV cache overflow: {attn_mask.shape[-1]} > {self.max_len} slots")
        self.attn_mask = attn_mask
        if nodes is not None and not bool(nodes.all()):
            self.ragged = RaggedStep.of(nodes.to(attn_mask.device), attn_mask.shape[-1] - attn_mask.shape[-2])

    def end_step(self) -> None:
        self.attn_mask, self.ragged = None, None

    def commit_prefill(self, attention_mask_2d: torch.Tensor) -> None:
        """The prompt (left padded) now occupies slots [0, P) of every row."""
        P = attention_mask_2d.shape[1]
        self.valid[:, :P] = attention_mask_2d.bool()
        self.lengths = [P] * len(self.lengths)

    def retire(self, rows: Sequence[int]) -> list[int]:
        """Drop cache rows `rows` (rows that finished) so later steps neither compute nor attend
        over them: the last live rows move into their places (one row copy per buffer each), and
        the buffers become views of the first rows, so every step still reads one contiguous
        batch. Returns, for each remaining cache row, the row it was before."""
        gone = set(rows)
        left = len(self.lengths) - len(gone)
        holes = [r for r in range(left) if r in gone]
        movers = [r for r in range(left, len(self.lengths)) if r not in gone]
        order = list(range(left))
        for hole, mover in zip(holes, movers):
            order[hole] = mover
        if movers:
            dst, src = (torch.tensor(x, device=self.valid.device) for x in (holes, movers))
            for buf in (*self.keys, *self.values, self.valid, self.keep):
                buf[dst] = buf[src]
        self.keys = [k[:left] for k in self.keys]
        self.values = [v[:left] for v in self.values]
        self.valid, self.keep = self.valid[:left], self.keep[:left]
        self.lengths = [self.lengths[r] for r in order]
        self.gaps = [self.gaps[r] for r in order]
        return order

    def compact(self, tree_start: int, kept: Mapping[int, Sequence[int]]) -> None:
        """Keep the KV of each row's tree nodes `kept[row]` (written at tree_start + node), moved
        to the row's own next slots, or left in place where they are the tree's first n, end no
        later than the furthest row's moved entries would and the row's gaps stay within
        `gap_slots`; one gather and scatter per buffer for all rows."""
        furthest = max([*self.lengths, *(self.lengths[row] + len(nodes) for row, nodes in kept.items())])
        rows, src, dst = [], [], []
        for row, nodes in kept.items():
            if not nodes:
                continue
            n, gap = len(nodes), tree_start - self.lengths[row]
            in_place = (
                tree_start + n <= furthest and self.gaps[row] + gap <= self.gap_slots and list(nodes) == list(range(n))
            )
            dst0 = tree_start if in_place else self.lengths[row]
            self.gaps[row] += gap if in_place else 0
            if dst0 + n > self.max_len:
                raise RuntimeError("KV cache overflow during compaction")
            # Entries already where they belong need no copy: move the rest, from the first out of place.
            first = next((i for i, node in enumerate(nodes) if tree_start + node != dst0 + i), n)
            for i in range(first, n):
                rows.append(row)
                src.append(tree_start + nodes[i])
                dst.append(dst0 + i)
            self.valid[row, dst0 : dst0 + n] = True
            self.lengths[row] = dst0 + n
        if rows:
            device = self.valid.device
            r, s, d = (torch.tensor(x, device=device) for x in (rows, src, dst))
            for buf in (*self.keys, *self.values):
                buf[r, :, d] = buf[r, :, s]  # the gather is made before the scatter: ranges may overlap
