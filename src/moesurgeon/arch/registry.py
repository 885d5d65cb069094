"""Pick the adapter for a model, a config object or a config.json dict — or explain why none fits."""

from __future__ import annotations

from typing import Any

from .base import ArchAdapter
from .errors import UnsupportedModelError
from .families import ADAPTERS

_BY_TYPE: dict[str, type[ArchAdapter]] = {t: cls for cls in ADAPTERS for t in cls.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_TYPE)


def _model_type_of(obj: Any) -> str | None:
    if isinstance(obj, dict):
        return obj.get("model_type")
    config = getattr(obj, "config", obj)
    return getattr(config, "model_type", None)


def get_adapter(obj: Any) -> ArchAdapter:
    """Adapter for a model, a `PretrainedConfig`, or a parsed config.json dict."""
    model_type = _model_type_of(obj)
    if model_type is None:
        raise UnsupportedModelError(
            f"cannot tell the model family of {type(obj).__name__}: no `model_type`. "
            "Pass a transformers model, its config, or a config.json dict with a `model_type` key."
        )
    cls = _BY_TYPE.get(model_type)
    if cls is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported: moesurgeon supports the Mixture-of-Experts "
            f"families {supported_model_types()}. A dense model has no routers to profile or patch; "
            "another MoE family needs an adapter in moesurgeon/arch/families.py."
        )
    return cls(model_type)
