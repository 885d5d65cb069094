"""Hydra configs for the experiment tests, composed from the real conf/ tree as the CLI would.

``compose_cfg(overrides)`` composes ``config.yaml`` with command-line style overrides;
``cfg_for`` adds what an ``experiment=role_router`` run on a tiny checkpoint needs
(a small labelled corpus, two boost roles, a short distillation).
"""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from moesurgeon.config import config_dir, register_resolvers
from tiny_models import write_tiny_jsonl

__all__ = ["ROLES", "cfg_for", "compose_cfg"]

register_resolvers()

# Two roles (code, prose), each boosting the experts picked for its label.
ROLES = ("+role_router.roles={code:{label:code,prefer:[{mode:boost,experts:auto,strength:2.0}]},"
         "prose:{label:prose,prefer:[{mode:boost,experts:auto,strength:2.0}]}}")


def compose_cfg(overrides: list[str]) -> DictConfig:
    """``config.yaml`` from the package's conf/ with ``overrides`` applied (Hydra override syntax)."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def cfg_for(tmp_path: Path, ckpt: Path | str, *extra: str, roles: str = ROLES) -> DictConfig:
    """An ``experiment=role_router`` config for checkpoint ``ckpt``: tiny jsonl data, ``roles``, then ``extra``."""
    data = write_tiny_jsonl(tmp_path / "data.jsonl", repeat=2)
    return compose_cfg([
        "experiment=role_router", f"model.path={ckpt}", "data=jsonl", f"data.heldout.path={data}",
        f"data.train.path={data}", "data.label_field=domain", "data.block_size=32", "data.batch_size=8",
        "progress=false", "~role_router.roles", roles, "role_router.export.distill.steps=60", *extra])
