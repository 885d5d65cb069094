"""Held-out evaluation shared by every experiment: perplexity per label group and tokens/s.

Every surgery reports its effect next to the unpatched baseline measured by this same code on the
same blocks, so the comparison is like for like. The forward loop is `block_runner.run_blocks`;
the loss is the one transformers computes with `labels=` (tests/test_evaluate.py checks it), summed
per label group instead of averaged per batch, so padding and batch boundaries change nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .block_runner import Batch, Scope, run_blocks
from .data import TokenBlocks


@dataclass
class EvalResult:
    ppl: dict[str, float]  # per label group, plus "all"
    nll_sum: dict[str, float]
    tokens: dict[str, int]  # predicted tokens per group
    tokens_per_s: float  # forward throughput over all (non-padding) input tokens
    seconds: float

    def flat(self, prefix: str) -> dict[str, float]:
        out = {f"{prefix}/ppl/{g}": v for g, v in self.ppl.items()}
        out[f"{prefix}/tokens_per_s"] = self.tokens_per_s
        return out


def evaluate_perplexity(model, blocks: TokenBlocks, batch_size: int = 8, progress: bool = True, desc: str = "eval",
                        *, by_label: bool = False, scope: Scope | None = None) -> EvalResult:
    """Perplexity of next-token prediction per label group (and "all") over the real tokens of `blocks`.

    `by_label` / `scope`: batch one label group at a time, inside `scope(label)` (see `run_blocks`)."""
    names = blocks.label_names or ["all"]
    nll = torch.zeros(len(names), dtype=torch.float64)
    count = torch.zeros(len(names), dtype=torch.int64)

    def add(batch: Batch, output) -> None:
        ids, mask = batch.input_ids, batch.attention_mask
        # next-token loss on real tokens only: position t predicts t+1 when both are real
        target_ok = (mask[:, 1:] * mask[:, :-1]).bool()
        loss = F.cross_entropy(output.logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
        labels = batch.label_ids.clamp_min(0).cpu()
        nll.index_add_(0, labels, (loss * target_ok).sum(-1).double().cpu())
        count.index_add_(0, labels, target_ok.sum(-1).cpu())

    done = run_blocks(model, blocks, batch_size, by_label=by_label, scope=scope, on_output=add, progress=progress,
                      desc=desc)
    ppl = {n: math.exp(nll[i] / count[i]) for i, n in enumerate(names) if count[i] > 0}
    nll_sum = {n: float(nll[i]) for i, n in enumerate(names)}
    tokens = {n: int(count[i]) for i, n in enumerate(names)}
    if len(names) > 1 or names[0] != "all":
        ppl["all"] = math.exp(float(nll.sum()) / max(int(count.sum()), 1))
    return EvalResult(ppl, nll_sum, tokens, done.tokens_per_s, done.seconds)


def relative_change(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    """{group: after/before - 1} for groups present in both, in `before`'s order."""
    return {g: after[g] / before[g] - 1.0 for g in before if g in after}
