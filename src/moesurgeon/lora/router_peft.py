"""Put LoRA on the routers of every MoE layer through PEFT, freeze everything else, and merge it back.

The targets are chosen from the architecture adapter, never typed by the user:
- routers whose weight is a bare `nn.Parameter` (every family transformers 5 ships: the router
  is a custom module) -> `LoraConfig(target_parameters=adapter.lora_target_parameters())`, which
  PEFT serves with `ParamWrapper`;
- routers that are a plain `nn.Linear` -> `target_modules` (classic `lora.Linear`).
A custom router class in `target_modules` is refused by PEFT ("not supported") and subclasses of
nn.Linear that return tuples crash in forward, hence the exact `type(...) is nn.Linear` test.

PEFT freezes every base parameter; `check_only_router_lora_trainable` re-checks that after
wrapping, so a PEFT behaviour change cannot silently train experts or attention.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

from torch import nn

from ..arch import ArchAdapter, MoELayer, UnsupportedModelError

log = logging.getLogger("moesurgeon")


class RouterLoraError(ValueError):
    """Router LoRA cannot be set up as configured; the message says what to change."""


@dataclass(frozen=True)
class RouterLoraSpec:
    """The `lora` config group, as far as PEFT is concerned."""

    rank: int = 8
    alpha: float | None = None  # None: alpha = rank (scaling 1)
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise RouterLoraError(f"router_lora.lora.rank={self.rank!r}: expected a positive integer, e.g. router_lora.lora.rank=8")
        if self.alpha is not None and not self.alpha > 0:
            raise RouterLoraError(f"router_lora.lora.alpha={self.alpha!r}: expected a positive number or null (= rank)")


@dataclass(frozen=True)
class LoraTargets:
    target_modules: list[str]
    target_parameters: list[str]


def router_layers(model: nn.Module, adapter: ArchAdapter) -> list[MoELayer]:
    """The MoE layers, or a RouterLoraError saying there is no router to tune."""
    try:
        return adapter.moe_layers(model)
    except UnsupportedModelError as err:
        raise RouterLoraError(f"router LoRA needs at least one MoE router: {err}") from err


def router_shape(layer: MoELayer) -> tuple[int, int]:
    """(experts, hidden) of a router's weight."""
    weight = getattr(layer.router, "weight", None)
    if weight is None or weight.ndim != 2:
        raise RouterLoraError(
            f"router {layer.router_name} ({type(layer.router).__name__}) has no 2-D `weight`; router LoRA "
            "supports routers that hold an [experts, hidden] weight"
        )
    return int(weight.shape[0]), int(weight.shape[1])


def check_rank(rank: int, experts: int, hidden: int, where: str) -> None:
    """A rank above min(E, H) cannot add anything a full-rank update would not, and PEFT accepts it silently."""
    limit = min(experts, hidden)
    if rank > limit:
        raise RouterLoraError(
            f"router_lora.lora.rank={rank} exceeds the router's dimensions: {where} weight is [experts={experts}, "
            f"hidden={hidden}], so the rank can be at most min(experts, hidden)={limit}; "
            f"set router_lora.lora.rank={min(8, limit)} (or any value <= {limit})"
        )


def lora_targets(model: nn.Module, adapter: ArchAdapter) -> LoraTargets:
    layers = router_layers(model, adapter)
    linear = [type(layer.router) is nn.Linear for layer in layers]
    if all(linear):
        # PEFT matches target_modules as a suffix of the module name: "mlp.gate" hits "model.layers.3.mlp.gate"
        return LoraTargets(target_modules=adapter.lora_target_modules(), target_parameters=[])
    if any(linear):
        raise RouterLoraError(
            f"model_type {adapter.model_type!r} mixes nn.Linear routers and custom router modules; "
            "router LoRA needs one kind: please report this model"
        )
    return LoraTargets(target_modules=[], target_parameters=adapter.lora_target_parameters())


def wrap_routers(model: nn.Module, adapter: ArchAdapter, spec: RouterLoraSpec):
    """Return a PeftModel with LoRA on every router and every other parameter frozen.

    The model is modified in place (PEFT swaps the router modules for wrappers); `merge_routers`
    turns it back into a plain transformers model with the update folded into the router weights.
    """
    from peft import LoraConfig, get_peft_model

    layers = router_layers(model, adapter)
    for layer in layers:
        check_rank(spec.rank, *router_shape(layer), where=f"router {layer.router_name}")
    targets = lora_targets(model, adapter)
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha if spec.alpha is not None else spec.rank,
        lora_dropout=0.0,  # ParamWrapper refuses dropout: it cannot be factored out of x @ (W + BA)^T
        use_rslora=spec.use_rslora,
        target_modules=targets.target_modules,
        target_parameters=targets.target_parameters,
        bias="none",
    )
    with warnings.catch_warnings():
        # PEFT 0.21 calls a transformers property deprecated in 5.x; the warning is not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, config)
    wrapped = count_wrapped_routers(peft_model)
    if wrapped != len(layers):
        raise RouterLoraError(
            f"PEFT put LoRA on {wrapped} modules but the model has {len(layers)} MoE routers "
            f"(targets {targets}); this PEFT version matches router names differently: please report it"
        )
    check_only_router_lora_trainable(peft_model)
    return peft_model


def count_wrapped_routers(peft_model) -> int:
    from peft.tuners.lora import LoraLayer

    # ParamWrappers can nest (one per targeted parameter): count the outermost only.
    names = [n for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)]
    return sum(1 for n in names if not any(n.startswith(o + ".") for o in names))


def check_only_router_lora_trainable(peft_model) -> None:
    wrong = [n for n, p in peft_model.named_parameters() if p.requires_grad and ".lora_" not in n]
    if wrong:
        raise RouterLoraError(
            f"{len(wrong)} non-LoRA parameters would be trained (first: {wrong[:3]}); router LoRA must "
            "train only the routers' LoRA factors. This is a bug: please report it"
        )
    if not any(p.requires_grad for p in peft_model.parameters()):
        raise RouterLoraError("no trainable LoRA parameter was created on the routers; please report this model")


def trainable_report(peft_model) -> dict[str, float]:
    """Trainable (LoRA) parameters, their count, and their share of all parameters (base + LoRA)."""
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    return {"trainable_params": trainable, "total_params": total, "trainable_share": trainable / total}


def lora_state(peft_model) -> dict:
    """Name -> tensor of the trainable LoRA factors (fully qualified PeftModel names)."""
    return {n: p.detach() for n, p in peft_model.named_parameters() if p.requires_grad}


def merge_routers(peft_model) -> nn.Module:
    """Fold the LoRA update into the router weights and return the plain transformers model."""
    return peft_model.merge_and_unload(safe_merge=True)  # safe_merge: refuse NaN/inf instead of writing them
