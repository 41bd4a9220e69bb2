"""The knobs of a ProPD decoder, in one dataclass."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any


TREES = ("dynamic", "fixed", "chain", "medusa")


@dataclass(frozen=True)
class ProPDConfig:
    """How `accelerate`d models decode.

    tree:            "dynamic" (default; ProPD's dynamic tree: every step the drafters propose up to
                     max_tree_nodes nodes, an online-calibrated acceptance model and latency model
                     (`propd_compile.planner`) pick the size that maximises expected tokens per
                     second, down to plain one-token steps), "fixed" (the drafters' best
                     max_tree_nodes nodes every step), "chain" (a single n-gram continuation, no
                     branching) or "medusa" (Medusa's static sparse tree from the heads' calibrated
                     per-rank accuracies, filled with each step's head top-k).
    max_tree_nodes:  node budget per row and step, root included (1 = plain greedy decoding); the
                     largest candidate of the dynamic tree.
    max_depth:       longest draft path below the root.
    drafters:        names of the drafters whose trees are merged ("ngram", "heads", "feature"); None
                     (default): ("feature", "ngram") when a feature drafter is available for the
                     model, else ("heads", "ngram") when draft heads are, else ("ngram",).
    heads:           directory of draft heads (`propd train-heads`); None: heads shipped for the
                     model, if any (see propd_compile/data/heads).
    heads_topk:      candidates per head (depth) in the dynamic heads tree.
    drafter:         directory of a feature drafter (`propd train-drafter`); None: the one shipped
                     for the model, if any (see propd_compile/data/drafter). With drafters=None an
                     available feature drafter is the default, fused with n-gram drafts.
    drafter_topk:    the feature drafter's children per expanded node and nodes expanded per depth.
    ngram_max:       longest suffix n-gram the n-gram drafter matches.
    phrases:         directory of a corpus of the model's own greedy answers (`propd build-phrases`)
                     that the n-gram drafter matches after the row's own text; None: the corpus
                     shipped for the model, if any (see propd_compile/data/phrases); False: none.
    compile:         compiled verification kernels (`propd_compile.runtime_compile`: the forward
                     exported once, propd's FX passes, AOTInductor with frozen weights and autotuned
                     C++ GEMM templates, kept on disk). "auto" (default): use them when they are
                     already built for this model and machine (`propd warmup`), eager kernels
                     otherwise; True: build them when missing (minutes, once); False: eager.
    backend_options: options handed to the propd torch.compile backend (see `propd_compile.backend`;
                     the early-pruning path).
    acceptance:      how sampled decoding (`do_sample=True`) accepts drafts. "exact" (default):
                     multi-draft speculative sampling, the output follows the model's sampling
                     distribution exactly. "typical": Medusa's typical acceptance, LOSSY: a drafted
                     token x is accepted if p(x) > min(posterior_threshold, posterior_alpha *
                     exp(-entropy(p))), p the sampling distribution (temperature, top-k, top-p
                     applied); more tokens per step, but the output distribution changes
                     (over-represents likely drafted tokens). Greedy decoding ignores it.
    posterior_threshold, posterior_alpha: the typical-acceptance bar (Medusa's defaults).
    prune:           ProPD's early pruning (needs compile=True; passes/early_prune.py; runs through
                     `torch.compile(backend="propd")`, whose prune point calls the predictor): after decoder
                     layer prune_layer, tree nodes whose token is outside the top prune_topk of
                     their parent's early prediction (and their subtrees) skip the deeper layers;
                     lossless (pruned nodes are never accepted). Stats: model.propd.stats.pruned_fraction.
    prune_layer:     L_e (0-based decoder layer); None: the early head's layer, or 1/5 of the depth
                     with the logit lens.
    prune_topk:      k of the top-k membership test, ranked among the early head's shortlist (the
                     shipped SmolLM2 head scores 4055 tokens; tokens outside it are never pruned) or
                     the whole vocabulary (logit lens); changing it does not recompile.
    prune_head:      early predictor: None (a shipped early head for the model, else the logit lens),
                     "lens" (the model's final norm + LM head on the layer-L_e state, no training) or
                     the directory of an early head (`python -m propd_compile.early_head`).
    """

    tree: str = "dynamic"
    max_tree_nodes: int = 32
    max_depth: int = 6
    drafters: tuple[str, ...] | None = None
    ngram_max: int = 4
    phrases: str | bool | None = None
    compile: bool | str = "auto"
    backend_options: dict[str, Any] = field(default_factory=dict)
    acceptance: str = "exact"
    posterior_threshold: float = 0.09
    posterior_alpha: float = 0.3
    heads: str | None = None
    heads_topk: int = 8
    drafter: str | None = None
    drafter_topk: int = 4
    prune: bool = False
    prune_layer: int | None = None
    prune_topk: int = 1500
    prune_head: str | None = None

    def __post_init__(self) -> None:
        if self.tree not in TREES:
            raise ValueError(f"ProPDConfig.tree={self.tree!r} is not supported; use one of {TREES}")
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
        if self.heads_topk < 1 or self.drafter_topk < 1:
            raise ValueError("ProPDConfig.heads_topk and drafter_topk must be >= 1")
        if self.compile not in (True, False, "auto"):
            raise ValueError(f"ProPDConfig.compile={self.compile!r} is not supported; use True, False or 'auto'")
        if self.prune and self.compile is not True:
            raise ValueError("ProPDConfig(prune=True) needs compile=True: the prune point is a compiler pass")
        if self.prune_topk < 1 or (self.prune_layer is not None and self.prune_layer < 0):
            raise ValueError("ProPDConfig needs prune_topk >= 1 and prune_layer >= 0 (or None)")
        if self.phrases is True:
            raise ValueError("ProPDConfig.phrases takes a directory, None (the shipped corpus) or False (none), not True")
        if self.drafters is not None and not self.drafters:
            raise ValueError("ProPDConfig.drafters is empty; name at least one drafter, or None for the default")
        known = {"ngram", "heads", "feature"}
        unknown = [d for d in (self.drafters or ()) if d not in known]
        if unknown:
            raise ValueError(f"unknown drafters {unknown}; available: {sorted(known)}")

    def with_(self, **changes: Any) -> "ProPDConfig":
        return replace(self, **changes)

    @property
    def ragged(self) -> bool:
        """Rows verify trees of their own sizes (`propd_compile.ragged`), except with early
        pruning, whose prune point compacts padded rows."""
        return not self.prune
