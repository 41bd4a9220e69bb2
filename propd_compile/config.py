"""The knobs of a ProPD decoder, in one dataclass."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class ProPDConfig:
    """How `accelerate`d models decode.

    tree:            "ngram" (training-free drafts from the prompt and generated text) or "chain"
                     (a single n-gram continuation, no branching).
    max_tree_nodes:  node budget per row and step, root included (1 = plain greedy decoding).
    max_depth:       longest draft path below the root.
    drafters:        names of the drafters whose trees are merged ("ngram").
    ngram_max:       longest suffix n-gram the n-gram drafter matches.
    compile:         run the verification forward through `torch.compile(backend="propd")`.
    backend_options: options handed to the propd backend (see `propd_compile.backend`).
    """

    tree: str = "ngram"
    max_tree_nodes: int = 16
    max_depth: int = 6
    drafters: tuple[str, ...] = ("ngram",)
    ngram_max: int = 4
    compile: bool = False
    backend_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.tree not in ("ngram", "chain"):
            raise ValueError(f"ProPDConfig.tree={self.tree!r} is not supported; use 'ngram' or 'chain'")
        if self.max_tree_nodes < 1:
            raise ValueError("ProPDConfig.max_tree_nodes must be >= 1 (1 means plain greedy decoding)")
        if self.max_depth < 0:
            raise ValueError("ProPDConfig.max_depth must be >= 0")
        if self.ngram_max < 1:
            raise ValueError("ProPDConfig.ngram_max must be >= 1")
        known = {"ngram"}
        unknown = [d for d in self.drafters if d not in known]
        if unknown:
            raise ValueError(f"unknown drafters {unknown}; available: {sorted(known)}")

    def with_(self, **changes: Any) -> "ProPDConfig":
        return replace(self, **changes)
