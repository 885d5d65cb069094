"""Run one experiment inside its Hydra output directory and write the common artefacts.

Every run writes `config_resolved.yaml` and `metrics.json` (flat keys) next to whatever the
experiment itself writes (data files, plots, checkpoint/).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("moesurgeon")


def output_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def available_experiments() -> list[str]:
    from .config import config_dir

    return sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))


def run_experiment(cfg: DictConfig, out_dir: Path | None = None) -> dict:
    task = cfg.get("task")
    if not task:
        raise SystemExit(
            "no experiment chosen: run `python -m moesurgeon experiment=NAME` with NAME one of "
            f"{available_experiments()}"
        )
    out_dir = Path(out_dir or output_dir())
    out_dir.mkdir(parents=True, exist_ok=True)
    # under torchrun / accelerate every process runs the experiment; only rank 0 writes the common files
    main_process = int(os.environ.get("RANK", "0")) == 0
    if main_process:
        (out_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    log.info("experiment %s -> %s", task, out_dir)
    module = importlib.import_module(f"moesurgeon.recipes.{task}")
    t0 = time.time()
    metrics = module.run(cfg, out_dir)
    metrics = {"experiment": task, "wall_s": round(time.time() - t0, 3), **metrics}
    if main_process:
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=False) + "\n")
        log.info("wrote %s", out_dir / "metrics.json")
    return metrics
