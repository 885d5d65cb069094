"""Where the Hydra configs live, and what they refer to besides files.

Configs sit in the checkout's top-level `conf/`; a wheel carries them as `moesurgeon/conf`. Besides
those files the configs use the `${ms_asset:NAME}` resolver (a shipped asset's path) and each
experiment's settings defaults, stored from its settings dataclass (recipes/settings.py) as the
config `NAME/default`; `register_resolvers` registers both before Hydra composes.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

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
    """Register the `${ms_asset:...}` resolver and the experiments' settings defaults (`NAME/default`)."""
    from .recipes.settings import register_settings

    if not OmegaConf.has_resolver("ms_asset"):
        OmegaConf.register_new_resolver("ms_asset", asset_path)
    register_settings()
