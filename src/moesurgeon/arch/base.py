"""The architecture-adapter contract: everything that differs between MoE families lives behind it.

An adapter is the ONLY code that knows a family's module names, router class, scoring function,
choice bias, group limit, on-disk tensor names and where top-k is stored. This file holds the
in-memory part; the adapter also answers from a config.json dict alone (config_json.py: expert
count, MoE layers, group limit, the edits for a changed expert count) and names tensors on disk
(disk_names.py: router, bias and per-expert tensors). Callers get:
- `moe_layers(model)`: the MoE layers (dense layers skipped), each with the router's fully qualified
  name, which is the same name used in logs, statistics files and the safetensors weight map;
- `get_top_k` / `set_top_k`: top-k per layer in memory (transformers copies `num_experts_per_tok`
  into each router at init, so editing `model.config` afterwards changes nothing);
- `routing(layer, router_output)`: per-token probabilities over all experts, selected experts and
  routing weights, as the family computes them; `route_from_logits` for edited logits;
- `choice_bias(layer)`, `group_limit(layer)`, `router_bias(layer, space)`: what the choice reads
  besides the logits, and which per-expert bias tensors the router holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .config_json import ConfigJson
from .disk_names import BIAS_SPACES, DiskNames
from .errors import ExpertCountError, InvalidConfigError, UnsupportedModelError

__all__ = ["ArchAdapter", "ExpertCountError", "InvalidConfigError", "MoELayer", "Routing", "UnsupportedModelError"]


@dataclass(frozen=True)
class MoELayer:
    """One sparse MoE block of a loaded model."""

    index: int  # decoder layer index (dense layers keep their index; they are just not listed)
    block_name: str  # e.g. "model.layers.3.mlp"
    router_name: str  # e.g. "model.layers.3.mlp.gate": the hook key and the weight-map prefix
    block: nn.Module
    router: nn.Module
    num_experts: int


@dataclass
class Routing:
    """What a router decided for a flat batch of tokens (T = batch * sequence)."""

    probs: torch.Tensor  # [T, E] float32, the family's score over all experts (softmax or sigmoid)
    indices: torch.Tensor  # [T, k] int64, selected experts
    weights: torch.Tensor  # [T, k] float32, routing weights as applied to expert outputs


class ArchAdapter(DiskNames, ConfigJson):
    """Base adapter for families whose routers return `(logits, top-k weights, top-k indices)`.

    Subclasses set the class attributes and override the few methods whose behaviour differs.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    router_class_names: ClassVar[tuple[str, ...]] = ()
    block_attr: ClassVar[str] = "mlp"  # attribute of a decoder layer holding the MoE block
    router_attr: ClassVar[str] = "gate"  # attribute of the MoE block holding the router
    experts_attr: ClassVar[str] = "experts"  # attribute of the MoE block holding the routed experts (fused or a list)
    scoring: ClassVar[str] = "softmax"  # "softmax" | "sigmoid": how probs over all experts are made
    # router attributes holding the group limit (number of groups, groups a token may use); None: no limit
    group_attrs: ClassVar[tuple[str, str] | None] = None
    # router tensors that PEFT can wrap with LoRA (bare Parameters -> `target_parameters`)
    lora_router_params: ClassVar[tuple[str, ...]] = ("weight",)

    def __init__(self, model_type: str):
        self.model_type = model_type

    # ---------------------------------------------------------------- layers
    def decoder_layers(self, model: nn.Module) -> tuple[str, nn.ModuleList]:
        """Return (fully qualified prefix, layers) of the decoder stack."""
        base = getattr(model, "model", model)
        prefix = "model.layers" if base is not model else "layers"
        layers = getattr(base, "layers", None)
        if layers is None:
            raise UnsupportedModelError(
                f"{type(model).__name__} has no `model.layers`: expected a *ForCausalLM of model_type "
                f"{self.model_type!r}. Load the model with AutoModelForCausalLM."
            )
        return prefix, layers

    def is_router(self, module: nn.Module) -> bool:
        return type(module).__name__ in self.router_class_names

    def moe_layers(self, model: nn.Module) -> list[MoELayer]:
        prefix, layers = self.decoder_layers(model)
        found = []
        for i, layer in enumerate(layers):
            block = getattr(layer, self.block_attr, None)
            router = getattr(block, self.router_attr, None) if block is not None else None
            if router is None or not self.is_router(router):
                continue  # a dense layer (mlp_only_layers, first_k_dense_replace, ...)
            block_name = f"{prefix}.{i}.{self.block_attr}"
            found.append(
                MoELayer(
                    index=i,
                    block_name=block_name,
                    router_name=f"{block_name}.{self.router_attr}",
                    block=block,
                    router=router,
                    num_experts=int(router.num_experts),
                )
            )
        if not found:
            raise UnsupportedModelError(
                f"model_type {self.model_type!r}: no MoE router of class {self.router_class_names} found in "
                f"{len(layers)} decoder layers; this checkpoint looks dense. moesurgeon needs a sparse MoE model."
            )
        return found

    # ---------------------------------------------------------------- top-k
    def get_top_k(self, layer: MoELayer) -> int:
        return int(layer.router.top_k)

    def max_top_k(self, layer: MoELayer) -> int:
        """Largest k the family's routing can honour for this layer. With a group limit the choice only
        looks inside the best groups: a larger k would silently pick excluded experts, so it is refused."""
        limit = self.group_limit(layer)
        if limit is None:
            return layer.num_experts
        groups, kept = limit
        return kept * (layer.num_experts // groups)

    def set_top_k(self, model: nn.Module, k: int | dict[int, int]) -> dict[int, int]:
        """Set top-k in memory: an int for every MoE layer, or {layer_index: k} for some layers.

        Returns the previous value of every layer touched, so a caller can restore it.
        """
        layers = {layer.index: layer for layer in self.moe_layers(model)}
        wanted = {i: k for i in layers} if isinstance(k, int) else dict(k)
        for i, kk in wanted.items():
            if i not in layers:
                raise ValueError(
                    f"top_k for layer {i}: that layer is not an MoE layer; MoE layers are {sorted(layers)}"
                )
            hi = self.max_top_k(layers[i])
            if not isinstance(kk, int) or not 1 <= kk <= hi:
                raise ValueError(
                    f"top_k={kk!r} for layer {i}: expected an integer in [1, {hi}] "
                    f"({layers[i].num_experts} experts); pass e.g. top_k={min(2, hi)}"
                )
        previous = {}
        for i, kk in wanted.items():
            previous[i] = self.get_top_k(layers[i])
            self._write_top_k(layers[i], kk)
        if isinstance(k, int) and hasattr(model, "config"):
            # the load-balancing loss reads num_experts_per_tok from the model's config
            model.config.num_experts_per_tok = k
        return previous

    def _write_top_k(self, layer: MoELayer, k: int) -> None:
        layer.router.top_k = k
        if hasattr(layer.block, "top_k"):  # some blocks keep an (unused) copy: keep it consistent
            layer.block.top_k = k

    # ---------------------------------------------------------------- experts
    def run_expert(self, layer: MoELayer, hidden: torch.Tensor, expert: int) -> torch.Tensor:
        """Output [T, H] of routed expert `expert` of `layer` on every token of `hidden` [T, H], weight 1.

        transformers 5's experts modules (fused or a module list) take (hidden [T, H], top-k indices
        [T, k], top-k weights [T, k]); a one-column top-k naming this expert for every token runs exactly
        that expert, with the family's own kernels (activation, biases, clamping)."""
        tokens = hidden.shape[0]
        index = torch.full((tokens, 1), expert, dtype=torch.long, device=hidden.device)
        weight = torch.ones((tokens, 1), dtype=hidden.dtype, device=hidden.device)
        return getattr(layer.block, self.experts_attr)(hidden, index, weight)

    # ---------------------------------------------------------------- routing
    def probs_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        return logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(dim=-1)

    def distribution(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-token distribution over all experts [T, E], float32, summing to 1 (balance losses, KL):
        the softmax, or the sigmoid scores normalised over the experts for sigmoid families."""
        probs = self.probs_from_logits(logits)
        if self.scoring == "sigmoid":
            probs = probs / probs.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        return probs

    def log_distribution(self, logits: torch.Tensor) -> torch.Tensor:
        """log of `distribution`, computed stably (-inf stays -inf for masked experts)."""
        if self.scoring == "sigmoid":
            s = logits.float().sigmoid().clamp_min(1e-30)
            return (s / s.sum(-1, keepdim=True)).log()
        return logits.float().log_softmax(dim=-1)

    def choice_bias(self, layer: MoELayer) -> torch.Tensor | None:
        """The bias the family adds to the scores for the choice only (not the weights), or None."""
        bias = getattr(layer.router, self.bias_attrs["choice"], None)
        return bias if isinstance(bias, torch.Tensor) else None

    def router_bias(self, layer: MoELayer, space: str) -> torch.Tensor | None:
        """The router's per-expert bias tensor acting in `space` ("logits": added to the logits, as
        `x W^T + bias`; "choice": added to the scores for the choice only), or None when it has none."""
        if space not in BIAS_SPACES:
            raise ValueError(f"bias space={space!r}: expected one of {list(BIAS_SPACES)}")
        tensor = getattr(layer.router, self.bias_attrs[space], None)
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != (layer.num_experts,):
            return None
        return tensor

    def group_limit(self, layer: MoELayer) -> tuple[int, int] | None:
        """(groups, groups a token may choose from) when the family limits the choice to the best groups
        of contiguous experts; None without a limit (or with a single group, which limits nothing)."""
        if self.group_attrs is None:
            return None
        groups, kept = (getattr(layer.router, a, None) for a in self.group_attrs)
        if not groups or not kept or int(groups) <= 1:
            return None
        return int(groups), int(kept)

    def choice_scores(self, layer: MoELayer, logits: torch.Tensor) -> torch.Tensor:
        """The per-expert values the family's top-k ranks, before any group limit [T, E]: the logits
        (softmax families rank logits and probabilities alike), or sigmoid score + choice bias."""
        bias = self.choice_bias(layer)
        if self.scoring == "sigmoid":
            scores = logits.float().sigmoid()
            return scores + bias.float() if bias is not None else scores
        return logits

    def choice_in_score_space(self, layer: MoELayer) -> bool:
        """True when the choice compares bounded scores in [0, 1] (+ bias), not logits: margins on
        choice values are then on a ~0.1 scale rather than ~1."""
        return self.scoring == "sigmoid" or self.choice_bias(layer) is not None

    def routing(self, layer: MoELayer, output) -> Routing:
        logits, weights, indices = output[0], output[1], output[2]
        return Routing(
            probs=self.probs_from_logits(logits.reshape(-1, logits.shape[-1])),
            indices=indices.reshape(-1, indices.shape[-1]),
            weights=weights.reshape(-1, weights.shape[-1]).float(),
        )

    def route_from_logits(self, layer: MoELayer, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The family's selection applied to (possibly edited) router logits [T, E].

        Returns what the family's router returns: (logits, top-k weights, top-k indices). Custom
        routers compute their own logits (masks as -inf, biases added) and call this, so the
        selection and renormalisation stay exactly the family's. Default: softmax -> top-k ->
        optional renormalisation (qwen2/3, olmoe; mixtral always renormalises).
        """
        router = layer.router
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        weights, indices = torch.topk(probs, int(router.top_k), dim=-1)
        if getattr(router, "norm_topk_prob", self.always_renormalize):
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(logits.dtype), indices

    always_renormalize: ClassVar[bool] = False

    def lora_target_parameters(self) -> list[str]:
        """PEFT `target_parameters` suffixes matching every router weight of this family."""
        return [f"{self.block_attr}.{self.router_attr}.{p}" for p in self.lora_router_params]

    def lora_target_modules(self) -> list[str]:
        """PEFT `target_modules` suffix of the routers, for families whose router is a plain nn.Linear."""
        return [f"{self.block_attr}.{self.router_attr}"]
