"""Custom ops the propd backend emits: tree attention and runtime-owned KV-cache writes."""
# This folder installs as `propd_compile.kernels`. Run from the source root, it is also visible
# as a top-level `kernels`, which transformers probes for the unrelated HF `kernels` package;
# stay inert under that name so the probe imports nothing.
if __name__ == "propd_compile.kernels":
    from propd_compile.kernels.kv_write import kv_write
    from propd_compile.kernels.tree_attention import tree_attention, tree_attention_reference

    __all__ = ["kv_write", "tree_attention", "tree_attention_reference"]
