"""Custom routers: substitute them into any supported MoE model, steer experts by role, and distil them.

- `substitute_routers(model, adapter, make)` -> `RouterSwap` (`.restore()`, or use it as a context manager)
- built-in routers (Hydra `router/` group, `_target_`): `ExpertMaskRouter`, `StaticBiasRouter`,
  `RoleAwareRouter` (with `RoleSet` + `RoleContext`), `PrototypeRouter`
- `distill.py`: train the family's standard router to imitate a custom one; `agreement.py`: measure it
"""

from .agreement import agreement_metrics, record_selections, topk_agreement
from .errors import RouterConfigError
from .expert_mask import ExpertMaskRouter, resolve_mask
from .prototype_router import PrototypeRouter, role_prototypes
from .role_context import RoleContext
from .role_aware import RoleAwareRouter
from .roles import Preference, RoleSet, RoleSpec
from .static_bias import StaticBiasRouter
from .substitute import CustomRouter, RouterSwap, is_substituted, substitute_routers

__all__ = [
    "CustomRouter", "ExpertMaskRouter", "Preference", "PrototypeRouter", "RoleAwareRouter", "RoleContext",
    "RoleSet", "RoleSpec", "RouterConfigError", "RouterSwap", "StaticBiasRouter", "agreement_metrics",
    "is_substituted", "record_selections", "resolve_mask", "role_prototypes", "substitute_routers",
    "topk_agreement",
]
