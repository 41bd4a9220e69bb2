"""Insert ProPD's early-prune point after decoder layer L_e, so layers L_e+1..L run on survivors.

Rewrite (torch-level Dynamo graph, captured with a symbolic tree size T)::

    h = <last node of layer L_e>                              # [B, T, H]
    idx = prune_point(h, input_ids, mask, keep, id, T)      # [B, n], n data-dependent (unbacked):
          propd::prune_decide -> propd::keep_write(keep) -> propd::survivors
    x' = gather(x, idx, d)     for every tensor x computed up to layer L_e and used after it
                               with the token dim T at d: the residual stream, rotary cos/sin,
                               the mask's rows (its columns stay: the KV layout is unchanged)
    T  -> n                    in every size argument after the prune point (view/reshape)
    propd::kv_write(c, k, W)  -> propd::kv_scatter(c, k, W, idx) in the deep layers
    out -> scatter(out, idx, T, d)   for every graph output with a token dim: the output shape
                               stays [B, T, ...] (Dynamo's contract); rows not in idx are zeros

`propd::prune_decide` (kernels/early_prune.py) takes the early logits of the predictor registered
under `id` (trained early head or logit lens), keeps node c iff token(c) is in the top-k of its
parent's early logits and its parent is kept, and writes the keep mask into the runtime-owned
`cache.keep` (the input of the graph's `propd::keep_reset`); decoding never accepts a node
marked pruned, and the bonus token is the argmax after the last accepted (kept) node, so the
output is unchanged. The kept set is ancestor-closed, so survivors never attend to a pruned
node's deep-layer K/V. Batches: rows are padded to the batch's largest survivor count with their
own pruned nodes, which run the deep layers but stay marked pruned.

Data-dependent size: one graph with an unbacked size n. Measured options
(../shared/research/compile-backend.md §4, torch 2.13 CPU): (a) an unbacked size in one graph
compiled once and ran every survivor count with 0 recompiles and exact results; (b) a graph
split ran correctly too but adds a Python hop and a graph boundary per prune point and splits
the other passes' view of the graph; (c) buckets compile one static graph per bucket (~6 s each
on a 2-layer toy, minutes each on SmolLM2) and still compute up to the bucket's size. Here (a)
is re-checked on HF models: tests/test_pass_early_prune.py runs trees of 2-12 nodes, batches of
2-3 and k from 1 to the vocabulary through one compiled graph with no recompile, and the sweep
(BENCHMARKS.md, "Early pruning") measures the step latency it buys. Buckets remain the choice
for CUDA graphs, which this runtime does not use.

Precondition (anything not proven leaves the graph unchanged and is logged with the reason):
  * a `propd::keep_reset` node (the runtime's TreeKVCache) and exactly one token-id input, found
    as the input of the embedding whose weight has the output's vocabulary size; its size T is
    symbolic (a root-only T = 1 graph is left alone: the prune point is the identity there);
  * decoder layers found structurally: the `nn_module_stack` prefix `P` with the most indexed
    children `P.0 .. P.{L-1}`; layer L_e < L - 1 and every node of layers <= L_e precedes the
    first node of a later layer;
  * every value crossing the prune point is a tensor without a T dim, a tensor with exactly one
    T dim (not dim 0) and a batch-or-1 dim 0, the size T itself, or a size expression in T used
    only as a `propd::kv_write` start; the attentions after it read one mask [B, 1, T, KV];
  * no in-place method (`*_`) after the prune point, and every graph output computed after it
    has exactly one T dim.
Idempotent: a graph that already has a prune point is left alone.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

import propd_compile.kernels  # noqa: F401  (registers torch.ops.propd.*)
from propd_compile.passes import PassReport
from propd_compile.passes.tree_attention import SDPA_TARGETS

log = logging.getLogger("propd_compile.passes.early_prune")

NAME = "early_prune"

# Dynamo records custom ops as the packet (torch.ops.propd.kv_write), passes may use .default.
_KEEP_RESET = (torch.ops.propd.keep_reset, torch.ops.propd.keep_reset.default)
_PRUNE = (torch.ops.propd.prune_decide, torch.ops.propd.prune_decide.default)
_KV_WRITE = (torch.ops.propd.kv_write, torch.ops.propd.kv_write.default)
_KV_SCATTER = torch.ops.propd.kv_scatter.default
_TREE_ATTENTION = (torch.ops.propd.tree_attention, torch.ops.propd.tree_attention.default)
_EMBEDDINGS = (F.embedding, torch.embedding, torch.ops.aten.embedding.default)
_INDEXED = re.compile(r"^(.*)\.(\d+)$")


class _Skip(Exception):
    """Reason the graph is left untouched."""


def prune_point(hidden: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor,
                predictor: int, T: int) -> torch.Tensor:
    """The prune ops plus the bounds Inductor needs on the unbacked survivor count (1 <= n <= T)."""
    kept = torch.ops.propd.prune_decide(hidden, tokens, mask, predictor)
    torch.ops.propd.keep_write(keep, kept)
    idx = torch.ops.propd.survivors(kept)
    torch._check(idx.shape[1] >= 1)
    torch._check(idx.shape[1] <= T)
    return idx


def gather_tokens(x: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    """x[b, ..., idx[b, i], ...] along the token dim `dim` (dim 0 of x: batch or broadcast 1)."""
    xm = x.movedim(dim, 1)
    xm = xm.expand(idx.shape[0], *xm.shape[1:])
    index = idx.reshape(idx.shape[0], idx.shape[1], *([1] * (xm.dim() - 2))).expand(idx.shape[0], idx.shape[1], *xm.shape[2:])
    return xm.gather(1, index).movedim(1, dim)


def scatter_tokens(y: torch.Tensor, idx: torch.Tensor, T: int, dim: int) -> torch.Tensor:
    """The inverse of `gather_tokens` onto T rows; rows not in idx are zero."""
    ym = y.movedim(dim, 1)
    out = ym.new_zeros(ym.shape[0], T, *ym.shape[2:])
    index = idx.reshape(idx.shape[0], idx.shape[1], *([1] * (ym.dim() - 2))).expand(ym.shape)
    return out.scatter(1, index, ym).movedim(1, dim)


def _val(node: Any) -> Any:
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, torch.fx.Node) else None


def _expr(x: Any) -> Any:
    return x.node.expr if isinstance(x, torch.SymInt) else None


def _has(sym: Any, x: Any) -> bool:
    e = _expr(x)
    return e is not None and sym in e.free_symbols


def _is_tok(sym: Any, x: Any) -> bool:
    return _expr(x) == sym


def _layer_index(graph: torch.fx.Graph) -> dict[torch.fx.Node, int]:
    """Decoder-layer index of each computing node, from the `nn_module_stack` prefix with the
    most indexed children (`model.layers.3`, `transformer.h.3`, ...)."""
    children: dict[str, set[int]] = {}
    stacks: dict[torch.fx.Node, list[str]] = {}
    for node in graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        paths = [v[0] if isinstance(v, tuple) else str(v) for v in node.meta.get("nn_module_stack", {}).values()]
        stacks[node] = paths
        for p in paths:
            m = _INDEXED.match(p)
            if m:
                children.setdefault(m.group(1), set()).add(int(m.group(2)))
    if not children:
        raise _Skip("no nn_module_stack with indexed layers")
    prefix = max(children, key=lambda p: len(children[p]))
    if children[prefix] != set(range(len(children[prefix]))):
        raise _Skip(f"layers under {prefix!r} are not numbered 0..L-1")
    out = {}
    for node, paths in stacks.items():
        for p in paths:
            m = _INDEXED.match(p)
            if m and m.group(1) == prefix:
                out[node] = int(m.group(2))
                break
    return out


def _tokens_input(graph: torch.fx.Graph, outputs: list[Any]) -> torch.fx.Node:
    first = _val(outputs[0]) if outputs else None
    if not isinstance(first, torch.Tensor) or first.dim() < 1:
        raise _Skip("first graph output is not a tensor (logits)")
    vocab = first.shape[-1]
    found = set()
    for node in graph.nodes:
        if node.op == "call_function" and node.target in _EMBEDDINGS and len(node.args) >= 2:
            w = _val(node.args[1])
            if isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[0] == vocab:
                found.add(node.args[0])
    if len(found) != 1:
        raise _Skip(f"{len(found)} token-embedding inputs (need exactly one)")
    tokens = found.pop()
    tv = _val(tokens)
    if not isinstance(tv, torch.Tensor) or tv.dim() != 2:
        raise _Skip("token ids are not a [B, T] tensor")
    return tokens


class _Plan:
    """What `_apply` does; built by `_plan`, which raises _Skip instead of returning a partial plan."""

    def __init__(self) -> None:
        self.boundary: torch.fx.Node
        self.tokens: torch.fx.Node
        self.mask: torch.fx.Node
        self.keep: torch.fx.Node
        self.gathers: dict[torch.fx.Node, int] = {}  # upstream tensor -> token dim
        self.token_sizes: list[torch.fx.Node] = []  # upstream nodes whose value is T
        self.kv_writes: list[torch.fx.Node] = []
        self.outputs: dict[torch.fx.Node, int] = {}  # downstream output -> token dim


def _plan(gm: torch.fx.GraphModule, layer: int) -> _Plan:
    graph = gm.graph
    nodes = list(graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    plan = _Plan()
    if any(n.op == "call_function" and (n.target in _PRUNE or n.target is prune_point) for n in nodes):
        raise _Skip("the graph already has a prune point")
    resets = [n for n in nodes if n.op == "call_function" and n.target in _KEEP_RESET]
    if len(resets) != 1:
        raise _Skip(f"{len(resets)} propd::keep_reset nodes (need one: the runtime's TreeKVCache)")
    plan.keep = resets[0].args[0]
    out_node = nodes[-1]
    outputs = list(out_node.args[0]) if isinstance(out_node.args[0], (tuple, list)) else [out_node.args[0]]
    plan.tokens = _tokens_input(graph, outputs)
    tv = _val(plan.tokens)
    B, T = tv.shape
    sym = _expr(T)
    if sym is None or not sym.is_Symbol:
        raise _Skip(f"token dim is not a plain symbol ({T}): not a tree-verification graph")
    batch_sym = _expr(B)

    layer_of = _layer_index(graph)
    num_layers = max(layer_of.values()) + 1
    if not 0 <= layer < num_layers - 1:
        raise _Skip(f"prune layer {layer} outside 0..{num_layers - 2} ({num_layers} layers)")
    plan.boundary = max((n for n, i in layer_of.items() if i == layer), key=pos.__getitem__)
    first_deep = min((n for n, i in layer_of.items() if i > layer), key=pos.__getitem__)
    if pos[first_deep] <= pos[plan.boundary]:
        raise _Skip(f"layer {layer} and later layers interleave")
    if any(i <= layer and pos[n] > pos[plan.boundary] for n, i in layer_of.items()):
        raise _Skip(f"nodes of layers <= {layer} after layer {layer} ends")
    hv = _val(plan.boundary)
    if not (isinstance(hv, torch.Tensor) and hv.dim() == 3 and _is_tok(sym, hv.shape[1]) and hv.dtype.is_floating_point):
        raise _Skip(f"layer {layer} does not end in a [B, T, H] float tensor")

    upstream = set(nodes[: pos[plan.boundary] + 1])
    downstream = [n for n in nodes[pos[plan.boundary] + 1 :] if n.op != "output"]
    masks = set()
    for node in downstream:
        if node.op == "placeholder":
            raise _Skip("placeholder after the prune point")
        if node.op == "call_method" and str(node.target).endswith("_"):
            raise _Skip(f"in-place {node.target} after the prune point ({node.name})")
        if node.op == "call_function" and node.target in _KV_WRITE:
            plan.kv_writes.append(node)
        if node.op == "call_function" and node.target in _TREE_ATTENTION:
            masks.add(node.args[3] if len(node.args) > 3 else None)
        elif node.op == "call_function" and node.target in SDPA_TARGETS:
            masks.add(node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None))
        for inp in node.all_input_nodes:
            if inp not in upstream:
                continue
            v = _val(inp)
            if isinstance(v, torch.Tensor):
                dims = [d for d, s in enumerate(v.shape) if _has(sym, s)]
                if not dims:
                    continue
                if len(dims) != 1 or dims[0] == 0 or not _is_tok(sym, v.shape[dims[0]]):
                    raise _Skip(f"{inp.name} {tuple(v.shape)}: token dim not provable")
                if not (v.shape[0] == 1 or (batch_sym is not None and _expr(v.shape[0]) == batch_sym) or v.shape[0] == B):
                    raise _Skip(f"{inp.name} {tuple(v.shape)}: dim 0 is not the batch")
                plan.gathers[inp] = dims[0]
            elif isinstance(v, torch.SymInt) and _has(sym, v):
                if _is_tok(sym, v):
                    plan.token_sizes.append(inp)
                elif not (node.target in _KV_WRITE and node.args[2] is inp and inp not in node.args[:2]):
                    raise _Skip(f"{node.name} uses {inp.name} = {v}, a size in T other than T")
            elif isinstance(v, (tuple, list, torch.Size)) and any(_has(sym, s) for s in v):
                raise _Skip(f"{node.name} uses the size tuple {inp.name} from before the prune point")
    if len(masks) != 1 or None in masks:
        raise _Skip(f"attentions after the prune point read {len(masks)} masks (need one)")
    plan.mask = masks.pop()
    mv = _val(plan.mask)
    if not (isinstance(mv, torch.Tensor) and mv.dim() == 4 and _is_tok(sym, mv.shape[2]) and plan.mask in plan.gathers):
        raise _Skip("the attention mask is not a [B, 1, T, KV] input of the deep layers")
    for o in outputs:
        if o is None or not isinstance(o, torch.fx.Node) or o in upstream:
            continue
        v = _val(o)
        dims = [d for d, s in enumerate(v.shape) if _has(sym, s)] if isinstance(v, torch.Tensor) else []
        if len(dims) != 1 or dims[0] == 0 or not _is_tok(sym, v.shape[dims[0]]):
            raise _Skip(f"output {o.name} has no single token dim")
        plan.outputs[o] = dims[0]
    return plan


def _apply(gm: torch.fx.GraphModule, plan: _Plan, predictor: int) -> int:
    graph = gm.graph
    downstream_start = plan.boundary.next
    deep = []
    node = downstream_start
    while node.op != "output":
        deep.append(node)
        node = node.next
    with graph.inserting_after(plan.boundary):
        T = graph.call_function(torch.ops.aten.sym_size.int, (plan.tokens, 1))
    with graph.inserting_after(T):
        idx = graph.call_function(prune_point, (plan.boundary, plan.tokens, plan.mask, plan.keep, predictor, T))
    with graph.inserting_after(idx):
        n = graph.call_function(torch.ops.aten.sym_size.int, (idx, 1))
    replace: dict[torch.fx.Node, torch.fx.Node] = {s: n for s in plan.token_sizes}
    last = n
    for x, dim in plan.gathers.items():
        with graph.inserting_after(last):
            last = graph.call_function(gather_tokens, (x, idx, dim))
        replace[x] = last
    for node in deep:
        for old, new in replace.items():
            node.replace_input_with(old, new)
    rewritten = 0
    for w in plan.kv_writes:
        with graph.inserting_before(w):
            s = graph.call_function(_KV_SCATTER, (w.args[0], w.args[1], w.args[2], idx))
        s.meta = dict(w.meta)
        graph.erase_node(w)
        rewritten += 1
    out_node = next(iter(reversed(graph.nodes)))
    for o, dim in plan.outputs.items():
        with graph.inserting_before(out_node):
            s = graph.call_function(scatter_tokens, (o, idx, T, dim))
        out_node.replace_input_with(o, s)
        rewritten += 1
    graph.lint()
    gm.recompile()
    return rewritten + len(plan.gathers) + 1


def early_prune_pass(gm: torch.fx.GraphModule, options: Mapping[str, Any] | None = None) -> PassReport:
    """Insert one prune point per `options["prune"] = {"layer": L_e, "predictor": id}`; see the
    module docstring. Without that option the pass is disabled."""
    cfg = (options or {}).get("prune")
    if not cfg:
        return PassReport(name=NAME, enabled=False)
    report = PassReport(name=NAME)
    try:
        plan = _plan(gm, int(cfg["layer"]))
    except _Skip as why:
        report.skipped.append(("graph", str(why)))
        log.info("early_prune: graph left unchanged: %s", why)
        return report
    report.rewritten = _apply(gm, plan, int(cfg["predictor"]))
    # The survivor count is an op output size: let this compile's ShapeEnv allocate it.
    shape_env = getattr(getattr(_val(plan.tokens), "fake_mode", None), "shape_env", None)
    if shape_env is not None and not shape_env.allow_dynamic_output_shape_ops:
        shape_env.settings = dataclasses.replace(shape_env.settings, allow_dynamic_output_shape_ops=True)
    log.debug("early_prune: prune point after %s; %d gathers, %d kv writes, %d outputs", plan.boundary.name,
              len(plan.gathers), len(plan.kv_writes), len(plan.outputs))
    return report


__all__ = ["NAME", "early_prune_pass", "gather_tokens", "prune_point", "scatter_tokens"]
