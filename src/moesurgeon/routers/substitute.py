"""Swap MoE routers for custom modules in a loaded model, and put the originals back with one call.

    swap = substitute_routers(model, adapter, lambda layer: ExpertMaskRouter(layer, adapter, experts=[3]))
    ...                              # every forward now routes through the custom modules
    swap.restore()                   # or: `with substitute_routers(...) as swap:`

How the swap is done, and why: the router module stays where it is and keeps its class; only
the instance's `forward` is replaced by a call into the custom module. transformers captures
`router_logits` (for `output_router_logits=True` and the aux loss) with forward hooks installed
once, on first use, on modules of the router's class (see shared/notes/transformers5-moe.md). A
replacement module of another class, or one swapped in after that first capture, is invisible to
those hooks: `router_logits` comes back empty and the aux loss raises IndexError. Patching the
instance's forward keeps the module, its class, its hooks, its parameters (PEFT, export and the
probe see the same tensors) and its place in the state dict.

The custom module is held by the swap handle, not registered under the router, so
`model.state_dict()` and `save_pretrained` never see custom tensors.

The contract a custom router honours is the family router's: `forward(hidden_states)` returns
`(logits [T, E], weights [T, k], indices [T, k])` with the family's dtypes. `CustomRouter` gives
subclasses the family's own forward (`family_forward`) and a routing step that keeps the family's
selection and renormalisation (`route`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..arch import ArchAdapter, MoELayer
from ..arch.selection import route_edited
from .errors import RouterConfigError

log = logging.getLogger("moesurgeon")

_MARK = "_moesurgeon_custom_router"  # instance attribute on a router while it is substituted


class CustomRouter(nn.Module):
    """Base class for routers substituted into one MoE layer.

    Subclasses override `edit(logits, hidden_states)`, returning the edited logits and optionally a
    forced-expert mask with margins; or override `forward` entirely, keeping the return contract.
    `layer` and `adapter` are plain attributes (not submodules), so the custom module owns only
    its own tensors.

    Every router class declares how it is exported and what it is built from:
    - `exact_export`: the standard-checkpoint form that holds it exactly — "prune" (a pruned
      checkpoint), "bias" (the family's router bias), "weights" (the router weights) — or None when
      only a distilled export exists (user routers, unless they say otherwise);
    - `resources`: the run resources its constructor takes as keyword arguments besides `layer`,
      `adapter` and its router-config values (e.g. ("roles", "context")).
    """

    exact_export: ClassVar[str | None] = None
    resources: ClassVar[tuple[str, ...]] = ()

    def __init__(self, layer: MoELayer, adapter: ArchAdapter):
        super().__init__()
        self.layer = layer
        self.adapter = adapter
        self.num_experts = layer.num_experts
        self.top_k = adapter.get_top_k(layer)
        self._family_forward: Callable | None = None  # set by substitute_routers

    @property
    def device(self) -> torch.device:
        return self.layer.router.weight.device if hasattr(self.layer.router, "weight") else torch.device("cpu")

    def family_forward(self, hidden_states: torch.Tensor):
        """The original router's forward: the family's logits, weights and indices."""
        if self._family_forward is None:
            raise RuntimeError(f"{type(self).__name__} for {self.layer.router_name} is not substituted into a model; "
                               "use substitute_routers(...)")
        return self._family_forward(hidden_states)

    def edit(self, logits: torch.Tensor, hidden_states: torch.Tensor):
        """Return edited logits, or (logits, force [T, E] bool, margin [T, E] or float). Default: unchanged."""
        return logits

    def route(self, logits, force=None, margin=1.0):
        return route_edited(self.adapter, self.layer, logits, force, margin)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        logits = self.family_forward(hidden_states)[0]
        edited = self.edit(logits, hidden_states)
        if isinstance(edited, tuple):
            return self.route(*edited)
        return self.route(edited)


@dataclass
class RouterSwap:
    """Handle of a substitution: the custom module per MoE layer index, and how to undo it."""

    model: nn.Module
    routers: dict[int, nn.Module]
    _saved: list[tuple[nn.Module, object]] = field(default_factory=list)  # (router, instance forward or None)

    @property
    def active(self) -> bool:
        return bool(self._saved)

    def restore(self) -> None:
        """Put every original router forward back; safe to call twice."""
        while self._saved:
            router, previous = self._saved.pop()
            if previous is None:
                router.__dict__.pop("forward", None)
            else:
                router.forward = previous  # e.g. accelerate's device-placement wrapper
            router.__dict__.pop(_MARK, None)

    def __enter__(self) -> "RouterSwap":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def is_substituted(router: nn.Module) -> bool:
    return _MARK in router.__dict__


def _select_layers(all_layers: list[MoELayer], layers: Iterable[int] | None) -> list[MoELayer]:
    if layers is None:
        return all_layers
    by_index = {layer.index: layer for layer in all_layers}
    wanted = [int(i) for i in layers]
    unknown = [i for i in wanted if i not in by_index]
    if unknown:
        raise RouterConfigError(
            f"router layers {unknown} are not MoE layers of this model; MoE layer indices are {sorted(by_index)}. "
            "Pass some of those, or null for every MoE layer"
        )
    return [by_index[i] for i in sorted(set(wanted))]


def substitute_routers(
    model: nn.Module,
    adapter: ArchAdapter,
    make: Callable[[MoELayer], nn.Module],
    layers: Iterable[int] | None = None,
) -> RouterSwap:
    """Route MoE layers (all, or the indices in `layers`) through `make(layer)`; returns the handle.

    All custom modules are built before any router is touched, so a failing constructor leaves
    the model unchanged.
    """
    chosen = _select_layers(adapter.moe_layers(model), layers)
    taken = [layer.router_name for layer in chosen if is_substituted(layer.router)]
    if taken:
        raise RouterConfigError(
            f"routers {taken} already route through a custom router; restore that substitution "
            "(swap.restore()) before substituting again"
        )
    built = {}
    for layer in chosen:
        module = make(layer)
        if not isinstance(module, nn.Module) or not callable(module):
            raise RouterConfigError(
                f"the router factory returned a {type(module).__name__} for {layer.router_name}; expected a "
                "torch.nn.Module whose forward(hidden_states) returns (logits, weights, indices)"
            )
        built[layer.index] = module
    swap = RouterSwap(model, built)
    for layer in chosen:
        router, custom = layer.router, built[layer.index]
        previous = router.__dict__.get("forward")
        family = previous if previous is not None else type(router).forward.__get__(router)
        if isinstance(custom, CustomRouter):
            custom._family_forward = family

        def patched(hidden_states, *args, _custom=custom, **kwargs):
            return _custom(hidden_states, *args, **kwargs)

        swap._saved.append((router, previous))
        router.forward = patched
        router.__dict__[_MARK] = True
    log.info("custom routers %s on MoE layers %s", type(next(iter(built.values()))).__name__ if built else "-",
             sorted(built))
    return swap
