"""experiment=router_lora — tune only the MoE routers with LoRA, measure the effect, merge and export.

setup (settings, resume point, training data, LoRA rank and the export target checked before any
weight is read; held-out and train blocks; model) -> baseline held-out perplexity per domain and
router usage -> apply: LoRA on every router through PEFT, everything else frozen; train (resumable,
DDP-capable) -> save the PEFT adapter -> merge -> export a checkpoint in which only router tensors
differ from the source -> measure exactly what was exported -> regression guard (a failure is
logged loudly and recorded, never raised). Settings: `router_lora.*` (RouterLoraSettings,
recipes/settings.py; `router_lora.train.*`: lora/train_config.py).

Under several processes (`torchrun --nproc_per_node N`, `accelerate launch --multi_gpu`) every
process trains; measuring and writing are done by the main process while the others wait, and
every process returns the main process's metrics.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..data import DataError, load_examples, tokenize_blocks
from ..evaluate import relative_change
from ..export import export_patched_model
from ..io.atomic_dir import atomic_output_dir
from ..lora import find_resume_dir, make_accelerator, merge_routers, train_router_lora, trainable_report, wrap_routers
from ..lora.checkpointing import check_compatible
from ..lora.guard import announce, check_bound, regression_guard
from ..lora.router_peft import check_rank, router_layers
from ..lora.train_config import fingerprint
from ..measure import Measurement, measure
from ..models import is_local, resolve_device
from ..probe import shift_metrics, usage_shift
from ..run_context import RunContext
from ..viz import plot_layer_bars, plot_usage
from .common import layer_short_names
from .router_usage import write_usage_report
from .settings import RouterLoraSettings

log = logging.getLogger("moesurgeon")


def run(ctx: RunContext, settings: RouterLoraSettings) -> dict:
    # ---- setup: everything that needs no weights first
    tcfg, spec, domain = settings.train, settings.lora, settings.domain
    bound = check_bound(settings.guard_bound)
    if domain is not None and ctx.data.label_field is None:
        raise DataError(f"router_lora.domain={domain!r} needs labelled data, but data.label_field is null; set "
                        "data.label_field (e.g. data.label_field=domain) or router_lora.domain=null to train on "
                        "everything")
    accelerator = make_accelerator(resolve_device(ctx.model.device))
    ctx = ctx.moved_to(Path(_broadcast(str(ctx.out_dir), accelerator)))  # one run dir, whenever each process started
    fingerprinted = training_settings(ctx, settings, accelerator.num_processes)
    resume_dir = find_resume_dir(settings.resume, ctx.out_dir)
    if resume_dir is not None:
        check_compatible(resume_dir, fingerprinted, accelerator.num_processes)
    train_examples, train_labels = load_train_examples(ctx, domain)
    config, adapter = ctx.model_config, ctx.adapter
    if config.get("hidden_size"):
        check_rank(spec.rank, adapter.num_experts_from_config(config), int(config["hidden_size"]),
                   where=f"the routers of {ctx.model.path}")
    tokenizer = ctx.load_tokenizer()
    heldout = ctx.load_blocks(tokenizer, ("heldout",))["heldout"]
    if domain is not None and domain not in heldout.label_names:
        raise DataError(f"router_lora.domain={domain!r} has no held-out data in data.heldout (domains there: "
                        f"{heldout.label_names}): its perplexity could not be measured; add it or pick another")
    train_blocks = tokenize_blocks(train_examples, tokenizer, ctx.data.block_size, label_names=train_labels or None)
    ctx.check_token_ids(train_blocks, tokenizer, where="data.train")
    log.info("training on %s: %d blocks, %d tokens", domain or "all domains", len(train_blocks),
             train_blocks.num_tokens())
    ctx.check_export()  # <run dir>/checkpoint is the run's own: a resumed run replaces it
    model = ctx.load_model(tokenizer)
    if accelerator.num_processes > 1:
        model.to(accelerator.device)
    layers = router_layers(model, adapter)
    layer_names = [layer.router_name for layer in layers]
    top_k = adapter.get_top_k(layers[0])

    # ---- baseline (main process)
    main = accelerator.is_main_process
    metrics: dict = {}
    if main:
        base = measure_and_save(model, ctx, heldout, "before", settings.usage_reports)
        metrics.update(base.perplexity.flat("baseline"))
    accelerator.wait_for_everyone()

    # ---- apply: train
    peft_model = wrap_routers(model, adapter, spec)
    report = trainable_report(peft_model)
    log.info("trainable parameters: %s of %s (%.4f%%): LoRA r=%d on %d routers, everything else frozen",
             f"{report['trainable_params']:,}", f"{report['total_params']:,}", 100 * report["trainable_share"],
             spec.rank, len(layers))
    result = train_router_lora(
        peft_model, train_blocks, tcfg, accelerator=accelerator, top_k=top_k, adapter=adapter,
        layer_names=layer_names, run_dir=ctx.out_dir, settings=fingerprinted, resume_from=resume_dir,
        progress=ctx.progress,
    )
    agree = ranks_agree(peft_model, accelerator)

    # ---- export, then measure exactly what was exported (main process)
    if main:
        metrics.update({**report, **result.metrics(), "train/num_processes": accelerator.num_processes,
                        "train/ranks_agree": agree, "lora/rank": spec.rank, "lora/domain": domain or "all"})
        save_adapter(peft_model, ctx.out_dir / "adapter", ctx.model.path)  # a hub id stays a hub id in the adapter
        merged = merge_routers(peft_model)
        if ctx.export.enabled:
            # Export first: it rounds the router weights in memory to the checkpoint's dtype (e.g. bf16),
            # so the "tuned" figures below describe exactly the checkpoint that was written.
            metrics.update(export_patched_model(merged, adapter, ctx.source_dir, ctx.export.dir, ctx.export.options,
                                                probe_input_ids=heldout.input_ids[:2]))
            if metrics.get("export/tensors_replaced") == 0:
                log.warning("the LoRA update vanished when rounded to the checkpoint's dtype: the exported "
                            "routers equal the source; train longer or with a larger router_lora.train.lr")
        tuned = measure_and_save(merged, ctx, heldout, "after", settings.usage_reports)
        metrics.update(tuned.perplexity.flat("tuned"))
        for group, change in relative_change(tuned.ppl, base.ppl).items():
            metrics[f"rel_change/ppl/{group}"] = change
            log.info("%-10s ppl %9.4f -> %9.4f (%+.3f%%)", group, base.ppl[group], tuned.ppl[group], 100 * change)
        metrics.update(shift_metrics(base.stats, tuned.stats))
        write_shift_figures(base.stats, tuned.stats, ctx.out_dir, domain)
        verdict = regression_guard(base.ppl, tuned.ppl, domain, bound)
        metrics.update(verdict)
        announce(verdict)
    return _broadcast(metrics, accelerator)


def training_settings(ctx: RunContext, settings: RouterLoraSettings, world: int) -> dict:
    """Everything that decides the trained weights: stored in checkpoints, compared on resume."""
    path, data = ctx.model.path, ctx.data_spec("train")
    lora = settings.lora
    return {
        "model": {"path": str(Path(path).resolve()) if is_local(path) else path, "dtype": ctx.model.dtype,
                  "weights": weight_files_stamp(path)},
        "data": {"path": data.path, "split": data.split, "format": data.format, "text_field": data.text_field,
                 "label_field": data.label_field, "block_size": data.block_size, "max_examples": data.max_examples},
        "domain": settings.domain,
        "lora": {"rank": lora.rank, "alpha": lora.alpha, "use_rslora": lora.use_rslora},
        "train": settings.train.result_settings(),
        "seed": ctx.seed,
        "num_processes": world,
    }


def weight_files_stamp(path: str) -> str:
    """Name, size and mtime of each weight file: a checkpoint rebuilt in place must not be resumed into."""
    files = sorted(Path(path).glob("*.safetensors")) if is_local(path) else []
    return fingerprint({f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files})


def load_train_examples(ctx: RunContext, domain: str | None) -> tuple[list, list[str]]:
    """The training examples (only `domain`'s when set) and every label present; no tokenizer needed,
    so a wrong domain or an empty split stops before the model is loaded."""
    spec = ctx.data_spec("train")
    try:
        examples = load_examples(spec)
    except DataError as err:
        raise DataError(f"data.train: {err}") from err
    present = sorted({ex.label for ex in examples if ex.label is not None})
    if domain is not None:
        if domain not in present:
            raise DataError(f"router_lora.domain={domain!r} is absent from data.train ({spec.path}); domains "
                            f"present: {present}. Set router_lora.domain to one of them, or router_lora.domain=null "
                            "for all")
        examples = [ex for ex in examples if ex.label == domain]
    return examples, present


def measure_and_save(model, ctx: RunContext, heldout, name: str, usage_reports: bool) -> Measurement:
    """Perplexity and router usage (blocks in their own order, as the training run sees them), the usage
    statistics saved in <run dir>/<name>/ (input for experiment=usage_diff) with, optionally, their report."""
    result = measure(model, ctx.adapter, heldout, ctx.batch_size, progress=ctx.progress, desc=name, by_label=False)
    (ctx.out_dir / name).mkdir(parents=True, exist_ok=True)
    result.stats.save(ctx.out_dir / name / "usage_stats.safetensors")
    if usage_reports:
        write_usage_report(result.stats, ctx.out_dir / name, title=f"router usage, {name}")
    return result


def write_shift_figures(before, after, out_dir: Path, domain: str | None) -> None:
    """Baseline vs tuned usage of the target domain's tokens (all tokens without a domain), the
    difference, and the per-layer Jensen-Shannon divergence overall and per domain."""
    short = layer_short_names(before.layer_names)
    if domain is not None and domain in before.group_names:
        g = before.group_names.index(domain)
        panels = torch.stack([before.usage_share()[:, g], after.usage_share()[:, g]]).numpy()
        names = [f"baseline ({domain})", f"tuned ({domain})"]
    else:
        panels = torch.stack([before.merged().usage_share()[:, 0], after.merged().usage_share()[:, 0]]).numpy()
        names = ["baseline", "tuned"]
    plot_usage(panels, names, short, out_dir / "usage_shift_heatmap.png",
               title="router usage before/after router LoRA", diff_of=(1, 0))
    shift = usage_shift(before, after)
    plot_layer_bars({g: v.tolist() for g, v in shift.items()}, short, out_dir / "shift_per_layer.png",
                    ylabel="JSD (bits)", title="routing shift baseline -> tuned")


def save_adapter(peft_model, out: Path, source: str) -> None:
    peft_model.peft_config["default"].base_model_name_or_path = source
    with atomic_output_dir(out, overwrite=True) as tmp:
        peft_model.save_pretrained(str(tmp))


def _broadcast(obj, accelerator):
    if accelerator.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]


def ranks_agree(peft_model, accelerator) -> bool:
    """True when every process holds bit-identical LoRA weights (DDP should guarantee it)."""
    if accelerator.num_processes == 1:
        return True
    flat = torch.cat([p.detach().reshape(-1).float() for p in peft_model.parameters() if p.requires_grad])
    gathered = accelerator.gather(flat[None].to(accelerator.device)).cpu()
    return bool(all(torch.equal(gathered[0], row) for row in gathered[1:]))
