"""Ops of ProPD's early pruning: the keep buffer, the prune decision and the deep-layer KV writes.

`passes/early_prune.py` inserts them into the verification graph; they are opaque custom ops, so
Inductor calls them as written:

  * `propd::keep_reset(keep)`: marks every tree node kept. `TreeKVCache.update` calls it at
    layer 0 of every forward, so the runtime-owned buffer `cache.keep` is a graph input the
    pass can find, and a forward without a prune point reports "nothing pruned".
  * `propd::prune_decide(hidden, tokens, mask, predictor) -> keep [B, T]`: the prune decision at
    layer L_e. Early logits come from the registered predictor (`register_predictor`: a trained
    early head or the logit lens, looked up by id because a backend cannot add weights to a
    Dynamo graph). Node c is kept iff token(c) is in the top-k of its parent's early logits and
    its parent is kept; the root (node 0) is always kept, padding nodes (no parent, index > 0)
    never.
  * `propd::keep_write(buf, keep)`: copies the decision into the runtime's `cache.keep`.
  * `propd::survivors(keep) -> idx [B, n]`: per row its survivors in tree order followed by its
    first pruned nodes, n = the largest survivor count of the batch (a data-dependent size). The
    padded entries run the deep layers but stay marked pruned. (Three ops, not one: a mutating
    op with a data-dependent output size loses its unbacked symbol in Inductor's scheduler.)
  * `propd::kv_scatter(cache, new, start, idx)`: the deep layers' KV write, row i of `new` goes
    to slot start + idx[b, i], so the cache layout is the same in every layer and compaction
    needs no change. Pruned slots keep stale values no survivor reads (the kept set is
    ancestor-closed and the tree mask only lets a node see its ancestors).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class PrunePredictor:
    """What the prune op evaluates: `fn(hidden rows) -> early logits` (only the rows of nodes that
    have children), and the k of the top-k test (mutable: changing it needs no recompile)."""

    fn: Callable[[torch.Tensor], torch.Tensor]  # hidden rows [M, H] -> early logits [M, V or S]
    topk: int
    vocab: torch.Tensor | None = None  # [S] token ids of a shortlist head's logit columns


_PREDICTORS: dict[int, PrunePredictor] = {}
_IDS = itertools.count()


def register_predictor(fn: Callable[[torch.Tensor], torch.Tensor], topk: int, vocab: torch.Tensor | None = None) -> int:
    """Register an early predictor (`vocab`: the token ids of its logit columns when it scores a
    shortlist); returns the id a prune point refers to it by."""
    if topk < 1:
        raise ValueError("prune top-k must be >= 1")
    pid = next(_IDS)
    _PREDICTORS[pid] = PrunePredictor(fn, topk, vocab)
    return pid


def get_predictor(pid: int) -> PrunePredictor:
    try:
        return _PREDICTORS[pid]
    except KeyError:
        raise KeyError(f"no early predictor registered under id {pid} (compiled in another process?)") from None


def tree_parents(anc: torch.Tensor) -> torch.Tensor:
    """Parents [B, T] (-1: none) from an ancestor-or-self matrix anc [B, T, T] bool: the parent
    is the deepest strict ancestor."""
    T = anc.shape[-1]
    strict = anc & ~torch.eye(T, dtype=torch.bool, device=anc.device)
    depth = anc.sum(-1) - 1  # [B, T]
    score = torch.where(strict, depth[:, None, :], -1)
    return torch.where(strict.any(-1), score.argmax(-1), -1)


def prune_keep(early_logits: torch.Tensor | Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor,
               anc: torch.Tensor, topk: int, vocab: torch.Tensor | None = None) -> torch.Tensor:
    """keep [B, T] bool: node c survives iff every node on its root path (root excluded) has its
    token in the top-k of its parent's early logits; node 0 (the root) always survives, parentless
    nodes elsewhere (batch padding) never. Ancestor-closed by construction.

    `early_logits` is [B, T, V], or a callable mapping the hidden rows of the nodes that have
    children to their logits (`rows` [M] flat indices into B*T -> [M, V]), so leaves cost nothing.
    Membership is a rank test, rank = #logits strictly above token(c)'s (no sort: O(V) per node;
    exact ties count as inside the top-k). With `vocab` [S] the logits score only those tokens
    (a shortlist head): the rank is taken among them and a token outside the shortlist always
    passes (no evidence against it), so recall is never below the full-vocabulary test's."""
    B, T = tokens.shape
    parents = tree_parents(anc)
    has_parent = parents >= 0
    flat_parent = (torch.arange(B, device=tokens.device)[:, None] * T + parents.clamp(min=0)).flatten()
    if callable(early_logits):
        rows = torch.unique(flat_parent[has_parent.flatten()])
        logits = early_logits(rows)  # [M, V]
        where = torch.searchsorted(rows, flat_parent).clamp(max=max(len(rows) - 1, 0))
    else:
        logits = early_logits.reshape(B * T, -1)
        where = flat_parent
    member = torch.zeros(B * T, dtype=torch.bool, device=tokens.device)
    child = has_parent.flatten().nonzero().flatten()
    if len(child):
        parent_logits = logits[where[child]]  # [C, V] (or [C, S])
        col = tokens.flatten()[child]
        if vocab is not None:
            lookup = torch.full((int(max(vocab.max(), col.max())) + 1,), -1, dtype=torch.long, device=col.device)
            lookup[vocab] = torch.arange(len(vocab), device=col.device)
            col = lookup[col]
        own = parent_logits.gather(1, col.clamp(min=0)[:, None])
        member[child] = ((parent_logits > own).sum(-1) < topk) | (col < 0)
    member = member.view(B, T)
    member[:, 0] = True
    return ~(anc & ~member[:, None, :]).any(-1)


def survivor_index(keep: torch.Tensor) -> torch.Tensor:
    """idx [B, n]: per row the kept nodes in order, then its first pruned nodes; n = max kept."""
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    n = int(keep.sum(1).max())
    return order[:, :n].contiguous()


@torch.library.custom_op("propd::keep_reset", mutates_args=("keep",))
def keep_reset(keep: torch.Tensor) -> None:
    """keep[:] = True (no node pruned)."""
    keep.fill_(True)


@keep_reset.register_fake
def _(keep: torch.Tensor) -> None:
    return None


@torch.library.custom_op("propd::prune_decide", mutates_args=())
def prune_decide(hidden: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, predictor: int) -> torch.Tensor:
    """keep [B, T] bool (`prune_keep` with the registered predictor). hidden [B, T, H]: layer-L_e
    output; tokens [B, T]; mask [B, 1, T, KV], bool or additive, its last T columns the tree's
    ancestor matrix."""
    T = tokens.shape[1]
    tree = mask[:, 0, :, mask.shape[-1] - T :]
    anc = tree if tree.dtype == torch.bool else tree == 0
    pred = get_predictor(predictor)
    flat = hidden.reshape(-1, hidden.shape[-1])
    return prune_keep(lambda rows: pred.fn(flat[rows]), tokens, anc, pred.topk, pred.vocab)


@prune_decide.register_fake
def _(hidden: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, predictor: int) -> torch.Tensor:
    return torch.empty_like(tokens, dtype=torch.bool)


@torch.library.custom_op("propd::keep_write", mutates_args=("buf",))
def keep_write(buf: torch.Tensor, keep: torch.Tensor) -> None:
    """buf[:, :T] = keep  (the runtime reads which nodes were pruned from it)."""
    buf[:, : keep.shape[1]] = keep


@keep_write.register_fake
def _(buf: torch.Tensor, keep: torch.Tensor) -> None:
    return None


@torch.library.custom_op("propd::survivors", mutates_args=())
def survivors(keep: torch.Tensor) -> torch.Tensor:
    """`survivor_index(keep)`: [B, n], n = the batch's largest survivor count (data-dependent)."""
    return survivor_index(keep)


@survivors.register_fake
def _(keep: torch.Tensor) -> torch.Tensor:
    n = torch.library.get_ctx().new_dynamic_size(min=1)
    return keep.new_empty((keep.shape[0], n), dtype=torch.long)


@torch.library.custom_op("propd::kv_scatter", mutates_args=("cache",))
def kv_scatter(cache: torch.Tensor, new: torch.Tensor, start: int, idx: torch.Tensor) -> None:
    """cache[b, :, start + idx[b, i]] = new[b, :, i]   (cache [B, H, S, D], new [B, H, n, D])."""
    B, H, n, D = new.shape
    cache.scatter_(2, (idx + start)[:, None, :, None].expand(B, H, n, D), new)


@kv_scatter.register_fake
def _(cache: torch.Tensor, new: torch.Tensor, start: int, idx: torch.Tensor) -> None:
    return None
