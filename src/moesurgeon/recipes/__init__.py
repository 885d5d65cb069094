"""One readable file per experiment, torchtune-recipe style: setup -> baseline -> apply -> measure -> export.

Each module exposes `run(ctx: RunContext, settings) -> dict` (flat metrics). The runner
(moesurgeon/runner.py) builds the run context once (moesurgeon/run_context.py) and converts the
experiment's settings (`NAME:` in the config) into its dataclass (settings.py) with one function
(convert.py). Only code in this package and the runner touches DictConfig.
"""
