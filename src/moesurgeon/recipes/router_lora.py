"""experiment=router_lora — tune only the MoE routers with LoRA, measure the effect, merge and export.

validate settings (before any weight is read) -> load model + data -> baseline held-out perplexity
per domain and router usage -> LoRA on every router through PEFT, everything else frozen ->
train (resumable, DDP-capable) -> save the PEFT adapter -> merge -> export a checkpoint in which
only router tensors differ from the source -> the same measurements on exactly what was exported
-> regression guard (a failure is logged loudly and recorded, never raised).

Under several processes (`torchrun --nproc_per_node N`, `accelerate launch --multi_gpu`) every
process trains; measuring and writing are done by the main process while the others wait, and
every process returns the main process's metrics.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ..arch import get_adapter
from ..config import data_spec, model_spec
from ..data import DataError, TokenBlocks, load_examples, tokenize_blocks
from ..evaluate import evaluate_perplexity, relative_change
from ..io.atomic_dir import atomic_output_dir
from ..lora import (
    RouterLoraSpec, TrainConfig, find_resume_dir, make_accelerator, merge_routers, train_router_lora,
    trainable_report, wrap_routers,
)
from ..lora.checkpointing import check_compatible
from ..lora.guard import announce, check_bound, regression_guard
from ..lora.router_peft import check_rank, router_layers
from ..lora.train_config import fingerprint
from ..models import check_token_ids, is_local, load_config_dict, load_model, load_tokenizer, resolve_device
from ..probe import profile_usage, shift_metrics, usage_shift
from ..viz import plot_layer_bars, plot_usage
from .common import apply_threads, check_export_target, export_target, layer_short_names, load_tokenized, setup, source_dir
from .router_usage import write_usage_report

log = logging.getLogger("moesurgeon")


def training_settings(cfg: DictConfig, tcfg: TrainConfig, spec: RouterLoraSpec, world: int) -> dict:
    """Everything that decides the trained weights: stored in checkpoints, compared on resume."""
    path = str(cfg.model.path)
    train = cfg.data.train
    return {
        "model": {"path": str(Path(path).resolve()) if is_local(path) else path, "dtype": str(cfg.model.dtype),
                  "weights": weight_files_stamp(path)},
        "data": {"path": str(train.path), "split": train.get("split"), "format": str(cfg.data.format),
                 "text_field": str(cfg.data.text_field), "label_field": cfg.data.get("label_field"),
                 "block_size": int(cfg.data.block_size),
                 "max_examples": train.get("max_examples", cfg.data.get("max_examples"))},
        "domain": cfg.lora.get("domain"),
        "lora": {"rank": spec.rank, "alpha": spec.alpha, "use_rslora": spec.use_rslora},
        "train": tcfg.result_settings(),
        "seed": int(cfg.get("seed", 0)),
        "num_processes": world,
    }


def weight_files_stamp(path: str) -> str:
    """Name, size and mtime of each weight file: a checkpoint rebuilt in place must not be resumed into."""
    files = sorted(Path(path).glob("*.safetensors")) if is_local(path) else []
    return fingerprint({f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files})


def _broadcast(obj, accelerator):
    if accelerator.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]


def load_train_examples(cfg: DictConfig, domain: str | None) -> tuple[list, list[str]]:
    """The training examples (only `domain`'s when set) and every label present; no tokenizer needed,
    so a wrong domain or an empty split stops before the model is loaded."""
    spec = data_spec(cfg, "train")
    try:
        examples = load_examples(spec)
    except DataError as err:
        raise DataError(f"data.train: {err}") from err
    present = sorted({ex.label for ex in examples if ex.label is not None})
    if domain is not None:
        if domain not in present:
            raise DataError(f"lora.domain={domain!r} is absent from data.train ({spec.path}); domains present: "
                            f"{present}. Set lora.domain to one of them, or lora.domain=null for all")
        examples = [ex for ex in examples if ex.label == domain]
    return examples, present


def measure(model, adapter, heldout: TokenBlocks, cfg: DictConfig, out_dir: Path, name: str):
    bs, progress = int(cfg.data.batch_size), bool(cfg.progress)
    result = evaluate_perplexity(model, heldout, bs, progress, desc=f"{name} ppl")
    stats, _ = profile_usage(model, adapter, heldout, batch_size=bs, progress=progress, desc=f"{name} usage")
    (out_dir / name).mkdir(parents=True, exist_ok=True)
    stats.save(out_dir / name / "usage_stats.safetensors")  # input for experiment=usage_diff / router_usage plots
    if bool(cfg.lora.get("usage_reports", True)):
        write_usage_report(stats, out_dir / name, title=f"router usage, {name}")
    return result, stats


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


def run(cfg: DictConfig, out_dir: Path) -> dict:
    setup(cfg)
    opts = cfg.lora
    # ---- validate everything that needs no weights
    tcfg = TrainConfig.from_mapping(OmegaConf.to_container(cfg.train, resolve=True))
    spec = RouterLoraSpec(rank=opts.rank, alpha=opts.get("alpha"), use_rslora=bool(opts.get("use_rslora", False)))
    bound = check_bound(opts.guard_bound)
    domain = None if opts.get("domain") is None else str(opts.domain)
    if domain is not None and cfg.data.get("label_field") is None:
        raise DataError(f"lora.domain={domain!r} needs labelled data, but data.label_field is null; set "
                        "data.label_field (e.g. data.label_field=domain) or lora.domain=null to train on everything")
    accelerator = make_accelerator(resolve_device(str(cfg.model.device)))
    out_dir = Path(_broadcast(str(out_dir), accelerator))  # one run dir, whatever time each process started
    settings = training_settings(cfg, tcfg, spec, accelerator.num_processes)
    resume_dir = find_resume_dir(cfg.get("resume", False), out_dir)
    if resume_dir is not None:
        check_compatible(resume_dir, settings, accelerator.num_processes)
    train_examples, train_labels = load_train_examples(cfg, domain)
    config = load_config_dict(model_spec(cfg))
    pre_adapter = get_adapter(config)
    if config.get("hidden_size"):
        check_rank(spec.rank, pre_adapter.num_experts_from_config(config), int(config["hidden_size"]),
                   where=f"the routers of {cfg.model.path}")
    tokenizer = load_tokenizer(model_spec(cfg))
    heldout = load_tokenized(cfg, tokenizer, config, splits=("heldout",))["heldout"]
    if domain is not None and domain not in heldout.label_names:
        raise DataError(f"lora.domain={domain!r} has no held-out data in data.heldout (domains there: "
                        f"{heldout.label_names}): its perplexity could not be measured; add it or pick another")
    block_size = int(cfg.data.block_size)
    train_blocks = tokenize_blocks(train_examples, tokenizer, block_size, label_names=train_labels or None)
    if config.get("vocab_size"):
        check_token_ids(train_blocks.input_ids, int(config["vocab_size"]), Path(tokenizer.name_or_path),
                        where="data.train")
    log.info("training on %s: %d blocks, %d tokens", domain or "all domains", len(train_blocks),
             train_blocks.num_tokens())
    if bool(opts.get("export", True)) and accelerator.is_main_process:
        check_export_target(cfg, out_dir, overwrite_default_dir=True)  # <run dir>/checkpoint: see below

    # ---- load
    apply_threads(cfg)
    model, tokenizer, adapter = load_model(model_spec(cfg), tokenizer)
    if accelerator.num_processes > 1:
        model.to(accelerator.device)
    layers = router_layers(model, adapter)
    layer_names = [layer.router_name for layer in layers]
    top_k, scoring = adapter.get_top_k(layers[0]), adapter.scoring

    main = accelerator.is_main_process
    metrics: dict = {}
    if main:
        base, stats_before = measure(model, adapter, heldout, cfg, out_dir, "before")
        metrics.update(base.flat("baseline"))
    accelerator.wait_for_everyone()

    # ---- train
    peft_model = wrap_routers(model, adapter, spec)
    report = trainable_report(peft_model)
    log.info("trainable parameters: %s of %s (%.4f%%): LoRA r=%d on %d routers, everything else frozen",
             f"{report['trainable_params']:,}", f"{report['total_params']:,}", 100 * report["trainable_share"],
             spec.rank, len(layers))
    result = train_router_lora(
        peft_model, train_blocks, tcfg, accelerator=accelerator, top_k=top_k, scoring=scoring,
        layer_names=layer_names, run_dir=out_dir, settings=settings, resume_from=resume_dir,
        progress=bool(cfg.progress),
    )
    agree = ranks_agree(peft_model, accelerator)

    # ---- measure, write, export (main process)
    if main:
        metrics.update({**report, **result.metrics(), "train/num_processes": accelerator.num_processes,
                        "train/ranks_agree": agree, "lora/rank": spec.rank, "lora/domain": domain or "all"})
        source = str(cfg.model.path)  # what the user named (a hub id stays a hub id in adapter_config.json)
        save_adapter(peft_model, out_dir / "adapter", source)
        merged = merge_routers(peft_model)
        if bool(opts.get("export", True)):
            # Export first: it rounds the router weights in memory to the checkpoint's dtype (e.g. bf16),
            # so the "tuned" figures below describe exactly the checkpoint that was written.
            from ..export import export_patched_model  # the export modules load only when exporting

            target, export_opts = export_target(cfg, out_dir, overwrite_default_dir=True)
            metrics.update(export_patched_model(
                merged, adapter, source_dir(cfg), target, export_opts,
                probe_input_ids=heldout.input_ids[:2],
            ))
            if metrics.get("export/tensors_replaced") == 0:
                log.warning("the LoRA update vanished when rounded to the checkpoint's dtype: the exported "
                            "routers equal the source; train longer or with a larger train.lr")
        tuned, stats_after = measure(merged, adapter, heldout, cfg, out_dir, "after")
        metrics.update(tuned.flat("tuned"))
        for group, change in relative_change(tuned.ppl, base.ppl).items():
            metrics[f"rel_change/ppl/{group}"] = change
            log.info("%-10s ppl %9.4f -> %9.4f (%+.3f%%)", group, base.ppl[group], tuned.ppl[group], 100 * change)
        metrics.update(shift_metrics(stats_before, stats_after))
        write_shift_figures(stats_before, stats_after, out_dir, domain)
        verdict = regression_guard(base.ppl, tuned.ppl, domain, bound)
        metrics.update(verdict)
        announce(verdict)
    return _broadcast(metrics, accelerator)


def ranks_agree(peft_model, accelerator) -> bool:
    """True when every process holds bit-identical LoRA weights (DDP should guarantee it)."""
    if accelerator.num_processes == 1:
        return True
    flat = torch.cat([p.detach().reshape(-1).float() for p in peft_model.parameters() if p.requires_grad])
    gathered = accelerator.gather(flat[None].to(accelerator.device)).cpu()
    return bool(all(torch.equal(gathered[0], row) for row in gathered[1:]))
