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
    forwards: dict[tuple, Forward] = field(default_factory=dict, repr=False)
    planners: dict[str, "TreePlanner"] = field(default_factory=dict, repr=False)  # by repr(config)
    # lazily built per-model objects of other modules (loaded heads by path, prune options, ...)
    built: dict[tuple, Any] = field(default_factory=dict, repr=False)

    def forward(self, config: ProPDConfig | None = None, hidden: bool = False, taps: tuple[int, ...] = ()) -> Forward:
        """The verification forward for `config`: eager, or compiled once per backend options.

        With `hidden` it returns (logits, last hidden state), for drafters that read it; with
        `taps` also the features entering those layers (the feature drafter's)."""
        config = config or self.config
        taps = tuple(taps)
        if not config.compile:
            return eager_forward(self.model, hidden=hidden, taps=taps)
        from propd_compile.runtime_compile import backend_options_for, compiled_forward

        options = backend_options_for(self.model, config)
        key = (repr(sorted(options.items())), hidden, taps) if taps else (repr(sorted(options.items())), hidden)
        if key not in self.forwards:
            self.forwards[key] = compiled_forward(self.model, hidden=hidden, options=options, taps=taps)
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
