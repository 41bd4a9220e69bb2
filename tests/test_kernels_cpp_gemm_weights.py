"""A compiled package carries no constant its code never reads: the C++ GEMM template's packed
weights replace the originals instead of sitting beside them."""
import re
import zipfile

import torch

from propd_compile.kernels.cpp_gemm_weights import _single_consumer
from propd_compile.runtime_compile import package_key


def _wrapper_source(package) -> str:
    with zipfile.ZipFile(package) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".wrapper.cpp")]
        return z.read(name).decode()


def test_every_constant_of_the_package_is_read_by_its_code(compiled_llama):
    model, config = compiled_llama
    source = _wrapper_source(package_key(model, config).path())
    names = re.findall(r'constants_info_\[\d+\]\.name = "(\w+)";', source)
    assert names, "no constants found in the package's wrapper"
    code = "\n".join(l for l in source.splitlines() if "constants_info_[" not in l and "constants_->at(" not in l)
    unread = [n for n in names if not re.search(rf"\b{n}\b", code)]
    assert not unread, f"the package carries constants no kernel reads: {unread[:5]}"


def _weight_node(forward) -> torch.fx.Node:
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(6, 4))

        def forward(self, x):
            return forward(self, x)

    gm = torch.fx.symbolic_trace(M())
    (node,) = [n for n in gm.graph.nodes if n.op == "get_attr"]
    return node


def test_a_weight_counts_as_the_gemms_alone_only_when_no_other_node_reads_it():
    """The proof behind pruning: the weight's get_attr reaches one consumer through views."""
    aten = torch.ops.aten
    only = _weight_node(lambda self, x: aten.mm.default(x, aten.permute.default(self.w, [1, 0])))
    tied = _weight_node(lambda self, x: (aten.mm.default(x, aten.permute.default(self.w, [1, 0])), aten.embedding.default(self.w, x)))
    shared_view = _weight_node(
        lambda self, x: (lambda t: (aten.mm.default(x, t), aten.sum.default(t)))(aten.permute.default(self.w, [1, 0]))
    )
    unused = _weight_node(lambda self, x: (self.w, x)[1])
    assert _single_consumer(only)
    assert not _single_consumer(tied) and not _single_consumer(shared_view) and not _single_consumer(unused)
