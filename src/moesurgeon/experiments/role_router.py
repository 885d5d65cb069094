"""experiment=role_router — steer experts by role with a custom router, measure it, export it.

validate roles, router and export mode (before any weight is read) -> load model, train and held-out
blocks -> check every role can trigger on the data -> profile the train split and pick each role's
experts (`experts: auto`) -> measure the unmodified model on held-out data -> substitute the
custom router (Hydra `router/` group, `_target_`) -> the same measurements -> heatmaps -> export.

Export modes (`role_router.export.mode`, `auto` picks the first that fits):
- prune   (ExpertMaskRouter): a checkpoint without the masked experts, exact where the family allows
- bias    (StaticBiasRouter on gpt_oss / deepseek_v3): the family's router bias, exact
- weights (PrototypeRouter): the new router rows, exact
- distill (anything else, e.g. RoleAwareRouter): train the standard router to imitate the custom one
- none
Bias, weights and distill report top-k agreement with the custom router on held-out data
(`export/agreement/*`). A distilled export below `min_agreement` is refused: nothing is written,
metrics.json is written with `export/done=false` and the figure, then ExportRefusedError is raised
(the command exits non-zero).
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from ..config import export_options, model_spec
from ..evaluate import evaluate_perplexity
from ..export import export_patched_model
from ..io import CheckpointReader
from ..models import load_config_dict
from ..probe import profile_usage
from ..routers import (
    ExpertMaskRouter, PrototypeRouter, RoleContext, RoleSet, RouterConfigError, StaticBiasRouter, agreement_metrics,
    record_selections, resolve_mask, role_prototypes, substitute_routers,
)
from ..routers.distill import DistillConfig, collect_teacher, distill_routers, write_router_tensors
from ..routers.measure import measure, role_share
from ..routers.static_bias import resolve_space
from ..surgery import check_bias_export, export_pruned, write_static_bias
from ..viz import plot_layer_bars, plot_usage
from .common import layer_short_names, load_model_and_data, setup

log = logging.getLogger("moesurgeon")

EXPORT_MODES = ("auto", "prune", "bias", "weights", "distill", "none")


class ExportRefusedError(RuntimeError):
    """The distilled router does not reproduce the custom one well enough to be called an export."""


def _plain(node):
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def router_class(cfg: DictConfig) -> type:
    target = cfg.get("router", {}).get("_target_") if cfg.get("router") else None
    if not target:
        raise RouterConfigError("no custom router chosen: pass router=role_aware|expert_mask|prototype|static_bias, "
                                "or router._target_=your.module.YourRouter")
    try:
        return get_class(str(target))
    except Exception as err:  # hydra wraps import errors in several types
        raise RouterConfigError(f"router._target_={target!r} cannot be imported ({err}); give the dotted path of a "
                                "torch.nn.Module class, e.g. moesurgeon.routers.RoleAwareRouter") from None


def export_mode(requested: str, cls: type) -> str:
    """Resolve `auto` and refuse a mode the router kind cannot take (family checks come after loading)."""
    if requested not in EXPORT_MODES:
        raise RouterConfigError(f"role_router.export.mode={requested!r}: expected one of {list(EXPORT_MODES)}")
    natural = ("prune" if issubclass(cls, ExpertMaskRouter) else "bias" if issubclass(cls, StaticBiasRouter)
               else "weights" if issubclass(cls, PrototypeRouter) else "distill")
    if requested == "auto":
        return natural
    if requested in ("prune", "bias", "weights") and requested != natural:
        raise RouterConfigError(
            f"role_router.export.mode={requested} cannot express a {cls.__name__}: prune exports an ExpertMaskRouter, "
            "bias a StaticBiasRouter, weights a PrototypeRouter. Use export.mode=distill (or auto)")
    return requested


def _accepted(cls: type, resources: dict) -> dict:
    """The resources (roles, context, prototypes, ...) that cls.__init__ names, or all if it takes **kwargs."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return resources
    return {k: v for k, v in resources.items() if k in params}


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n")


def run(cfg: DictConfig, out_dir: Path) -> dict:
    setup(cfg)
    opts = cfg.role_router
    roles = RoleSet.from_mapping(_plain(cfg.roles)).subset(_plain(opts.get("active_roles")))
    cls = router_class(cfg)
    mode = export_mode(str(opts.export.mode), cls)
    distill_cfg = DistillConfig(**_plain(opts.export.distill))
    min_agree = float(opts.export.min_agreement)
    config = load_config_dict(model_spec(cfg))  # a wrong model path stops here, before the data is read
    log.info("router %s, export mode %s, roles %s (%s)", cls.__name__, mode, roles.names, config.get("model_type"))

    model, tokenizer, adapter, blocks = load_model_and_data(cfg, splits=("train", "heldout"))
    train, heldout = blocks["train"], blocks["heldout"]
    bs, progress = int(cfg.data.batch_size), bool(cfg.progress)
    layers = adapter.moe_layers(model)
    top_k = {layer.index: adapter.get_top_k(layer) for layer in layers}
    if mode == "bias":
        check_bias_export(adapter, layers, resolve_space(str(cfg.router.get("space", "auto")), layers[0], adapter))
    if issubclass(cls, ExpertMaskRouter):
        resolve_mask(_plain(cfg.router.get("experts", [])), layers, top_k)  # every layer, before any pass

    tag_ids = roles.tag_token_ids(tokenizer)
    roles.check_triggers(tag_ids, heldout.input_ids, heldout.label_names, where="data.heldout")
    context = RoleContext(roles, tag_ids)

    metrics: dict = {"router": cls.__name__, "export/mode": mode, "roles": ",".join(roles.names)}
    if roles.needs_profile():
        roles.check_triggers(tag_ids, train.input_ids, train.label_names, where="data.train")
        t0 = time.perf_counter()
        train_stats, _ = profile_usage(model, adapter, train, bs, progress=progress, desc="profile train")
        train_stats.save(out_dir / "train_usage_stats.safetensors")
        roles = roles.resolve_auto(train_stats.usage_share(), train_stats.group_names, layers, top_k)
        context = RoleContext(roles, tag_ids)
        metrics["profile_train_s"] = time.perf_counter() - t0
    _write_json(out_dir / "role_experts.json",
                {r: {layer.index: roles.role_experts(r, layer.index) for layer in layers} for r in roles.names})

    before = measure(model, adapter, heldout, bs, progress=progress, desc="before")
    resources = {"roles": roles, "context": context}
    if "prototypes" in _accepted(cls, {"prototypes": None}):
        by_role = {r.name: train.select(r.profile_group) for r in roles.roles if r.profile_group in train.label_names}
        resources["prototypes"] = role_prototypes(model, adapter, by_role, bs, progress)
    extra = _accepted(cls, resources)
    # a partial, called per layer: objects (layer, RoleSet, ...) are passed at call time, so Hydra never tries
    # to turn those dataclasses into configs
    make = instantiate(cfg.router, _partial_=True, _convert_="all")
    swap = substitute_routers(model, adapter, lambda layer: make(layer=layer, adapter=adapter, **extra),
                              layers=_plain(opts.get("layers")))
    try:
        with context.attach(model):
            after = measure(model, adapter, heldout, bs, scope=context.data_label, progress=progress, desc="after")
            teacher = (record_selections(model, adapter, heldout, bs, scope=context.data_label)
                       if mode in ("bias", "weights", "distill") else None)
            metrics.update(_report(before, after, roles, layers, out_dir, Path(str(cfg.model.path)).name,
                                   bool(opts.get("figures", True))))
            if mode == "prune":
                mask = {i: list(r.masked) for i, r in swap.routers.items()}  # exactly what ran in memory
                metrics.update(export_pruned(model, adapter, Path(str(cfg.model.path)), _export_dir(cfg, out_dir),
                                             export_options(cfg), mask, heldout.input_ids[:2],
                                             allow_inexact=bool(opts.export.allow_inexact)))
                metrics["export/done"] = True
                return metrics
            caches = None
            if mode == "distill":
                caches = collect_teacher(model, adapter, train, bs, distill_cfg.max_tokens, scope=context.data_label,
                                         seed=distill_cfg.seed)
                caches = {i: c for i, c in caches.items() if i in swap.routers}  # untouched layers stay as they are
    finally:
        custom = dict(swap.routers)
        swap.restore()
    if mode == "none":
        return metrics
    return _export(cfg, model, adapter, custom, mode, caches, teacher, heldout, distill_cfg, min_agree, metrics, out_dir)


def _export(cfg, model, adapter, custom, mode, caches, teacher, heldout, distill_cfg, min_agree, metrics, out_dir):
    """Write the custom routers' standard-tensor equivalent into the model, check agreement, export."""
    bs = int(cfg.data.batch_size)
    source = Path(str(cfg.model.path))
    if mode == "bias":
        space = next(iter(custom.values())).space
        write_static_bias(model, adapter, {i: r.bias for i, r in custom.items()}, space)
    elif mode == "weights":
        write_router_tensors(model, adapter, {i: {"weight": r.new_weight} for i, r in custom.items()},
                             _store_dtype(source, adapter, model))
    else:
        t0 = time.perf_counter()
        new, dist_metrics = distill_routers(model, adapter, caches, distill_cfg)
        write_router_tensors(model, adapter, new, _store_dtype(source, adapter, model))
        metrics.update(dist_metrics)
        metrics["distill/seconds"] = time.perf_counter() - t0
    layer_idx = [layer.index for layer in adapter.moe_layers(model)]
    student = record_selections(model, adapter, heldout, bs)
    metrics.update(agreement_metrics(teacher, student, layer_idx, "export/agreement"))
    exported = evaluate_perplexity(model, heldout, bs, bool(cfg.progress), desc="exported")
    metrics.update({f"exported/ppl/{g}": v for g, v in exported.ppl.items()})
    agree = metrics["export/agreement/all"]
    log.info("top-k agreement of the standard router with the custom one on held-out data: %.4f", agree)
    if mode == "distill" and agree < min_agree:
        metrics["export/done"] = False
        _write_json(out_dir / "metrics.json", {"experiment": "role_router", **metrics})
        raise ExportRefusedError(
            f"distilled routers agree with the custom router on {agree:.1%} of held-out top-k selections, below "
            f"role_router.export.min_agreement={min_agree:.0%}; no checkpoint was written (metrics.json has the "
            "figures). Train longer (role_router.export.distill.steps), cache more tokens (distill.max_tokens), use "
            "a gentler router (lower strength), or lower min_agreement if that is acceptable")
    metrics.update(export_patched_model(model, adapter, source, _export_dir(cfg, out_dir), export_options(cfg),
                                        probe_input_ids=heldout.input_ids[:2]))
    metrics["export/done"] = True
    return metrics


def _store_dtype(source: Path, adapter, model) -> torch.dtype:
    layer = adapter.moe_layers(model)[0]
    disk = adapter.router_tensor_names(layer)[f"{layer.router_name}.weight"]
    with CheckpointReader(source) as reader:
        return reader.get(disk).dtype


def _report(before, after, roles: RoleSet, layers, out_dir: Path, model_name: str, figures: bool) -> dict:
    """Metrics and figures comparing the unmodified and the custom-routed model."""
    metrics = {**before.flat("before"), **after.flat("after")}
    for g in before.ppl:
        metrics[f"rel_change/ppl/{g}"] = after.ppl[g] / before.ppl[g] - 1.0
    metrics["speed_ratio"] = after.tokens_per_s / before.tokens_per_s
    share_b, share_a = role_share(before.stats, roles, layers), role_share(after.stats, roles, layers)
    short = layer_short_names(before.stats.layer_names)
    bars = {}
    for role in share_b:
        metrics[f"role_share/before/{role}"] = float(share_b[role].mean())
        metrics[f"role_share/after/{role}"] = float(share_a[role].mean())
        for pos, layer in enumerate(layers):
            metrics[f"role_share/after/{role}/layer{layer.index}"] = float(share_a[role][pos])
        bars[f"{role} before"], bars[f"{role} after"] = share_b[role].tolist(), share_a[role].tolist()
        log.info("%-10s share on role experts %.3f -> %.3f   ppl %.3f -> %.3f", role, share_b[role].mean(),
                 share_a[role].mean(), before.ppl.get(roles.get(role).profile_group, float("nan")),
                 after.ppl.get(roles.get(role).profile_group, float("nan")))
    log.info("tokens/s %.0f -> %.0f (x%.2f)", before.tokens_per_s, after.tokens_per_s, metrics["speed_ratio"])
    for name, m in (("before", before), ("after", after)):
        m.stats.save(out_dir / f"usage_stats_{name}.safetensors")  # experiment=router_usage tools read these
    if figures:
        _figures(before.stats, after.stats, bars, short, out_dir, model_name)
    return metrics


def _figures(before, after, bars: dict, short: list[str], out_dir: Path, model_name: str) -> None:
    """Usage heatmaps before and after, one before/after/difference figure per label, role-share bars."""
    if bars:
        plot_layer_bars(bars, short, out_dir / "role_share.png", ylabel="share of role's selections",
                        title="share of each role's expert selections on its own experts")
    sb, sa = before.usage_share(), after.usage_share()
    for name, share in (("before", sb), ("after", sa)):
        plot_usage(share.permute(1, 0, 2).numpy(), before.group_names, short, out_dir / f"usage_heatmap_{name}.png",
                   title=f"{model_name}: expert usage {name} the custom router")
    for g, group in enumerate(before.group_names):
        if int(before.tokens[0, g]) == 0:
            continue
        plot_usage(np.stack([sb[:, g].numpy(), sa[:, g].numpy()]), [f"{group} before", f"{group} after"], short,
                   out_dir / f"usage_before_after_{group}.png", title=f"{group}: expert usage before / after",
                   diff_of=(1, 0))


def _export_dir(cfg: DictConfig, out_dir: Path) -> Path:
    return Path(str(cfg.export.dir)) if cfg.export.get("dir") else out_dir / "checkpoint"
