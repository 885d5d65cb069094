"""`python -m moesurgeon experiment=NAME key=value ...` — a thin Hydra entry point.

A known user mistake (bad path, bad value, unsupported model, refused export) ends with its one-line
message and exit status 2; set HYDRA_FULL_ERROR=1 to get the traceback as well.
"""

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from moesurgeon.config import config_dir, register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def main(cfg: DictConfig) -> None:
    from moesurgeon.errors import user_error_types
    from moesurgeon.runner import run_experiment

    try:
        run_experiment(cfg)
    except user_error_types() as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        logging.getLogger("moesurgeon").debug("user error", exc_info=True)  # in the run's log file
        print(f"moesurgeon: error: {err}\n(set HYDRA_FULL_ERROR=1 for the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
