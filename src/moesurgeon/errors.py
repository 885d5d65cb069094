"""User mistakes versus bugs: which exceptions the command line reports as one line.

Every module raises its own `ValueError` subclass for bad input, with a message that names the
value, what was expected and the fix. The command line prints those messages alone and exits with
status 2; anything else is a bug and keeps its traceback. `ConfigError` is for experiment settings
that belong to no other module (top-k values, export targets, thread counts, a settings key of the
wrong type). `ExportRefusedError` is a refusal at the end of a run, with the run's figures attached.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """An experiment setting is out of range, of the wrong type, unknown, or contradicts another one."""


class ExportRefusedError(RuntimeError):
    """An export that would not reproduce the surgery well enough (role_router's distilled routers below
    `min_agreement`). `metrics`: the figures measured so far, which the runner writes to metrics.json."""

    def __init__(self, message: str, metrics: dict | None = None):
        super().__init__(message)
        self.metrics = dict(metrics or {})


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exception types whose message is the whole story (imported lazily: the CLI starts fast)."""
    from omegaconf.errors import MissingMandatoryValue

    from .arch import InvalidConfigError, UnsupportedModelError
    from .data import DataError
    from .io import CheckpointError
    from .lora.checkpointing import ResumeError
    from .lora.router_peft import RouterLoraError
    from .lora.train_config import TrainConfigError
    from .model_source import ModelLoadError
    from .reference.corpus import CorpusError
    from .routers.errors import RouterConfigError

    return (
        ConfigError, MissingMandatoryValue, InvalidConfigError, UnsupportedModelError, DataError, CheckpointError,
        ResumeError, RouterLoraError, TrainConfigError, ModelLoadError, CorpusError, RouterConfigError,
        ExportRefusedError,
    )
