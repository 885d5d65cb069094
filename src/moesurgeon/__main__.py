"""`python -m moesurgeon experiment=NAME key=value ...` — a thin Hydra entry point."""

import hydra
from omegaconf import DictConfig

from moesurgeon.config import config_dir, register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def main(cfg: DictConfig) -> None:
    from moesurgeon.runner import run_experiment

    run_experiment(cfg)


if __name__ == "__main__":
    main()
