"""experiment=role_router — steer experts by role with a custom router, measure it, export it.

setup (roles, router class, export mode and floor checked before any weight is read; train and
held-out blocks; model; every role checked to trigger on the data; the train split profiled to pick
each role's experts, `experts: auto`) -> build the custom router (Hydra `router/` group, `_target_`,
with the run resources its class declares) -> [distill only: find an exact export instead, or cache
the teacher and distil, stopping as soon as the export's fate is known] -> baseline: the unmodified
model on held-out data -> apply: the same measurements with the custom router -> heatmaps -> export
(or refuse). Settings: `role_router.*` (RoleRouterSettings, recipes/settings.py).

Export modes (`role_router.export.mode`; `export.enabled=false` measures without exporting). `auto`
takes the router class's declared `exact_export`, else distils:
- prune   (exact_export "prune", ExpertMaskRouter): a checkpoint without the masked experts, exact where
          the family allows
- bias    (exact_export "bias", StaticBiasRouter on gpt_oss / deepseek_v3): the family's router bias,
          exact. Also, under `auto`, a RoleAwareRouter that boosts every token of the data alike on a
          family whose router has a logit bias (gpt_oss): that boost is one static logit bias
          (surgery/role_bias.py)
- weights (exact_export "weights", PrototypeRouter): the new router rows, exact
- distill (anything else, e.g. RoleAwareRouter): train the standard router to imitate the custom one
Bias, weights and distill report top-k agreement with the custom router on held-out data
(`export/agreement/*`). A distilled export below `min_agreement` is refused: nothing is written, and
ExportRefusedError carries the figures so far, which the runner writes to metrics.json (export/done=
false, success=false) before the command exits non-zero. The refusal is known early: distillation
runs before the before/after measurements (which do not depend on it), is checked every few steps
end to end on a sample of held-out blocks, and gives up as soon as the floor is out of reach
(routers/distill.py, surgery/export_plan.py); the refusal, with its figure and the options, is logged
then, and the measurements still run. Otherwise the whole held-out split's agreement decides.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from hydra.utils import get_class, instantiate

from ..errors import ExportRefusedError
from ..evaluate import evaluate_perplexity, relative_change
from ..export import export_patched_model
from ..io import CheckpointReader
from ..measure import measure
from ..probe import profile_usage
from ..routers import (
    RoleContext, RoleSet, RouterConfigError, agreement_metrics, record_selections, resolve_mask, role_prototypes,
    substitute_routers,
)
from ..routers.distill import collect_teacher, train_routers, write_router_tensors
from ..surgery.export_plan import ExportPlan, HeldoutCheck, check_sample, plan_distilled
from ..routers.role_share import role_share
from ..routers.static_bias import resolve_space
from ..run_context import RunContext
from ..surgery import check_bias_export, export_pruned, write_static_bias
from ..viz import plot_layer_bars, plot_usage
from .common import layer_short_names
from .settings import RoleRouterSettings

log = logging.getLogger("moesurgeon")

__all__ = ["ExportRefusedError", "export_mode", "router_class", "run"]


def router_class(router: dict | None) -> type:
    target = (router or {}).get("_target_")
    if not target:
        raise RouterConfigError("no custom router chosen: pass router=role_aware|expert_mask|prototype|static_bias, "
                                "or role_router.router._target_=your.module.YourRouter")
    try:
        return get_class(str(target))
    except Exception as err:  # hydra wraps import errors in several types
        raise RouterConfigError(f"role_router.router._target_={target!r} cannot be imported ({err}); give the dotted "
                                "path of a torch.nn.Module class, e.g. moesurgeon.routers.RoleAwareRouter") from None


def export_mode(requested: str, cls: type) -> str:
    """`auto` -> the class's declared exact export, else distill; an exact mode the class does not declare is
    refused (family checks come after loading)."""
    exact = getattr(cls, "exact_export", None)
    if requested == "auto":
        return exact or "distill"
    if requested != "distill" and requested != exact:
        raise RouterConfigError(
            f"role_router.export.mode={requested} cannot express a {cls.__name__} (its exact export: "
            f"{exact or 'none, it distils'}): prune exports an ExpertMaskRouter, bias a StaticBiasRouter, weights a "
            "PrototypeRouter. Use role_router.export.mode=auto (exact where the router allows it, else distilled) "
            "or distill")
    return requested


def run_resources(cls: type, available: dict, make: dict) -> dict:
    """The keyword arguments the router class declares in `resources`; `make` builds the costly ones on demand."""
    wanted = tuple(getattr(cls, "resources", ()))
    unknown = [r for r in wanted if r not in available and r not in make]
    if unknown:
        raise RouterConfigError(f"{cls.__name__}.resources names {unknown}, which experiment=role_router does not "
                                f"provide; it provides {sorted({*available, *make})}")
    return {r: available[r] if r in available else make[r]() for r in wanted}


def run(ctx: RunContext, settings: RoleRouterSettings) -> dict:
    t_run = time.perf_counter()
    # ---- setup: everything that needs no weights first
    roles = RoleSet.from_mapping(settings.roles).subset(settings.active_roles)
    cls = router_class(settings.router)
    opts, distill_cfg = settings.export, settings.export.distill
    mode = export_mode(opts.mode, cls) if ctx.export.enabled else "none"
    min_agree = opts.min_agreement
    log.info("router %s, export mode %s, roles %s (%s)", cls.__name__, mode, roles.names,
             ctx.model_config.get("model_type"))
    model, tokenizer, blocks = ctx.load(splits=("train", "heldout"))
    adapter, out_dir, bs, progress = ctx.adapter, ctx.out_dir, ctx.batch_size, ctx.progress
    train, heldout = blocks["train"], blocks["heldout"]
    layers = adapter.moe_layers(model)
    top_k = {layer.index: adapter.get_top_k(layer) for layer in layers}
    if mode == "bias":
        check_bias_export(adapter, layers, resolve_space(str(settings.router.get("space", "auto")), layers[0], adapter))
    if getattr(cls, "exact_export", None) == "prune":  # an expert mask: every layer's mask checked before any pass
        resolve_mask(settings.router.get("experts", []), layers, top_k)
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

    # ---- build the custom router (a partial, called per layer: objects such as the layer and the RoleSet are
    # passed at call time, so Hydra never tries to turn those dataclasses into configs)
    def prototypes():  # each role's mean hidden state per layer: a forward pass, so only for a class that asks
        by_role = {r.name: train.select(r.profile_group) for r in roles.roles if r.profile_group in train.label_names}
        return role_prototypes(model, adapter, by_role, bs, progress)

    extra = run_resources(cls, {"roles": roles, "context": context}, {"prototypes": prototypes})
    make = instantiate(settings.router, _partial_=True, _convert_="all")
    swap = substitute_routers(model, adapter, lambda layer: make(layer=layer, adapter=adapter, **extra),
                              layers=settings.layers)
    custom = dict(swap.routers)  # built and checked once; substituted again below for the "after" measurement
    plan = ExportPlan(mode)
    try:
        if mode == "distill":
            # the distilled export's fate needs only the custom routers, the train data and a held-out sample:
            # settle it (or find an exact export instead) before the before/after measurements, which do not
            # depend on it
            plan = plan_distilled(opts.mode, adapter, layers, custom, context, (train, heldout), distill_cfg)
            if plan.mode == "distill":
                with context.attach(model):
                    caches = collect_teacher(model, adapter, train, bs, distill_cfg.max_tokens,
                                             scope=context.data_label, seed=distill_cfg.seed)
                    sample = check_sample(heldout, distill_cfg.check_tokens, distill_cfg.seed)
                    check = HeldoutCheck(model, adapter, sample, bs, context.data_label,
                                         _store_dtype(ctx.source_dir, adapter, model))
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

    # ---- baseline, then apply and measure
    before = measure(model, adapter, heldout, bs, progress=progress, desc="before")
    swap = substitute_routers(model, adapter, lambda layer: custom[layer.index], layers=sorted(custom))
    try:
        with context.attach(model):
            after = measure(model, adapter, heldout, bs, scope=context.data_label, progress=progress, desc="after")
            teacher = (record_selections(model, adapter, heldout, bs, scope=context.data_label)
                       if plan.mode in ("bias", "weights", "distill") and not plan.refused_early else None)
            metrics.update(_report(before, after, roles, layers, out_dir, Path(ctx.model.path).name,
                                   settings.figures))
            if plan.mode == "prune":  # ---- export, with the mask in place
                mask = {i: list(r.masked) for i, r in custom.items()}  # exactly what ran in memory
                metrics.update(export_pruned(model, adapter, ctx.source_dir, ctx.export.dir, ctx.export.options,
                                             mask, heldout.input_ids[:2], allow_inexact=opts.allow_inexact))
                metrics["export/done"] = True
                return metrics
    finally:
        swap.restore()

    # ---- export
    if plan.mode == "none":
        return metrics
    if plan.refused_early:
        _refuse(metrics, plan.refusal(min_agree))
    return _export(ctx, model, adapter, custom, plan, teacher, heldout, min_agree, metrics, t_run)


def _export(ctx: RunContext, model, adapter, custom, plan, teacher, heldout, min_agree, metrics, t_run) -> dict:
    """Write the custom routers' standard-tensor equivalent into the model, check agreement, export."""
    if plan.mode == "bias" and plan.biases is not None:  # a role-aware router that is one static logit bias
        write_static_bias(model, adapter, plan.biases, "logits")
        metrics["export/exact"] = True
    elif plan.mode == "bias":
        space = next(iter(custom.values())).space
        write_static_bias(model, adapter, {i: r.bias for i, r in custom.items()}, space)
    elif plan.mode == "weights":
        write_router_tensors(model, adapter, {i: {"weight": r.new_weight} for i, r in custom.items()},
                             _store_dtype(ctx.source_dir, adapter, model))
    else:
        write_router_tensors(model, adapter, plan.fate.tensors, _store_dtype(ctx.source_dir, adapter, model))
    layer_idx = [layer.index for layer in adapter.moe_layers(model)]
    student = record_selections(model, adapter, heldout, ctx.batch_size)
    metrics.update(agreement_metrics(teacher, student, layer_idx, "export/agreement"))
    agree = metrics["export/agreement/all"]
    log.info("top-k agreement of the standard router with the custom one on held-out data: %.4f", agree)
    metrics["export/fate_known_s"] = time.perf_counter() - t_run
    if plan.mode == "distill" and agree < min_agree:
        _refuse(metrics, plan.refusal(min_agree, measured=agree))
    exported = evaluate_perplexity(model, heldout, ctx.batch_size, ctx.progress, desc="exported")
    metrics.update({f"exported/ppl/{g}": v for g, v in exported.ppl.items()})
    metrics.update(export_patched_model(model, adapter, ctx.source_dir, ctx.export.dir, ctx.export.options,
                                        probe_input_ids=heldout.input_ids[:2]))
    metrics["export/done"] = True
    return metrics


def _refuse(metrics: dict, message: str) -> None:
    """Nothing is exported; the figures so far travel with the error (the runner writes them to metrics.json)."""
    log.error(message)
    metrics["export/done"] = False
    raise ExportRefusedError(message, metrics)


def _store_dtype(source: Path, adapter, model) -> torch.dtype:
    layer = adapter.moe_layers(model)[0]
    disk = adapter.router_tensor_names(layer)[f"{layer.router_name}.weight"]
    with CheckpointReader(source) as reader:
        return reader.get(disk).dtype


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n")


def _report(before, after, roles: RoleSet, layers, out_dir: Path, model_name: str, figures: bool) -> dict:
    """Metrics and figures comparing the unmodified and the custom-routed model."""
    metrics = {**before.flat("before"), **after.flat("after")}
    for g, change in relative_change(after.ppl, before.ppl).items():
        metrics[f"rel_change/ppl/{g}"] = change
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


def paired_colors(series: list[str]) -> dict[str, tuple]:
    """One hue per role for its "<role> before" / "<role> after" bars: light before, dark after."""
    from matplotlib import colormaps

    pairs = colormaps["tab20"].colors  # (dark, light) pairs of the same hue
    roles = list(dict.fromkeys(name.rsplit(" ", 1)[0] for name in series))
    out = {}
    for name in series:
        role, when = name.rsplit(" ", 1)
        i = roles.index(role) % 10
        out[name] = pairs[2 * i + 1] if when == "before" else pairs[2 * i]
    return out


def _figures(before, after, bars: dict, short: list[str], out_dir: Path, model_name: str) -> None:
    """Usage heatmaps before and after, one before/after/difference figure per label, role-share bars."""
    if bars:
        plot_layer_bars(bars, short, out_dir / "role_share.png", ylabel="share of role's selections",
                        title="share of each role's expert selections on its own experts",
                        colors=paired_colors(list(bars)))
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
