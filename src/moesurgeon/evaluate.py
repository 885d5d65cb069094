"""Held-out evaluation shared by every experiment: perplexity per label group and tokens/s.

Every surgery reports its effect next to the unpatched baseline measured by this same code on the
same blocks, so the comparison is like for like.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import TokenBlocks
from .models import input_device


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


@torch.no_grad()
def evaluate_perplexity(model, blocks: TokenBlocks, batch_size: int = 8, progress: bool = True, desc: str = "eval") -> EvalResult:
    device = input_device(model)
    names = blocks.label_names or ["all"]
    nll = torch.zeros(len(names), dtype=torch.float64)
    count = torch.zeros(len(names), dtype=torch.int64)
    seen_tokens = 0
    elapsed = 0.0
    bar = tqdm(total=len(blocks), desc=desc, unit="blk", disable=not progress, leave=False)
    for batch in blocks.batches(batch_size):
        ids = batch["input_ids"].to(device)
        mask = batch["attention_mask"].to(device)
        t0 = time.perf_counter()
        logits = model(input_ids=ids, attention_mask=mask).logits
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed += time.perf_counter() - t0
        seen_tokens += int(mask.sum())
        # next-token loss on real tokens only: position t predicts t+1 when both are real
        target_ok = (mask[:, 1:] * mask[:, :-1]).bool()
        loss = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
        per_row = (loss * target_ok).sum(-1).double().cpu()
        rows = target_ok.sum(-1).cpu()
        labels = batch["label_ids"].clamp_min(0)
        nll.index_add_(0, labels, per_row)
        count.index_add_(0, labels, rows)
        bar.update(ids.shape[0])
        bar.set_postfix(tok_s=f"{seen_tokens / max(elapsed, 1e-9):.0f}")
    bar.close()
    ppl = {n: math.exp(nll[i] / count[i]) for i, n in enumerate(names) if count[i] > 0}
    nll_sum = {n: float(nll[i]) for i, n in enumerate(names)}
    tokens = {n: int(count[i]) for i, n in enumerate(names)}
    if len(names) > 1 or names[0] != "all":
        ppl["all"] = math.exp(float(nll.sum()) / max(int(count.sum()), 1))
    return EvalResult(ppl, nll_sum, tokens, seen_tokens / max(elapsed, 1e-9), elapsed)


def relative_change(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    """{group: after/before - 1} for groups present in both."""
    return {g: after[g] / before[g] - 1.0 for g in before if g in after}
