"""Router-usage profiling (a hook-owning probe, its statistics, profile comparison) and per-expert scores."""

from .compare import shift_metrics, usage_shift
from .expert_scores import ExpertScoreProbe, ExpertScores, score_experts
from .profile import profile_usage
from .stats import UsageStats, js_divergence_bits, layer_metrics
from .usage_probe import RouterUsageProbe

__all__ = [
    "ExpertScoreProbe", "ExpertScores", "score_experts",
    "RouterUsageProbe", "UsageStats", "js_divergence_bits", "layer_metrics", "profile_usage", "shift_metrics",
    "usage_shift",
]
