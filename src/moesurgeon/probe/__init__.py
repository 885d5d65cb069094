"""Router-usage profiling: a hook-owning probe and the statistics it accumulates."""

from .stats import UsageStats, js_divergence_bits, layer_metrics
from .usage_probe import RouterUsageProbe

__all__ = ["RouterUsageProbe", "UsageStats", "js_divergence_bits", "layer_metrics"]
from .profile import profile_usage  # noqa: E402

__all__ += ["profile_usage"]
from .compare import shift_metrics, usage_shift  # noqa: E402

__all__ += ["shift_metrics", "usage_shift"]
