"""Architecture adapters: the only code that knows each MoE family's layout.

base.py (in memory: layers, top-k, routing, choice bias, group limit), config_json.py (config.json:
expert count, MoE layers, edits for a changed expert count), disk_names.py (tensor names on disk),
families.py (one adapter per family), selection.py (the family's routing of edited logits).
"""

from .base import ArchAdapter, MoELayer, Routing
from .config_json import ExpertCountEdits
from .disk_names import BIAS_SPACES
from .errors import ExpertCountError, InvalidConfigError, UnsupportedModelError
from .registry import get_adapter, supported_model_types

__all__ = ["ArchAdapter", "BIAS_SPACES", "ExpertCountEdits", "ExpertCountError", "InvalidConfigError", "MoELayer",
           "Routing", "UnsupportedModelError", "get_adapter", "supported_model_types"]
