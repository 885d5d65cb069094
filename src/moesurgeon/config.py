"""Where the Hydra configs live, the `${ms_asset:...}` resolver, and typed views of config groups.

Configs sit in the checkout's top-level `conf/`; a wheel carries them as `moesurgeon/conf`.
Only experiment code touches DictConfig: it turns groups into the typed specs below.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .data import DataSpec
from .models import ModelLoadError, ModelSpec

PACKAGE_DIR = Path(__file__).resolve().parent


def config_dir() -> Path:
    packaged = PACKAGE_DIR / "conf"  # installed from a wheel
    if packaged.is_dir():
        return packaged
    checkout = PACKAGE_DIR.parent.parent / "conf"  # editable install / source checkout
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError(f"moesurgeon configs not found in {packaged} or {checkout}; reinstall the package")


def asset_path(name: str) -> str:
    # No existence check here: configs resolve also for experiments that never read the asset
    # (usage_diff); loaders report a missing path with the rebuild command.
    return str(PACKAGE_DIR / "assets" / name)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("ms_asset"):
        OmegaConf.register_new_resolver("ms_asset", asset_path)


def model_spec(cfg: DictConfig) -> ModelSpec:
    m = cfg.model
    if OmegaConf.is_missing(m, "path") or m.get("path") in (None, ""):
        raise ModelLoadError("model.path is not set: model=local needs model.path=DIR (a Hugging Face checkpoint "
                             "directory) or model.path=ORG/NAME (a hub id); drop model=local to use the embedded model")
    return ModelSpec(
        path=str(m.path), dtype=str(m.dtype), device=str(m.get("device", "auto")), device_map=m.get("device_map"),
        trust_remote_code=bool(m.trust_remote_code), attn_implementation=m.get("attn_implementation"),
        experts_implementation=m.get("experts_implementation"), tokenizer=m.get("tokenizer"),
        allow_pickle=bool(m.get("allow_pickle", False)),
    )


def data_spec(cfg: DictConfig, split: str = "heldout", only_labels=None) -> DataSpec:
    d = cfg.data
    part = d[split]
    if part is None or part.get("path") is None:
        raise ValueError(f"data.{split}.path is not set: pass data.{split}.path=<file or dataset dir>")
    return DataSpec(
        path=str(part.path), format=str(d.format), text_field=str(d.text_field),
        label_field=d.get("label_field"), split=part.get("split"), block_size=int(d.block_size),
        max_examples=part.get("max_examples", d.get("max_examples")),
        only_labels=list(only_labels) if only_labels else None, seed=int(cfg.get("seed", 0)),
    )


def export_options(cfg: DictConfig):
    from .export import ExportOptions

    e = cfg.export
    return ExportOptions(
        mode=str(e.mode), max_shard_size=str(e.max_shard_size), link=str(e.link), overwrite=bool(e.overwrite),
        verify_reload=e.verify_reload, verify_max_bytes=str(e.verify_max_bytes),
        allow_pickle=bool(cfg.model.get("allow_pickle", False)),
    )
