"""Copy chosen experts (layer, index) from a donor checkpoint of the same family and shapes into the same slots.

    plan = plan_transplant(adapter, target_dir, config, donor, experts=[1, 5], routers=False)  # no weight read
    copy_donor_experts(model, adapter, plan)     # in memory: the target with the donor's experts in those slots
    patch = transplant_patch(plan)               # Patch.replace under on-disk names (lazy values), nothing else

A donor is a sibling fine-tune or another moesurgeon export of the same model: same model_type,
expert count and MoE layers in config.json, and every tensor the transplant touches present in its
safetensors headers with the target's name, dtype and shape (checked before any weight is read,
so a donor of another family or other widths costs seconds). What is replaced, under the
adapter's on-disk names: per-expert layouts the chosen experts' own tensors (the donor's bytes);
fused-on-disk layouts (gpt_oss `experts.gate_up_proj [E, ...]`) the whole fused tensor with those
dim-0 rows taken from the donor; with `routers`, the router tensors with one row per expert
(weight rows, per-expert router biases) with those rows from the donor. Every other tensor keeps
the target's bytes. In memory, every parameter of the experts module (and with `routers` every
router tensor) whose dim 0 is E gets the donor's rows: the model the export must reproduce.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from ..arch import ArchAdapter
from ..errors import ConfigError
from ..io import CheckpointError, CheckpointReader, ComputedTensor, Patch, tensor_source

__all__ = ["TransplantPlan", "copy_donor_experts", "plan_transplant", "transplant_patch"]


@dataclass(frozen=True)
class TransplantPlan:
    target_dir: Path
    donor_dir: Path
    experts: dict[int, list[int]]         # MoE layer index -> expert slots taken from the donor
    routers: bool                         # also their router rows and per-expert router biases
    num_experts: int
    rows: dict[str, list[int] | None]     # on-disk tensor -> dim-0 rows taken from the donor (None: the whole tensor)
    allow_pickle: bool = False

    @property
    def per_layer(self) -> int:
        return max(len(v) for v in self.experts.values())


def plan_transplant(adapter: ArchAdapter, target_dir: Path, config: dict, donor: str | None, experts,
                    routers: bool = False, allow_pickle: bool = False) -> TransplantPlan:
    """Every check that needs no weight: the donor is a checkpoint of the same family, expert count, MoE layers
    and tensor shapes; the experts exist; donor and target differ. Returns the tensors to replace."""
    donor_dir = _donor_dir(donor, Path(target_dir))
    donor_config = _read_config(donor_dir)
    if donor_config.get("model_type") != adapter.model_type:
        raise ConfigError(f"expert_transplant.donor={donor}: model_type {donor_config.get('model_type')!r}, the target "
                          f"is {adapter.model_type!r}; a donor must be of the same family (a sibling fine-tune or an "
                          "export of the same model)")
    E, layers = adapter.num_experts_from_config(config), adapter.moe_layer_indices(config)
    donor_E, donor_layers = adapter.num_experts_from_config(donor_config), adapter.moe_layer_indices(donor_config)
    if (donor_E, donor_layers) != (E, layers):
        raise ConfigError(f"expert_transplant.donor={donor}: {donor_E} experts per layer in MoE layers {donor_layers}, "
                          f"the target has {E} in {layers}; a donor must have the target's expert count and MoE layers "
                          "(a pruned, merged or grown export is another shape)")
    chosen = _chosen_experts(experts, layers, E)
    rows: dict[str, list[int] | None] = {}
    try:
        with CheckpointReader(target_dir, allow_pickle=allow_pickle) as target, \
                CheckpointReader(donor_dir, allow_pickle=allow_pickle) as source:
            for layer, slots in chosen.items():
                rows.update(_layer_tensors(adapter, target, config, layer, slots, E, routers))
            for name in rows:
                _same_tensor(target, source, name)
    except CheckpointError as err:
        raise ConfigError(f"expert_transplant.donor={donor}: {err}") from None
    return TransplantPlan(Path(target_dir), donor_dir, chosen, bool(routers), E, rows, allow_pickle)


def transplant_patch(plan: TransplantPlan) -> Patch:
    """Patch.replace of every tensor the plan names, lazily: a whole donor tensor as its byte range in the
    donor's file, a tensor with donor rows computed when written (the target's with those rows replaced)."""
    patch = Patch()
    with CheckpointReader(plan.donor_dir, allow_pickle=plan.allow_pickle) as donor:
        for name, rows in plan.rows.items():
            if rows is None:
                patch.replace[name] = tensor_source(donor, name)
            else:
                info = donor.header(name)
                compute = partial(_with_donor_rows, plan, name, rows)
                patch.replace[name] = ComputedTensor(info.dtype, info.shape, compute, name)
    return patch


def _with_donor_rows(plan: TransplantPlan, name: str, rows: list[int]) -> torch.Tensor:
    with CheckpointReader(plan.target_dir, allow_pickle=plan.allow_pickle) as target, \
            CheckpointReader(plan.donor_dir, allow_pickle=plan.allow_pickle) as donor:
        value = target.get(name).clone()
        value[rows] = donor.get(name)[rows]
    return value.contiguous()


@torch.no_grad()
def copy_donor_experts(model, adapter: ArchAdapter, plan: TransplantPlan) -> int:
    """Load the donor (transformers, the model's dtype, on CPU) and copy the planned slots into `model`: every
    parameter of the experts module with dim 0 = E (and with `routers` every router tensor with dim 0 = E).
    Returns the number of tensors changed."""
    from transformers import AutoModelForCausalLM

    donor = AutoModelForCausalLM.from_pretrained(plan.donor_dir, dtype=model.dtype).eval()
    changed = 0
    try:
        donor_layers = {layer.index: layer for layer in adapter.moe_layers(donor)}
        for layer in adapter.moe_layers(model):
            slots = plan.experts.get(layer.index)
            if not slots:
                continue
            other = donor_layers[layer.index]
            pairs = [(getattr(layer.block, adapter.experts_attr), getattr(other.block, adapter.experts_attr), True)]
            if plan.routers:
                pairs.append((layer.router, other.router, False))
            for mine, theirs, recurse in pairs:
                donor_tensors = dict(_tensors(theirs, recurse))
                for name, tensor in _tensors(mine, recurse):
                    if tensor.dim() >= 1 and tensor.shape[0] == plan.num_experts:
                        index = torch.tensor(slots, device=tensor.device)
                        tensor[index] = donor_tensors[name][slots].to(tensor.device, tensor.dtype)
                        changed += 1
    finally:
        del donor
    return changed


# ---------------------------------------------------------------- helpers
def _tensors(module: torch.nn.Module, recurse: bool):
    yield from module.named_parameters(recurse=recurse)
    yield from module.named_buffers(recurse=recurse)


def _donor_dir(donor: str | None, target_dir: Path) -> Path:
    if donor in (None, ""):
        raise ConfigError("expert_transplant.donor is not set: pass expert_transplant.donor=DIR, a checkpoint of the "
                          "same family and shapes (a sibling fine-tune or another moesurgeon export)")
    path = Path(str(donor)).expanduser()
    if not path.is_dir():
        raise ConfigError(f"expert_transplant.donor={donor}: no such directory; pass the donor checkpoint's directory")
    if path.resolve() == target_dir.resolve():
        raise ConfigError(f"expert_transplant.donor={donor} is the target checkpoint itself; transplanting from it "
                          "changes nothing: pass another checkpoint (a sibling fine-tune or an export)")
    return path


def _read_config(donor_dir: Path) -> dict:
    file = donor_dir / "config.json"
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"expert_transplant.donor={donor_dir}: not a checkpoint (no config.json); pass a Hugging "
                          "Face checkpoint directory") from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"expert_transplant.donor={donor_dir}: config.json cannot be read ({err})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"expert_transplant.donor={donor_dir}: config.json is not a JSON object")
    return config


def _chosen_experts(experts, layers: list[int], E: int) -> dict[int, list[int]]:
    """{MoE layer: sorted slots} from a list (every MoE layer) or {layer: [slots]}."""
    if experts is None:
        raise ConfigError("expert_transplant.experts is not set: pass expert_transplant.experts=[3,7] (those slots in "
                          "every MoE layer) or 'expert_transplant.experts={1: [3]}'")
    if isinstance(experts, Mapping):
        unknown = [k for k in experts if int(k) not in layers]
        if unknown:
            raise ConfigError(f"expert_transplant.experts names layer {unknown[0]}, which is not an MoE layer; MoE "
                              f"layer indices are {layers}")
        spec = {int(k): list(v) for k, v in experts.items()}
    elif isinstance(experts, Sequence) and not isinstance(experts, str):
        spec = {layer: list(experts) for layer in layers}
    else:
        raise ConfigError(f"expert_transplant.experts={experts!r}: expected a list of expert indices or "
                          "{layer: [indices]}")
    chosen = {}
    for layer, slots in spec.items():
        for e in slots:
            if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < E:
                raise ConfigError(f"expert_transplant.experts: expert index {e!r} (layer {layer}) is out of range; the "
                                  f"model has {E} experts per layer, indices 0..{E - 1}")
        if slots:
            chosen[layer] = sorted(set(slots))
    if not chosen:
        raise ConfigError("expert_transplant.experts names no expert: give at least one index")
    return dict(sorted(chosen.items()))


def _layer_tensors(adapter: ArchAdapter, reader: CheckpointReader, config: dict, layer: int, slots: list[int], E: int,
                   routers: bool) -> dict[str, list[int] | None]:
    """The target's tensors a transplant of `slots` in `layer` replaces -> rows taken from the donor."""
    out: dict[str, list[int] | None] = {}
    prefix = adapter.expert_disk_prefix(layer)
    names = [n for n in reader.tensor_names() if n.startswith(prefix)]
    if adapter.expert_disk_suffixes is None:  # fused on disk: the slots are dim-0 rows of every [E, ...] tensor
        out.update({n: slots for n in names if reader.header(n).shape[:1] == (E,)})
    else:
        for e in slots:
            expected = adapter.expert_tensor_names(config, layer, e)
            found = [n for n in names if (adapter.split_expert_name(n, layer) or (None,))[0] == e]
            if not set(expected) <= set(found):
                raise CheckpointError(f"the target checkpoint lacks {sorted(set(expected) - set(found))[0]!r}: its key "
                                      f"format is not the one the {adapter.model_type} adapter knows")
            out.update(dict.fromkeys(found))
    if not out:
        raise CheckpointError(f"no expert tensors under {prefix!r} in the target checkpoint: its key format is not the "
                              f"one the {adapter.model_type} adapter knows")
    if routers:
        router = adapter.router_disk_prefix(layer)
        found = {n: slots for n in reader.tensor_names() if n.startswith(router) and reader.header(n).shape[:1] == (E,)}
        if not found:
            raise CheckpointError(f"no router tensor [{E}, ...] under {router!r} in the target checkpoint")
        out.update(found)
    return out


def _same_tensor(target: CheckpointReader, donor: CheckpointReader, name: str) -> None:
    if name not in donor:
        raise CheckpointError(f"the donor has no tensor {name!r}, which the target has; a donor must be of the same "
                              "family and on-disk format")
    mine, theirs = target.header(name), donor.header(name)
    if (mine.dtype, mine.shape) != (theirs.dtype, theirs.shape):
        raise CheckpointError(f"{name!r} is {theirs.dtype} {list(theirs.shape)} in the donor but {mine.dtype} "
                              f"{list(mine.shape)} in the target; a donor must have the target's shapes and dtypes")
