"""Exact exports of router surgery into standard checkpoints: pruned experts, family router biases."""

from .prune_experts import PrunePlan, export_pruned, plan_prune, prune_patch
from .bias_export import bias_tensor, check_bias_export, write_static_bias

__all__ = ["PrunePlan", "bias_tensor", "check_bias_export", "export_pruned", "plan_prune", "prune_patch",
           "write_static_bias"]
