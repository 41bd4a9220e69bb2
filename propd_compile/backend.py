"""The `propd` torch.compile backend: propd FX passes on Dynamo's graph, then Inductor.

    torch.compile(model, backend="propd", dynamic=True, options={...})

Registration: the package's entry point (`torch_dynamo_backends: propd`) makes the name resolve
without importing propd_compile; when that entry point is not installed (e.g. source tree on
PYTHONPATH) importing this module registers the backend instead. Registering in both cases
raises `AssertionError: duplicate name: propd` (../shared/research/compile-backend.md §1).

Options (`options=` of torch.compile; unknown keys are ignored with a debug log):
    tree_attention: bool = True     run the tree-attention pass (SDPA -> propd::tree_attention)
    prune: None | False | dict      early pruning: {"layer": L_e, "predictor": id} inserts a prune
                                    point after decoder layer L_e (passes/early_prune.py; id from
                                    kernels.early_prune.register_predictor); None/False: off
    inductor: bool = True           False: return the rewritten graph to run eagerly (debugging)
    inductor_config: dict = {}      Inductor config patches passed to compile_fx
    debug: bool = False             dump the graph before/after the passes (as PROPD_DEBUG=1)
    block_linear: bool = True       compiled packages on CPU (ProPDConfig(compile=...)): linears
                                    whose weights a block format holds exactly read that format
                                    (kernels/block_linear.py); False keeps fp32 weights

The backend is pure: Dynamo may call it more than once for one compile (e.g. restarts under
dynamic=True), so the passes run on a copy of the graph module and the only global effects are
logging, `torch._dynamo.utils.counters["propd"]` and the bounded `REPORTS` history.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import importlib.metadata
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from propd_compile.kernels.tree_attention import inductor_patches
from propd_compile.passes import PassReport, run_passes

log = logging.getLogger("propd_compile.backend")

BACKEND_NAME = "propd"

# (dynamo compile id, reports) of the last compiles that succeeded, newest last.
REPORTS: collections.deque[tuple[str, list[PassReport]]] = collections.deque(maxlen=64)

_OPTION_TYPES: dict[str, tuple[type, ...]] = {
    "tree_attention": (bool,),
    "prune": (type(None), bool, Mapping),
    "inductor": (bool,),
    "inductor_config": (Mapping,),
    "debug": (bool,),
    "block_linear": (bool,),
}


def validate_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Type-check the known keys; unknown keys are kept (passes may read them) and debug-logged."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise TypeError(f"propd backend options must be a dict, got {type(options).__name__}")
    out = dict(options)
    for key, value in out.items():
        types = _OPTION_TYPES.get(key)
        if types is None:
            log.debug("propd backend: ignoring unknown option %r", key)
        elif not isinstance(value, types):
            names = " | ".join("None" if t is type(None) else t.__name__ for t in types)
            raise TypeError(f"propd backend option {key!r} must be {names}, got {type(value).__name__}")
    prune = out.get("prune")
    if prune is True or (
        isinstance(prune, Mapping)
        and not all(isinstance(prune.get(k), int) and not isinstance(prune.get(k), bool) for k in ("layer", "predictor"))
    ):
        raise TypeError("propd backend option 'prune' must be None, False or {'layer': int, 'predictor': int}")
    return out


def _debug_enabled(options: Mapping[str, Any]) -> bool:
    env = os.environ.get("PROPD_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")
    if env or options.get("debug"):
        _ensure_debug_handler()
        return True
    return log.isEnabledFor(logging.DEBUG)


_debug_handler: logging.Handler | None = None


def _ensure_debug_handler() -> None:
    """PROPD_DEBUG=1: make propd_compile's DEBUG records visible on stderr (once)."""
    global _debug_handler
    root = logging.getLogger("propd_compile")
    if root.getEffectiveLevel() > logging.DEBUG:
        root.setLevel(logging.DEBUG)
    if _debug_handler is None and not root.hasHandlers():
        _debug_handler = logging.StreamHandler(sys.stderr)
        _debug_handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
        root.addHandler(_debug_handler)


def _dump(gm: torch.fx.GraphModule, when: str, compile_id: str) -> None:
    try:
        text = gm.print_readable(print_output=False)
    except Exception:  # pragma: no cover - print_readable is best effort
        text = str(gm.graph)
    log.debug("propd graph %s %s:\n%s", compile_id, when, text)


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A new GraphModule with a copied graph (node meta copied shallowly) sharing gm's
    submodules/parameters and Dynamo's extra attributes, so passes never mutate the input."""
    graph = copy.deepcopy(gm.graph)
    old_nodes, new_nodes = list(gm.graph.nodes), list(graph.nodes)
    if len(old_nodes) != len(new_nodes):  # pragma: no cover - graph_copy keeps every node
        raise RuntimeError("propd backend: graph copy lost nodes")
    for old, new_node in zip(old_nodes, new_nodes):
        # Extra attributes Dynamo sets on nodes (placeholders' `_dynamo_source`, read by AOT).
        for key, value in getattr(old, "__dict__", {}).items():
            if key not in new_node.__dict__:
                new_node.__dict__[key] = value
    new = torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    for key, value in gm.__dict__.items():  # e.g. _param_name_to_source, compile_subgraph_reason
        if key not in new.__dict__:
            new.__dict__[key] = value
    new.meta = dict(gm.meta)
    new.shape_env = getattr(gm, "shape_env", None)
    return new


def _device_type(example_inputs: Sequence[Any]) -> str:
    types = {x.device.type for x in example_inputs if isinstance(x, torch.Tensor)}
    accel = sorted(t for t in types if t not in ("cpu", "meta"))
    return accel[0] if accel else "cpu"


def _record(compile_id: str, reports: list[PassReport]) -> None:
    from torch._dynamo.utils import counters

    REPORTS.append((compile_id, reports))
    for r in reports:
        counters["propd"][f"{r.name}.rewritten"] += r.rewritten
        counters["propd"][f"{r.name}.skipped"] += len(r.skipped)
    counters["propd"]["graphs"] += 1


def propd_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any):
    """torch.compile backend: run the propd passes on a copy of `gm`, then compile with Inductor."""
    options = validate_options(kwargs.pop("options", None))
    for key in kwargs:
        log.debug("propd backend: ignoring keyword %r", key)
    compile_id = str(gm.meta.get("dynamo_compile_id", "?")) if hasattr(gm, "meta") else "?"
    debug = _debug_enabled(options)

    work = copy_graph_module(gm)
    if debug:
        _dump(work, "before passes", compile_id)
    reports = run_passes(work, options)
    for r in reports:
        log.info("propd %s: %s", compile_id, r)
    if debug:
        _dump(work, "after passes", compile_id)

    if not options.get("inductor", True):
        _record(compile_id, reports)
        return work.forward

    from torch._inductor.compile_fx import compile_fx

    device_type = _device_type(example_inputs)
    config_patches = dict(options.get("inductor_config") or {})
    with inductor_patches(device_type):
        if config_patches:
            compiled = compile_fx(work, example_inputs, config_patches=config_patches)
        else:
            compiled = compile_fx(work, example_inputs)
    _record(compile_id, reports)
    return compiled


def _entry_point_registered() -> bool:
    try:
        return BACKEND_NAME in importlib.metadata.entry_points(group="torch_dynamo_backends").names
    except Exception:  # pragma: no cover - broken metadata
        return False


def _register() -> None:
    if _entry_point_registered():
        return  # torch._dynamo.lookup_backend registers the entry point itself
    from torch._dynamo.backends import registry

    if BACKEND_NAME in getattr(registry, "_COMPILER_FNS", {}):
        return
    torch._dynamo.register_backend(propd_backend, name=BACKEND_NAME)


_register()

__all__ = ["BACKEND_NAME", "REPORTS", "copy_graph_module", "propd_backend", "validate_options"]
