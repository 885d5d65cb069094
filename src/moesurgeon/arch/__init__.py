"""Architecture adapters: the only code that knows each MoE family's layout."""

from .base import ArchAdapter, InvalidConfigError, MoELayer, Routing, UnsupportedModelError
from .registry import get_adapter, supported_model_types

__all__ = ["ArchAdapter", "InvalidConfigError", "MoELayer", "Routing", "UnsupportedModelError", "get_adapter", "supported_model_types"]
