"""Custom ops the propd backend emits: tree attention, runtime-owned KV-cache writes and
block-format linears (`block_linear`, a C++ kernel built on first use)."""
# This folder installs as `propd_compile.kernels`. Run from the source root, it is also visible
# as a top-level `kernels`, which transformers probes for the unrelated HF `kernels` package;
# stay inert under that name so the probe imports nothing.
if __name__ == "propd_compile.kernels":
    from propd_compile.kernels.early_prune import keep_reset, keep_write, kv_scatter, prune_decide, survivors
    from propd_compile.kernels.kv_write import kv_write
    from propd_compile.kernels.tree_attention import tree_attention, tree_attention_reference

    __all__ = ["keep_reset", "keep_write", "kv_scatter", "kv_write", "prune_decide", "survivors", "tree_attention", "tree_attention_reference"]
