"""Exact exports of router and expert surgery into standard checkpoints: pruned experts (in memory or from
config.json alone), family router biases."""

from .prune_experts import (PrunePlan, export_pruned, plan_from_config, plan_prune, plan_removal, prune_checkpoint,
                            prune_patch)
from .bias_export import bias_tensor, check_bias_export, write_static_bias

__all__ = ["PrunePlan", "bias_tensor", "check_bias_export", "export_pruned", "plan_from_config", "plan_prune",
           "plan_removal", "prune_checkpoint", "prune_patch", "write_static_bias"]
