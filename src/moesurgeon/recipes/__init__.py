"""One readable file per experiment: validate -> load -> probe/surgery -> train -> evaluate -> export -> metrics.

Each module exposes `run(cfg: DictConfig, out_dir: Path) -> dict` (flat metrics); the Hydra entry
point (`moesurgeon.__main__`) calls it through `moesurgeon.runner`.
"""
