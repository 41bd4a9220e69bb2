"""Rewrite scaled-dot-product attention into `propd::tree_attention`, folding GQA `repeat_kv`.

Rewrite (torch-level Dynamo graph; Inductor fx_passes style)::

    sdpa(q, k, v, attn_mask=m, dropout_p=0.0, is_causal=False, scale=s, enable_gqa=g)
        -> torch.ops.propd.tree_attention.default(q, k', v', m, s')

    s' = s if s is not None else 1 / sqrt(q.shape[-1])
    k' = x  if k is HF's repeat_kv(x) = x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h*n, s, d)
            (same for v'), so K/V are read once with Hkv heads; otherwise k' = k.

Precondition (checked per node from constant arguments and `meta["example_value"]`; anything
not proven is left untouched and logged with the reason, INFO on
`propd_compile.passes.tree_attention`):
  * dropout_p is the constant 0, is_causal is the constant False, enable_gqa is a constant
    bool, no other kwargs; scale is a Python number, None (with a concrete head dim), or a graph
    scalar (Dynamo's SymFloat `.item()` of a module float under dynamic=True);
  * q, k, v are 4-D tensors of one floating dtype; attn_mask is None or a tensor of at most
    4 dims that is bool or has q's dtype (additive);
  * head counts: without enable_gqa, q, k, v have the same number of heads; with it, k and v
    have the same number of heads and it divides q's.
Under these conditions `propd::tree_attention` (exactly SDPA with enable_gqa=True) computes the
same values. A `repeat_kv` is folded only when the node chain and the shapes prove it
(unsqueeze at dim 2, expand of that dim only, reshape merging dims 1 and 2), and only for K and
V together; the nodes it orphans (and their pure size arithmetic) are erased, nothing else.
The pass is idempotent: a second run finds no SDPA node it can rewrite and changes nothing.
"""
from __future__ import annotations

import logging
import math
import operator
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

import propd_compile.kernels  # noqa: F401  (registers torch.ops.propd.*)
from propd_compile.passes import PassReport

log = logging.getLogger("propd_compile.passes.tree_attention")

NAME = "tree_attention"

SDPA_TARGETS = tuple(
    {
        torch._C._nn.scaled_dot_product_attention,
        F.scaled_dot_product_attention,
        torch.ops.aten.scaled_dot_product_attention.default,
    }
)
# Positional parameters of SDPA; scale and enable_gqa are keyword-only.
_POSITIONAL = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
_KWARGS = {"attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"}
_FULL_SLICE = slice(None, None, None)
# Pure shape arithmetic that HF's repeat_kv computes its expand/reshape sizes with.
_SHAPE_FUNCS = {
    operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv,
    torch.ops.aten.sym_size.int,
}
if hasattr(torch, "sym_sum"):
    _SHAPE_FUNCS.add(torch.sym_sum)


class _Skip(Exception):
    """Reason a node is left untouched."""


def _val(node: Any) -> Any:
    if not isinstance(node, torch.fx.Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))


def _tensor_val(node: Any, what: str) -> torch.Tensor:
    if not isinstance(node, torch.fx.Node):
        raise _Skip(f"{what} is not a graph value ({type(node).__name__})")
    v = _val(node)
    if not isinstance(v, torch.Tensor):
        raise _Skip(f"{what} has no tensor shape metadata")
    return v


def _eq(a: Any, b: Any) -> bool:
    """a == b provably (no guards added)."""
    try:
        return bool(statically_known_true(a == b))
    except Exception:  # pragma: no cover - exotic symbolic expressions
        return False


def _same_shape(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(_eq(x, y) for x, y in zip(a, b))


def _concrete_int(x: Any) -> int | None:
    if isinstance(x, int):
        return x
    if isinstance(x, torch.SymInt):
        from torch.fx.experimental.symbolic_shapes import is_concrete_int

        return int(x) if is_concrete_int(x) else None
    return None


def _bind(node: torch.fx.Node) -> dict[str, Any]:
    if len(node.args) > len(_POSITIONAL):
        raise _Skip(f"{len(node.args)} positional args")
    unknown = sorted(set(node.kwargs) - _KWARGS)
    if unknown:
        raise _Skip(f"unknown kwargs {unknown}")
    bound = dict(zip(_POSITIONAL, node.args))
    for k, v in node.kwargs.items():
        if k in bound:
            raise _Skip(f"{k} given twice")
        bound[k] = v
    if not all(k in bound for k in ("query", "key", "value")):
        raise _Skip("missing query/key/value")
    return bound


def _const(bound: Mapping[str, Any], name: str, default: Any, types: tuple[type, ...]) -> Any:
    v = bound.get(name, default)
    if isinstance(v, torch.fx.Node):
        raise _Skip(f"non-constant {name}")
    if not isinstance(v, types):
        raise _Skip(f"{name} of type {type(v).__name__}")
    return v


def _is_repeat_kv_index(idx: Any) -> bool:
    """x[:, :, None] / x[:, :, None, :, :]  (a 4-D x gets a new dim 2)."""
    if not isinstance(idx, tuple) or not 3 <= len(idx) <= 5:
        return False
    return idx[0] == _FULL_SLICE and idx[1] == _FULL_SLICE and idx[2] is None and all(
        i == _FULL_SLICE for i in idx[3:]
    )


def _match_repeat_kv(r: Any) -> tuple[torch.fx.Node, list[torch.fx.Node]] | None:
    """If `r` = x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h*n, s, d), return (x, [r, e, g])."""
    if not (isinstance(r, torch.fx.Node) and r.op == "call_method" and r.target == "reshape"):
        return None
    e = r.args[0] if r.args else None
    if not (isinstance(e, torch.fx.Node) and e.op == "call_method" and e.target == "expand"):
        return None
    g = e.args[0] if e.args else None
    if not (isinstance(g, torch.fx.Node) and g.op == "call_function" and g.target is operator.getitem):
        return None
    if len(g.args) != 2 or g.kwargs or e.kwargs or r.kwargs or not _is_repeat_kv_index(g.args[1]):
        return None
    x = g.args[0]
    xv, gv, ev, rv = _val(x), _val(g), _val(e), _val(r)
    if not all(isinstance(t, torch.Tensor) for t in (xv, gv, ev, rv)):
        return None
    if xv.dim() != 4 or gv.dim() != 5 or ev.dim() != 5 or rv.dim() != 4:
        return None
    b, h, s, d = xv.shape
    n = ev.shape[2]
    if not (_same_shape(tuple(gv.shape), (b, h, 1, s, d)) and _same_shape(tuple(ev.shape), (b, h, n, s, d))):
        return None
    # Row-major reshape of [b, h, n, s, d] to [b, h*n, s, d] merges dims 1 and 2: head j of r is
    # head j // n of x, which is tree_attention's GQA mapping.
    if not _same_shape(tuple(rv.shape), (b, h * n, s, d)):
        return None
    if not (xv.dtype == rv.dtype and xv.device == rv.device):
        return None
    return x, [r, e, g]


def _erase_orphans(graph: torch.fx.Graph, candidates: list[torch.fx.Node]) -> int:
    """Erase candidates left without users, then the pure size arithmetic only they used."""
    erased = 0
    seen: set[torch.fx.Node] = set()
    work = list(candidates)
    while work:
        node = work.pop(0)
        if node in seen or node.users or node.op in ("placeholder", "output", "get_attr"):
            continue
        seen.add(node)
        inputs = [a for a in node.all_input_nodes]
        graph.erase_node(node)
        erased += 1
        for a in inputs:
            if a in seen or a.users:
                continue
            val = _val(a)
            pure_size = (a.op == "call_method" and a.target == "size") or (
                a.op == "call_function" and a.target in _SHAPE_FUNCS and not isinstance(val, torch.Tensor)
                and isinstance(val, (int, torch.SymInt, torch.Size, tuple))
            )
            if pure_size:
                work.append(a)
    return erased


def _heads(t: torch.Tensor) -> Any:
    return t.shape[1]


def _plan(node: torch.fx.Node) -> tuple[tuple, list[torch.fx.Node]]:
    """Return (new op args, repeat_kv nodes that may become orphaned) or raise _Skip."""
    bound = _bind(node)
    dropout_p = _const(bound, "dropout_p", 0.0, (int, float))
    if dropout_p != 0:
        raise _Skip(f"dropout_p={dropout_p}")
    is_causal = _const(bound, "is_causal", False, (bool,))
    if is_causal:
        raise _Skip("is_causal=True")
    enable_gqa = _const(bound, "enable_gqa", False, (bool,))
    scale = bound.get("scale")
    if isinstance(scale, torch.fx.Node):
        # Dynamo under dynamic=True reads module float attributes (HF's `self.scaling`) as
        # `tensor.item()` SymFloats; the op takes the same runtime float SDPA would.
        if not isinstance(_val(scale), (float, int, torch.SymFloat, torch.SymInt)):
            raise _Skip("scale is a graph value without a scalar example value")
    elif not isinstance(scale, (int, float, type(None))) or isinstance(scale, bool):
        raise _Skip(f"scale of type {type(scale).__name__}")

    q = _tensor_val(bound["query"], "query")
    k = _tensor_val(bound["key"], "key")
    v = _tensor_val(bound["value"], "value")
    for name, t in (("query", q), ("key", k), ("value", v)):
        if t.dim() != 4:
            raise _Skip(f"{name} is {t.dim()}-D, not 4-D")
    if not q.dtype.is_floating_point or not (q.dtype == k.dtype == v.dtype):
        raise _Skip(f"q/k/v dtypes {q.dtype}/{k.dtype}/{v.dtype}")

    mask = bound.get("attn_mask")
    if mask is not None:
        m = _tensor_val(mask, "attn_mask")
        if not (m.dtype == torch.bool or m.dtype == q.dtype):
            raise _Skip(f"attn_mask dtype {m.dtype} (query {q.dtype})")
        if m.dim() > 4:
            raise _Skip(f"attn_mask is {m.dim()}-D")

    if scale is None:
        d = _concrete_int(q.shape[-1])
        if d is None or d <= 0:
            raise _Skip("scale=None with a symbolic head dim")
        scale = 1.0 / math.sqrt(d)
    elif not isinstance(scale, torch.fx.Node):
        scale = float(scale)

    hq, hk, hv = _heads(q), _heads(k), _heads(v)
    if enable_gqa:
        if not _eq(hk, hv):
            raise _Skip("enable_gqa with different key/value head counts")
        hk_i, hq_i = _concrete_int(hk), _concrete_int(hq)
        if hk_i is None or hq_i is None or hk_i == 0 or hq_i % hk_i:
            raise _Skip("enable_gqa: cannot prove Hkv divides Hq")
    elif not (_eq(hq, hk) and _eq(hq, hv)):
        raise _Skip("cannot prove q, k, v have the same number of heads")

    key, value = bound["key"], bound["value"]
    orphans: list[torch.fx.Node] = []
    mk, mv = _match_repeat_kv(key), _match_repeat_kv(value)
    if mk is not None and mv is not None:
        # The SDPA checks above proved Hq == Hk (or Hkv | Hq with enable_gqa) and the match proved
        # Hk == h * n, so Hq // h is an integer multiple of n: query head i reads repeated head
        # i // (Hq // Hk) = x head (i // (Hq // Hk)) // n = i // (Hq // h). K and V must agree on h.
        if _eq(_heads(_val(mk[0])), _heads(_val(mv[0]))):
            key, value = mk[0], mv[0]
            orphans = mk[1] + mv[1]
        else:
            log.debug("%s: repeat_kv of K and V with different source head counts; not folded", node.name)
    elif (mk is None) != (mv is None):
        log.debug("%s: repeat_kv on only one of K/V; not folded", node.name)

    return (bound["query"], key, value, mask, scale), orphans


def tree_attention_pass(gm: torch.fx.GraphModule, options: Mapping[str, Any] | None = None) -> PassReport:
    """Rewrite every provable SDPA node of `gm` in place; see the module docstring."""
    report = PassReport(name=NAME)
    graph = gm.graph
    op = torch.ops.propd.tree_attention.default
    orphans: list[torch.fx.Node] = []
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in SDPA_TARGETS:
            continue
        try:
            args, node_orphans = _plan(node)
        except _Skip as why:
            report.skipped.append((node.name, str(why)))
            log.info("tree_attention: left %s untouched: %s", node.name, why)
            continue
        with graph.inserting_before(node):
            new = graph.call_function(op, args)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        orphans.extend(node_orphans)
        report.rewritten += 1
        log.debug("tree_attention: %s -> %s (GQA folded: %s)", node.name, new.name, bool(node_orphans))
    if report.rewritten:
        report.erased = _erase_orphans(graph, orphans)
        graph.lint()
        gm.recompile()
    return report


__all__ = ["NAME", "SDPA_TARGETS", "tree_attention_pass"]
