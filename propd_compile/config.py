"""The knobs of a ProPD decoder, in one dataclass."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class ProPDConfig:
    """How `accelerate`d models decode.

    tree:            "ngram" (a dynamic tree from the drafters: n-gram drafts from the prompt and
                     generated text, fused with draft heads when present), "chain" (a single n-gram
                     continuation, no branching) or "medusa" (Medusa's static sparse tree from the
                     heads' calibrated per-rank accuracies, filled with each step's head top-k).
    max_tree_nodes:  node budget per row and step, root included (1 = plain greedy decoding).
    max_depth:       longest draft path below the root.
    drafters:        names of the drafters whose trees are merged ("ngram", "heads"); None (default):
                     ("heads", "ngram") when draft heads are available for the model, else ("ngram",).
    heads:           directory of draft heads (`propd train-heads`); None: heads shipped for the
                     model, if any (see propd_compile/data/heads).
    heads_topk:      candidates per head (depth) in the dynamic heads tree.
    ngram_max:       longest suffix n-gram the n-gram drafter matches.
    compile:         run the verification forward through `torch.compile(backend="propd")`.
    backend_options: options handed to the propd backend (see `propd_compile.backend`).
    acceptance:      how sampled decoding (`do_sample=True`) accepts drafts. "exact" (default):
                     multi-draft speculative sampling, the output follows the model's sampling
                     distribution exactly. "typical": Medusa's typical acceptance, LOSSY: a drafted
                     token x is accepted if p(x) > min(posterior_threshold, posterior_alpha *
                     exp(-entropy(p))), p the sampling distribution (temperature, top-k, top-p
                     applied); more tokens per step, but the output distribution changes
                     (over-represents likely drafted tokens). Greedy decoding ignores it.
    posterior_threshold, posterior_alpha: the typical-acceptance bar (Medusa's defaults).
    """

    tree: str = "ngram"
    max_tree_nodes: int = 16
    max_depth: int = 6
    drafters: tuple[str, ...] | None = None
    ngram_max: int = 4
    compile: bool = False
    backend_options: dict[str, Any] = field(default_factory=dict)
    acceptance: str = "exact"
    posterior_threshold: float = 0.09
    posterior_alpha: float = 0.3
    heads: str | None = None
    heads_topk: int = 8

    def __post_init__(self) -> None:
        if self.tree not in ("ngram", "chain", "medusa"):
            raise ValueError(f"ProPDConfig.tree={self.tree!r} is not supported; use 'ngram', 'chain' or 'medusa'")
        if self.max_tree_nodes < 1:
            raise ValueError("ProPDConfig.max_tree_nodes must be >= 1 (1 means plain greedy decoding)")
        if self.max_depth < 0:
            raise ValueError("ProPDConfig.max_depth must be >= 0")
        if self.ngram_max < 1:
            raise ValueError("ProPDConfig.ngram_max must be >= 1")
        if self.acceptance not in ("exact", "typical"):
            raise ValueError(f"ProPDConfig.acceptance={self.acceptance!r} is not supported; use 'exact' or 'typical'")
        if not (0 <= self.posterior_threshold <= 1 and self.posterior_alpha >= 0):
            raise ValueError("ProPDConfig needs 0 <= posterior_threshold <= 1 and posterior_alpha >= 0")
        if self.heads_topk < 1:
            raise ValueError("ProPDConfig.heads_topk must be >= 1")
        if self.drafters is not None and not self.drafters:
            raise ValueError("ProPDConfig.drafters is empty; name at least one drafter, or None for the default")
        known = {"ngram", "heads"}
        unknown = [d for d in (self.drafters or ()) if d not in known]
        if unknown:
            raise ValueError(f"unknown drafters {unknown}; available: {sorted(known)}")

    def with_(self, **changes: Any) -> "ProPDConfig":
        return replace(self, **changes)
