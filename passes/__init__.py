"""FX passes the `propd` backend runs on Dynamo's torch-level graph, in order, before Inductor.

Each pass is `fn(gm, options) -> PassReport`, edits `gm` in place (the backend hands it a copy),
must be idempotent, and must never run blanket dead-code elimination (it would drop in-place
nodes such as `propd::kv_write` or HF's `index_copy_` cache writes): erase only nodes it
orphaned itself.

`options` is the backend's `options=` dict. A pass named `NAME` is skipped when
`options.get(NAME) is False`.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger("propd_compile.passes")


@dataclass
class PassReport:
    """What one pass did to one graph."""

    name: str
    rewritten: int = 0  # nodes replaced
    erased: int = 0  # orphaned helper nodes removed (e.g. folded repeat_kv)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (node name, reason) left untouched
    enabled: bool = True

    @property
    def changed(self) -> bool:
        return self.rewritten > 0 or self.erased > 0

    def __str__(self) -> str:
        if not self.enabled:
            return f"{self.name}: disabled"
        s = f"{self.name}: rewritten={self.rewritten} erased={self.erased} skipped={len(self.skipped)}"
        if self.skipped:
            s += " [" + "; ".join(f"{n}: {r}" for n, r in self.skipped) + "]"
        return s


PassFn = Callable[[torch.fx.GraphModule, Mapping[str, Any]], PassReport]


def _passes() -> tuple[tuple[str, PassFn], ...]:
    from propd_compile.passes.early_prune import early_prune_pass
    from propd_compile.passes.tree_attention import tree_attention_pass

    return (("tree_attention", tree_attention_pass), ("early_prune", early_prune_pass))


def pass_names() -> list[str]:
    """Names of the passes, in the order `run_passes` runs them."""
    return [name for name, _ in _passes()]


def run_passes(gm: torch.fx.GraphModule, options: Mapping[str, Any] | None = None) -> list[PassReport]:
    """Run every enabled pass on `gm` in place, in order; returns one report per pass."""
    options = options or {}
    reports: list[PassReport] = []
    for name, fn in _passes():
        if options.get(name, True) is False:
            reports.append(PassReport(name=name, enabled=False))
            log.debug("pass %s disabled by options", name)
            continue
        report = fn(gm, options)
        log.debug("%s", report)
        reports.append(report)
    return reports


__all__ = ["PassReport", "pass_names", "run_passes"]
