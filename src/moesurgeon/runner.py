"""Run one experiment: config -> typed settings and one run context -> the recipe -> metrics.json.

    metrics = run_experiment(cfg, out_dir)   # cfg: the composed Hydra config

Every group of the config becomes typed settings through one function (recipes/convert.py,
`to_settings`): the root's seed/progress/threads, `model` -> ModelSpec, `data`, `export`, and the
experiment's own settings under its name (`router_lora:` -> RouterLoraSettings). The run context
(run_context.py) is built once from them; the recipe `moesurgeon.recipes.<task>` gets it and its
settings: `run(ctx, settings) -> dict` of flat metrics.

Every run writes `config_resolved.yaml` first and `metrics.json` last, in a `finally`: a failed run
records `success: false`, the error and the partial figures an exception carries in `.metrics`
(role_router's refused export). Under torchrun / accelerate only the main process writes them.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError
from .models import ModelLoadError, ModelSpec
from .recipes.convert import to_settings
from .recipes.settings import RECIPES
from .run_context import DataSettings, ExportSettings, RunContext, open_context

log = logging.getLogger("moesurgeon")


@dataclass(frozen=True)
class RunSettings:
    """The root config's own keys (conf/config.yaml)."""

    seed: int = 0
    progress: bool = True
    threads: int | str | None = "auto"


def output_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def available_experiments() -> list[str]:
    from .config import config_dir

    return sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))


def is_main_process() -> bool:
    # under torchrun / accelerate every process runs the experiment; rank 0 writes
    return int(os.environ.get("RANK", "0")) == 0


def model_spec(node) -> ModelSpec:
    """The `model` group as a ModelSpec; a model path nobody set is refused with the fix."""
    values = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node or {})
    if values.get("path") in (None, "", "???"):
        raise ModelLoadError("model.path is not set: model=local needs model.path=DIR (a Hugging Face checkpoint "
                             "directory) or model.path=ORG/NAME (a hub id); drop model=local to use the embedded model")
    return to_settings(ModelSpec, values, "model")


def build_context(cfg: DictConfig, task: str, out_dir: Path, *, loads_model: bool = True, needs_tokenizer: bool = True,
                  main_process: bool = True) -> RunContext:
    """The run context of `cfg` (see run_context.py); `loads_model=False`: no model spec, no config.json."""
    run = to_settings(RunSettings, {k: cfg.get(k) for k in ("seed", "progress", "threads") if k in cfg}, "")
    return open_context(
        task, out_dir, seed=run.seed, progress=run.progress, threads=run.threads,
        data=to_settings(DataSettings, cfg.get("data"), "data"),
        export=to_settings(ExportSettings, cfg.get("export"), "export"),
        model=model_spec(cfg.get("model")) if loads_model else None, main_process=main_process,
        needs_tokenizer=needs_tokenizer)


def run_experiment(cfg: DictConfig, out_dir: Path | None = None) -> dict:
    task = cfg.get("task")
    if not task:
        raise SystemExit("no experiment chosen: run `python -m moesurgeon experiment=NAME` with NAME one of "
                         f"{available_experiments()}")
    out_dir = Path(out_dir or output_dir())
    out_dir.mkdir(parents=True, exist_ok=True)
    main = is_main_process()
    if main:
        (out_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    log.info("experiment %s -> %s", task, out_dir)
    t0 = time.time()
    metrics: dict = {}
    error: BaseException | None = None
    try:
        if task not in RECIPES:
            raise ConfigError(f"task={task!r} names no recipe; recipes: {sorted(RECIPES)}")
        recipe = RECIPES[task]
        settings = to_settings(recipe.settings, cfg.get(task), task)
        needs_tokenizer = recipe.needs_tokenizer(settings) if callable(recipe.needs_tokenizer) else recipe.needs_tokenizer
        ctx = build_context(cfg, task, out_dir, loads_model=recipe.loads_model, needs_tokenizer=needs_tokenizer,
                            main_process=main)
        metrics = importlib.import_module(f"moesurgeon.recipes.{task}").run(ctx, settings)
    except BaseException as err:
        error, metrics = err, dict(getattr(err, "metrics", None) or {})
        raise
    finally:
        record = {"experiment": task, "wall_s": round(time.time() - t0, 3), "success": error is None, **metrics}
        if error is not None:
            record.update(success=False, error=f"{type(error).__name__}: {error}")
        if main:
            (out_dir / "metrics.json").write_text(json.dumps(record, indent=1, sort_keys=False) + "\n")
            log.info("files written in %s:\n%s", out_dir, "\n".join(written_entries(out_dir, t0)))
    return record


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def written_entries(out_dir: Path, since: float) -> list[str]:
    """One line per file or directory of the run dir written during this run (a directory: its file
    count and size), so a run ends by saying where its adapter, figures, pages and checkpoint are."""
    lines = []
    for entry in sorted(out_dir.iterdir()):
        if entry.name.startswith("."):
            continue
        files = [entry] if entry.is_file() else [f for f in entry.rglob("*") if f.is_file()]
        stats = [f.stat() for f in files]
        if not stats or max(st.st_mtime for st in stats) < since - 1:
            continue  # left by an earlier run into the same directory
        size = _size(sum(st.st_size for st in stats))
        lines.append(f"  {entry.name}  ({size})" if entry.is_file() else f"  {entry.name}/  ({len(files)} file{'s' if len(files) != 1 else ''}, {size})")
    return lines
