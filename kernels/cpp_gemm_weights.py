"""Inductor's C++ GEMM template keeps one copy of a frozen weight: its packed one.

When the template wins a linear layer it packs the frozen weight into its blocked layout as a new
constant, and Inductor's `prune_tensors` is meant to drop the original when nothing else reads
it. In an exported program it never does: the weight reaches the GEMM through a view (the
transpose `F.linear` lowers to, `permute(W) -> mm`), which it does not consider, and the weight's
`get_attr` target is the parameter's dotted path, which it compares with the constant's
underscored name. So a package carried every decoder weight twice and loaded (and extracted to a
temporary directory) both copies: SmolLM2-135M's package was 1.08 GB instead of 0.65 GB.

`pruned_gemm_weights()` drops such an original too, when the same proof holds: no other constant
and no other `get_attr` shares its storage (a tied embedding keeps its weight), and its one
`get_attr` reaches one consumer, the GEMM, through view ops each used once.
"""
from __future__ import annotations

import contextlib
import logging
import operator
from collections.abc import Iterator

import torch

log = logging.getLogger("propd_compile.kernels.cpp_gemm_weights")

_VIEWS = {
    torch.ops.aten.permute.default, torch.ops.aten.t.default, torch.ops.aten.transpose.int,
    torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default,
}


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.is_mkldnn or b.is_mkldnn:
        return a is b
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _single_consumer(node: torch.fx.Node) -> bool:
    """`node` reaches exactly one non-view node, through views that each have one user."""
    while len(node.users) == 1:
        (node,) = node.users
        if node.op != "call_function" or node.target not in _VIEWS:
            return True
    return False


def _attr(module: torch.nn.Module, target: str):
    try:
        return operator.attrgetter(target)(module)
    except AttributeError:
        return None


def prune_viewed_weights(input_nodes: list, new_input_nodes: list) -> int:
    """Drop the constants among `input_nodes` (a GEMM's inputs before packing) that the packed
    `new_input_nodes` replace and nothing else reads; returns how many were dropped."""
    from torch._inductor.virtualized import V

    graph = V.graph
    new_names = {n.get_name() for n in new_input_nodes if hasattr(n, "get_name")}
    dropped = 0
    for node in input_nodes:
        name = node.get_name() if hasattr(node, "get_name") else None
        if name is None or name in new_names or name not in graph.constants:
            continue
        weight = graph.constants[name]
        if any(other != name and _shares_storage(weight, t) for other, t in graph.constants.items()):
            continue
        readers = [
            n for n in graph.graph.nodes
            if n.op == "get_attr" and isinstance(t := _attr(graph.module, n.target), torch.Tensor) and _shares_storage(weight, t)
        ]
        if len(readers) != 1 or not _single_consumer(readers[0]):
            log.debug("kept %s: %d readers of its storage", name, len(readers))
            continue
        del graph.constants[name]
        dropped += 1
    return dropped


@contextlib.contextmanager
def pruned_gemm_weights() -> Iterator[None]:
    """Compile under this to also prune the originals Inductor's own pruning misses."""
    import torch._inductor.lowering  # noqa: F401  (the template module imports lowering first)
    from torch._inductor.codegen import cpp_gemm_template

    inductor_prune = cpp_gemm_template.prune_tensors

    def prune(input_nodes, new_input_nodes):
        inductor_prune(input_nodes, new_input_nodes)
        from torch._dynamo.utils import counters

        counters["propd"]["gemm_weights_pruned"] += prune_viewed_weights(input_nodes, new_input_nodes)

    cpp_gemm_template.prune_tensors = prune
    try:
        yield
    finally:
        cpp_gemm_template.prune_tensors = inductor_prune
