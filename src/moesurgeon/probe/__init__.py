"""Router-usage profiling: a hook-owning probe, the statistics it accumulates, and profile comparison."""

from .compare import shift_metrics, usage_shift
from .profile import profile_usage
from .stats import UsageStats, js_divergence_bits, layer_metrics
from .usage_probe import RouterUsageProbe

__all__ = [
    "RouterUsageProbe", "UsageStats", "js_divergence_bits", "layer_metrics", "profile_usage", "shift_metrics",
    "usage_shift",
]
