"""measure: perplexity per label, router-usage statistics and tokens/s of a model on held-out blocks.

The one measurement every experiment reports before and after its surgery. Two passes over the
same blocks: perplexity without router hooks (its tokens/s is the model's speed), then usage
statistics under a RouterUsageProbe (`probe_tokens_per_s`: that pass, hooks on).

Label-triggered roles are set per forward (`RoleContext.data_label`), so with a `scope` each label
group is run on its own inside `scope(label)`. `by_label=True` (the default) batches label group by
label group also without a scope, so that a measurement with a scope and one without run the same
batches: their tokens/s are like for like. `by_label=False` batches the blocks in their own order.
"""

from __future__ import annotations

from dataclasses import dataclass

from .arch import ArchAdapter
from .block_runner import Scope
from .data import TokenBlocks
from .evaluate import EvalResult, evaluate_perplexity
from .probe import UsageStats, profile_usage


@dataclass
class Measurement:
    perplexity: EvalResult          # per label group, plus "all"; tokens/s of the plain forward
    stats: UsageStats
    probe_tokens_per_s: float       # throughput of the profiling pass (router hooks on)

    @property
    def ppl(self) -> dict[str, float]:
        return self.perplexity.ppl

    @property
    def tokens_per_s(self) -> float:
        return self.perplexity.tokens_per_s

    def flat(self, prefix: str) -> dict[str, float]:
        out = self.perplexity.flat(prefix)
        out[f"{prefix}/probe_tokens_per_s"] = self.probe_tokens_per_s
        return out


def measure(model, adapter: ArchAdapter, blocks: TokenBlocks, batch_size: int = 8, scope: Scope | None = None,
            progress: bool = False, desc: str = "eval", by_label: bool = True) -> Measurement:
    """Perplexity per label, usage statistics and tokens/s; see the module docstring."""
    if scope is not None and not by_label:
        raise ValueError("measure(scope=...) runs each label group inside scope(label): leave by_label=True")
    ppl = evaluate_perplexity(model, blocks, batch_size, progress, desc=f"{desc} ppl", by_label=by_label, scope=scope)
    stats, probe_tokens_per_s = profile_usage(model, adapter, blocks, batch_size, progress=progress,
                                              desc=f"{desc} usage", by_label=by_label, scope=scope)
    return Measurement(ppl, stats, probe_tokens_per_s)
