"""The architecture-adapter contract: everything that differs between MoE families lives behind it.

An adapter is the ONLY code that knows a family's module names, router class, scoring function,
on-disk tensor names and where top-k is stored. Callers get:
- `moe_layers(model)`: the MoE layers (dense layers skipped), each with the router's fully qualified
  name, which is the same name used in logs, statistics files and the safetensors weight map;
- `get_top_k` / `set_top_k`: top-k per layer in memory (transformers copies `num_experts_per_tok`
  into each router at init, so editing `model.config` afterwards changes nothing);
- `routing(layer, router_output)`: per-token probabilities over all experts, selected experts and
  routing weights, as the family computes them;
- on-disk names of router tensors and per-expert tensors, and config.json keys, for the patch writer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn


class UnsupportedModelError(ValueError):
    """The model is not a Mixture-of-Experts family this adapter set supports."""


class InvalidConfigError(ValueError):
    """config.json of a supported family holds values no runtime can build a model from."""


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


class ArchAdapter:
    """Base adapter for families whose routers return `(logits, top-k weights, top-k indices)`.

    Subclasses set the class attributes and override the few methods whose behaviour differs.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    router_class_names: ClassVar[tuple[str, ...]] = ()
    block_attr: ClassVar[str] = "mlp"  # attribute of a decoder layer holding the MoE block
    router_attr: ClassVar[str] = "gate"  # attribute of the MoE block holding the router
    scoring: ClassVar[str] = "softmax"  # "softmax" | "sigmoid": how probs over all experts are made
    # config.json keys (hub format first); transformers 5 may write the alias instead
    num_experts_keys: ClassVar[tuple[str, ...]] = ("num_experts", "num_local_experts")
    top_k_key: ClassVar[str] = "num_experts_per_tok"
    # in-memory block prefix -> on-disk block prefix, for families renamed by transformers 5
    disk_block_attr: ClassVar[str | None] = None
    # per-expert on-disk tensor suffixes (None: experts are fused on disk too)
    expert_disk_suffixes: ClassVar[tuple[str, ...] | None] = (
        "gate_proj.weight",
        "up_proj.weight",
        "down_proj.weight",
    )
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
        """Largest k the family's routing can honour for this layer."""
        return layer.num_experts

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
        return None

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

    # ---------------------------------------------------------------- names on disk
    def disk_name(self, name: str) -> str:
        """On-disk tensor name for an in-memory parameter name of a router."""
        if self.disk_block_attr is None:
            return name
        return name.replace(f".{self.block_attr}.{self.router_attr}.", f".{self.disk_block_attr}.{self.router_attr}.")

    def router_tensor_names(self, layer: MoELayer) -> dict[str, str]:
        """{in-memory fully qualified name: on-disk name} of every tensor of this router."""
        names = {}
        for local, _ in list(layer.router.named_parameters(recurse=False)) + list(
            layer.router.named_buffers(recurse=False)
        ):
            mem = f"{layer.router_name}.{local}"
            names[mem] = self.disk_name(mem)
        return names

    def expert_disk_names(self, layer: MoELayer, expert: int) -> list[str]:
        if self.expert_disk_suffixes is None:
            raise UnsupportedModelError(
                f"model_type {self.model_type!r} stores experts fused on disk; per-expert tensors do not exist"
            )
        prefix = layer.block_name
        if self.disk_block_attr is not None:
            prefix = prefix.rsplit(".", 1)[0] + "." + self.disk_block_attr
        return [f"{prefix}.experts.{expert}.{s}" for s in self.expert_disk_suffixes]

    def lora_target_parameters(self) -> list[str]:
        """PEFT `target_parameters` suffixes matching every router weight of this family."""
        return [f"{self.block_attr}.{self.router_attr}.{p}" for p in self.lora_router_params]

    # ---------------------------------------------------------------- config.json
    def num_experts_from_config(self, config: dict) -> int:
        for key in self.num_experts_keys:
            if config.get(key) is not None:
                try:
                    return int(config[key])
                except (TypeError, ValueError):
                    raise InvalidConfigError(f"config.json: {key}={config[key]!r}; expected a positive integer "
                                             "number of experts") from None
        raise UnsupportedModelError(
            f"config.json of model_type {self.model_type!r} has none of {self.num_experts_keys}: "
            "cannot tell the number of experts"
        )

    def check_config(self, config: dict) -> list[str]:
        """Validate the expert count and top-k of a config.json dict; return notes for the log.

        Raises InvalidConfigError for values transformers would accept and then fail on much later
        (top-k of 0 divides by zero in renormalisation, top-k above the expert count fails in topk).
        A missing top-k is legal: the config class's default applies, and the note says which.
        """
        experts = self.num_experts_from_config(config)
        key = next(k for k in self.num_experts_keys if config.get(k) is not None)
        if isinstance(config[key], bool) or not isinstance(config[key], int) or experts <= 0:
            raise InvalidConfigError(f"config.json: {key}={config[key]!r}; expected a positive integer number of "
                                     "experts. Fix config.json (the source checkpoint's value is authoritative)")
        notes = []
        k = config.get(self.top_k_key)
        if k is None:
            default = self.default_top_k()
            notes.append(f"config.json has no {self.top_k_key}: transformers uses the {self.model_type} default "
                         f"of {default} experts per token")
            k = default
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= experts:
            raise InvalidConfigError(f"config.json: {self.top_k_key}={k!r}; expected an integer from 1 to the "
                                     f"expert count {experts} ({key}). Fix config.json, or choose top-k at run "
                                     "time with experiment=topk_override top_k=N")
        return notes

    def default_top_k(self) -> int | None:
        """The experts-per-token transformers' config class uses when config.json omits it."""
        from transformers import CONFIG_MAPPING

        return getattr(CONFIG_MAPPING[self.model_type](), self.top_k_key, None)

    def top_k_config_edit(self, k: int) -> dict:
        return {self.top_k_key: int(k)}
