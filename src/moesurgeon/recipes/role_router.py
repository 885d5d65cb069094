"""experiment=role_router — steer experts by role with a custom router, measure it, export it.

validate roles, router, export mode and floor (before any weight is read) -> load model, train and
held-out blocks -> check every role can trigger on the data -> profile the train split and pick each
role's experts (`experts: auto`) -> build the custom router (Hydra `router/` group, `_target_`) ->
[distill only: find an exact export instead, or cache the teacher and distil, stopping as soon as the
export's fate is known] -> measure the unmodified model on held-out data -> the same measurements
with the custom router -> heatmaps -> export (or refuse).

Export modes (`role_router.export.mode`, `auto` picks the first that fits):
- prune   (ExpertMaskRouter): a checkpoint without the masked experts, exact where the family allows
- bias    (StaticBiasRouter on gpt_oss / deepseek_v3): the family's router bias, exact. Also, under
          `auto`, a RoleAwareRouter that boosts every token of the data alike on a family whose router
          has a logit bias (gpt_oss): that boost is one static logit bias (surgery/role_bias.py)
- weights (PrototypeRouter): the new router rows, exact
- distill (anything else, e.g. RoleAwareRouter): train the standard router to imitate the custom one
- none
Bias, weights and distill report top-k agreement with the custom router on held-out data
(`export/agreement/*`). A distilled export below `min_agreement` is refused: nothing is written,
metrics.json is written with `export/done=false` and the figures, then ExportRefusedError is raised
(the command exits non-zero). The refusal is known early: distillation runs before the before/after
measurements (which do not depend on it), is checked every few steps end to end on a sample of
held-out blocks, and gives up as soon as the floor is out of reach (routers/distill.py,
routers/export_plan.py); the refusal, with its figure and the options, is logged then, and the
measurements still run. Otherwise the whole held-out split's agreement decides.
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
from ..routers.distill import DistillConfig, collect_teacher, train_routers, write_router_tensors
from ..routers.export_plan import ExportPlan, HeldoutCheck, check_sample, plan_distilled
from ..routers.measure import measure, role_share
from ..routers.static_bias import resolve_space
from ..surgery import check_bias_export, export_pruned, write_static_bias
from ..viz import plot_layer_bars, plot_usage
from .common import export_dir, layer_short_names, load_model_and_data, setup, source_dir

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
            "bias a StaticBiasRouter, weights a PrototypeRouter. Use export.mode=auto (exact where the router allows "
            "it, else distilled) or distill")
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
    t_run = time.perf_counter()
    setup(cfg)
    opts = cfg.role_router
    roles = RoleSet.from_mapping(_plain(cfg.roles)).subset(_plain(opts.get("active_roles")))
    cls = router_class(cfg)
    mode = export_mode(str(opts.export.mode), cls)
    distill_cfg = DistillConfig(**_plain(opts.export.distill))
    min_agree = float(opts.export.min_agreement)
    if not 0 <= min_agree <= 1:
        raise RouterConfigError(f"role_router.export.min_agreement={min_agree}: expected a share of top-k selections "
                                "in [0, 1], e.g. 0.9")
    config = load_config_dict(model_spec(cfg))  # a wrong model path stops here, before the data is read
    log.info("router %s, export mode %s, roles %s (%s)", cls.__name__, mode, roles.names, config.get("model_type"))

    model, tokenizer, adapter, blocks = load_model_and_data(cfg, splits=("train", "heldout"), out_dir=out_dir,
                                                            exports=None if mode == "none" else "tensors")
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
    custom = dict(swap.routers)  # built and checked once; substituted again below for the "after" measurement
    plan = ExportPlan(mode)
    try:
        if mode == "distill":
            # the distilled export's fate needs only the custom routers, the train data and a held-out sample:
            # settle it (or find an exact export instead) before the before/after measurements, which do not
            # depend on it
            plan = plan_distilled(str(opts.export.mode), adapter, layers, custom, context, (train, heldout),
                                  distill_cfg)
            if plan.mode == "distill":
                with context.attach(model):
                    caches = collect_teacher(model, adapter, train, bs, distill_cfg.max_tokens,
                                             scope=context.data_label, seed=distill_cfg.seed)
                    sample = check_sample(heldout, distill_cfg.check_tokens, distill_cfg.seed)
                    check = HeldoutCheck(model, adapter, sample, bs, context.data_label,
                                         _store_dtype(source_dir(cfg), adapter, model))
    finally:
        swap.restore()
    if plan.mode == "distill":
        t0 = time.perf_counter()
        plan.fate = train_routers(model, adapter, caches, distill_cfg, floor=min_agree, check=check)
        metrics.update({**plan.fate.metrics, "distill/check_tokens": check.tokens})
        metrics["distill/seconds"] = time.perf_counter() - t0
        if plan.fate.outcome == "unreachable":
            metrics["export/fate_known_s"] = time.perf_counter() - t_run
            log.warning("%s. Measuring before/after anyway; the run will end with this error.", plan.refusal(min_agree))
    metrics["export/mode"] = plan.mode

    before = measure(model, adapter, heldout, bs, progress=progress, desc="before")
    swap = substitute_routers(model, adapter, lambda layer: custom[layer.index], layers=sorted(custom))
    try:
        with context.attach(model):
            after = measure(model, adapter, heldout, bs, scope=context.data_label, progress=progress, desc="after")
            teacher = (record_selections(model, adapter, heldout, bs, scope=context.data_label)
                       if plan.mode in ("bias", "weights", "distill") and not plan.refused_early else None)
            metrics.update(_report(before, after, roles, layers, out_dir, Path(str(cfg.model.path)).name,
                                   bool(opts.get("figures", True))))
            if plan.mode == "prune":
                mask = {i: list(r.masked) for i, r in custom.items()}  # exactly what ran in memory
                metrics.update(export_pruned(model, adapter, source_dir(cfg), export_dir(cfg, out_dir),
                                             export_options(cfg), mask, heldout.input_ids[:2],
                                             allow_inexact=bool(opts.export.allow_inexact)))
                metrics["export/done"] = True
                return metrics
    finally:
        swap.restore()
    if plan.mode == "none":
        return metrics
    if plan.refused_early:
        _refuse(metrics, out_dir, plan.refusal(min_agree))
    return _export(cfg, model, adapter, custom, plan, teacher, heldout, min_agree, metrics, out_dir, t_run)


def _export(cfg, model, adapter, custom, plan, teacher, heldout, min_agree, metrics, out_dir, t_run):
    """Write the custom routers' standard-tensor equivalent into the model, check agreement, export."""
    bs = int(cfg.data.batch_size)
    source = source_dir(cfg)
    if plan.mode == "bias" and plan.biases is not None:  # a role-aware router that is one static logit bias
        write_static_bias(model, adapter, plan.biases, "logits")
        metrics["export/exact"] = True
    elif plan.mode == "bias":
        space = next(iter(custom.values())).space
        write_static_bias(model, adapter, {i: r.bias for i, r in custom.items()}, space)
    elif plan.mode == "weights":
        write_router_tensors(model, adapter, {i: {"weight": r.new_weight} for i, r in custom.items()},
                             _store_dtype(source, adapter, model))
    else:
        write_router_tensors(model, adapter, plan.fate.tensors, _store_dtype(source, adapter, model))
    layer_idx = [layer.index for layer in adapter.moe_layers(model)]
    student = record_selections(model, adapter, heldout, bs)
    metrics.update(agreement_metrics(teacher, student, layer_idx, "export/agreement"))
    agree = metrics["export/agreement/all"]
    log.info("top-k agreement of the standard router with the custom one on held-out data: %.4f", agree)
    metrics["export/fate_known_s"] = time.perf_counter() - t_run
    if plan.mode == "distill" and agree < min_agree:
        _refuse(metrics, out_dir, plan.refusal(min_agree, measured=agree))
    exported = evaluate_perplexity(model, heldout, bs, bool(cfg.progress), desc="exported")
    metrics.update({f"exported/ppl/{g}": v for g, v in exported.ppl.items()})
    metrics.update(export_patched_model(model, adapter, source, export_dir(cfg, out_dir), export_options(cfg),
                                        probe_input_ids=heldout.input_ids[:2]))
    metrics["export/done"] = True
    return metrics


def _refuse(metrics: dict, out_dir: Path, message: str) -> None:
    """Nothing is exported: the figures go to metrics.json (export/done=false), then the run fails."""
    log.error(message)
    metrics["export/done"] = False
    _write_json(out_dir / "metrics.json", {"experiment": "role_router", **metrics})
    raise ExportRefusedError(message)


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
