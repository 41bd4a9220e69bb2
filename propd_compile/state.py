"""One accelerated model's propd state: its config, its statistics and everything built for it.

`accelerate` attaches one `ProPDState` to the model (`model.propd`); everything propd builds for
that model lives here and is built on first use: the verification forwards (eager or compiled,
per config and output kind), the dynamic-tree planners (their statistics carry over between
`generate` calls), loaded draft heads and early-pruning options. `restore` drops it, and with it
every compiled graph. Modules that build such objects for a model that is not accelerated
(tests, trainers) build them afresh each time instead of caching them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from propd_compile.config import ProPDConfig
from propd_compile.decoding import DecodeStats, Forward, eager_forward

if TYPE_CHECKING:
    from propd_compile.planner import TreePlanner

ATTR = "propd"


@dataclass(eq=False)
class ProPDState:
    model: torch.nn.Module = field(repr=False)
    config: ProPDConfig
    stats: DecodeStats = field(default_factory=DecodeStats)  # of the last `generate` call
    forwards: dict[tuple, Forward | None] = field(default_factory=dict, repr=False)  # None: not built ("auto")
    planners: dict[str, "TreePlanner"] = field(default_factory=dict, repr=False)  # by repr(config)
    attention: str | None = None  # the model's own attention implementation, switched to propd_<it>
    weights_version: tuple = field(default=(), repr=False)  # of the weights the compiled forwards hold
    # lazily built per-model objects of other modules (loaded heads by path, prune options, ...)
    built: dict[tuple, Any] = field(default_factory=dict, repr=False)

    def forward(self, config: ProPDConfig | None = None, hidden: bool = False, taps: tuple[int, ...] = ()) -> Forward:
        """The verification forward for `config`: compiled (`runtime_compile`) when
        `config.compile` asks for it and it is available, eager otherwise. With `hidden` it
        returns (logits, last hidden state), for drafters that read it; with `taps` also the
        features entering those layers (the feature drafter's)."""
        config = config or self.config
        taps = tuple(taps)
        compiled = self._compiled(config, hidden, taps) if config.compile else None
        return compiled or eager_forward(self.model, hidden=hidden, taps=taps)

    def compiled(self, config: ProPDConfig | None = None, hidden: bool = False, taps: tuple[int, ...] = ()) -> bool:
        """Whether `forward(config, hidden, taps)` runs compiled kernels."""
        config = config or self.config
        return bool(config.compile) and self._compiled(config, hidden, tuple(taps)) is not None

    def _compiled(self, config: ProPDConfig, hidden: bool, taps: tuple[int, ...]) -> Forward | None:
        """Compiled forwards hold a snapshot of the weights: when the model's parameters changed
        since they were made, they are dropped and made again for the new weights."""
        from propd_compile.runtime_compile import backend_options_for, compiled_forward, weights_version

        version = weights_version(self.model)
        if version != self.weights_version:
            self.forwards.clear()
            self.weights_version = version
        key = (repr(sorted(backend_options_for(self.model, config).items())), config.prune, config.compile, hidden, taps)
        if key not in self.forwards:
            self.forwards[key] = compiled_forward(self.model, config, hidden=hidden, taps=taps)
        return self.forwards[key]

    def planner(self, config: ProPDConfig | None = None) -> "TreePlanner":
        """The dynamic-tree planner for `config`; its acceptance and latency statistics carry over
        between `generate` calls. Its latency model starts from this machine's `propd calibrate`
        fit when there is one."""
        config = config or self.config
        key = repr(config)
        if key not in self.planners:
            from propd_compile.planner import new_planner

            self.planners[key] = new_planner(self.model, config)
        return self.planners[key]


def state_of(model: torch.nn.Module) -> ProPDState | None:
    """The model's propd state, or None if it is not accelerated."""
    state = vars(model).get(ATTR)
    return state if isinstance(state, ProPDState) else None


def attach(model: torch.nn.Module, config: ProPDConfig) -> ProPDState:
    """The model's state with `config` (kept, with everything it built, when already attached)."""
    state = state_of(model)
    if state is None:
        state = ProPDState(model, config)
        setattr(model, ATTR, state)
    elif state.config != config:
        state.config = config
    return state


def detach(model: torch.nn.Module) -> None:
    if state_of(model) is not None:
        delattr(model, ATTR)


def built_for(model: torch.nn.Module, key: tuple, build: Callable[[], Any]) -> Any:
    """`build()` once per accelerated model and key (kept in its state); every call otherwise."""
    state = state_of(model)
    if state is None:
        return build()
    if key not in state.built:
        state.built[key] = build()
    return state.built[key]
