"""What experiment=role_router exports for a router that needs distillation, and what it says when it cannot.

Decided before the before/after measurements (which do not depend on it), so that a refusal is known,
and logged, as early as the data allows:
1. exact instead: a RoleAwareRouter that boosts every real token of the data alike is one static logit
   bias; on a family whose router has a logit-space bias it is exported exactly, with no distillation
   (surgery/role_bias.py says when, and why not otherwise) — taken under `role_router.export.mode=auto` only;
2. otherwise distillation (routers/distill.py), checked every few steps end to end on a sample of
   held-out blocks (`HeldoutCheck`) until the floor is reached (checks end, training goes on) or out
   of reach (training ends: refused); the whole held-out split decides every export that is written;
3. a refusal names the figure, the floor, whether an exact export exists (and why not), and the
   options.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..arch import ArchAdapter, MoELayer
from ..data import TokenBlocks
from .role_bias import roles_in_data, uniform_role_bias
from ..routers.agreement import Scope, agreement_metrics, record_selections
from ..routers.distill import DistillConfig, DistillResult, write_router_tensors
from ..routers.role_context import RoleContext
from ..routers.role_aware import RoleAwareRouter

log = logging.getLogger("moesurgeon")


@dataclass
class ExportPlan:
    mode: str                                          # the export mode that will run
    steps: int = 0                                     # distillation step budget
    biases: dict[int, torch.Tensor] | None = None      # "bias" from a role-aware router: the exact logit bias
    no_exact: str = ""                                 # why no exact export exists, when it does not
    fate: DistillResult | None = None                  # set once distillation has run

    @property
    def refused_early(self) -> bool:
        return self.fate is not None and self.fate.outcome == "unreachable"

    def refusal(self, floor: float, measured: float | None = None) -> str:
        """The refusal message: figure, floor, exact alternative (or why none), options."""
        fate = self.fate
        if measured is None:
            head = (f"distillation gave up after {fate.steps_run} of {self.steps} steps: the standard routers agree "
                    f"with the custom router on {fate.checked:.1%} of top-k selections on a sample of held-out blocks "
                    f"(end to end), and at their recent rate of gain would reach at most {fate.projected:.1%} by step "
                    f"{self.steps}, below role_router.export.min_agreement={floor:g}")
            figure = fate.checked
        else:
            head = (f"distilled routers agree with the custom router on {measured:.1%} of held-out top-k selections, "
                    f"below role_router.export.min_agreement={floor:g}")
            figure = measured
        exact = (f"No exact export exists for this router here: {self.no_exact}." if self.no_exact else
                 "An exact router-bias export exists: role_router.export.mode=auto writes it.")
        return (f"{head}; the distilled export is refused and no checkpoint was written (metrics.json has the "
                f"before/after figures, export/done=false). {exact} Options: export.enabled=false (measure "
                f"only); more role_router.export.distill.steps (now {self.steps}) or distill.max_tokens; a lower "
                f"role_router.export.min_agreement if {figure:.1%} is acceptable; or a gentler router (lower "
                "role_router.roles.<role>.prefer.<i>.strength)")


def plan_distilled(requested: str, adapter: ArchAdapter, layers: list[MoELayer], custom: dict[int, nn.Module],
                   context: RoleContext, splits: Iterable[TokenBlocks], cfg: DistillConfig) -> ExportPlan:
    """Exact role bias (under `auto`, where it exists) or distillation, with the reason when nothing is exact."""
    role_aware = all(isinstance(r, RoleAwareRouter) for r in custom.values())
    used = roles_in_data(context, splits) if role_aware else set()
    biases, why = uniform_role_bias(custom, adapter, layers, used)
    if biases is not None and requested == "auto":
        log.info("the custom router boosts every token of the data alike: a static logit bias, exported exactly "
                 "into the routers' own bias (no distillation)")
        return ExportPlan("bias", biases=biases)
    if biases is not None:
        log.info("role_router.export.mode=distill as asked; this router is also exactly a static router bias, which "
                 "role_router.export.mode=auto would write without distillation")
    else:
        log.info("no exact export for this router: %s; distilling", why)
    return ExportPlan("distill", steps=cfg.steps, no_exact=why)


def check_sample(heldout: TokenBlocks, tokens: int, seed: int = 0) -> TokenBlocks:
    """Seeded whole held-out blocks, about `tokens` real tokens, each label in its share of the split: agreement
    differs between labels (0.92 to 0.97 on the embedded model), so an unstratified sample would swing with its
    label mix."""
    per_block = heldout.attention_mask.sum(-1)
    if int(per_block.sum()) <= tokens:
        return heldout
    gen, rows = torch.Generator().manual_seed(seed), []
    for label in heldout.labels.unique():
        idx = (heldout.labels == label).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        want = tokens * per_block[idx].sum() / per_block.sum()
        rows.append(idx[: int((per_block[idx].cumsum(0) < want).sum()) + 1])
    rows = torch.cat(rows).sort().values
    return TokenBlocks(heldout.input_ids[rows], heldout.attention_mask[rows], heldout.labels[rows],
                       list(heldout.label_names))


class HeldoutCheck:
    """End-to-end top-k agreement of candidate router tensors with the custom router on a held-out sample.

    Built while the custom routers are substituted (it records their selections on the sample, inside
    `scope(label)`); called after they are restored, with {layer index: tensors}: writes them (rounded to
    the checkpoint dtype, as an export would), records the model's selections, puts the old tensors back."""

    def __init__(self, model, adapter: ArchAdapter, sample: TokenBlocks, batch_size: int, scope: Scope,
                 store_dtype: torch.dtype | None):
        self.model, self.adapter, self.sample, self.batch_size = model, adapter, sample, batch_size
        self.store_dtype = store_dtype
        self.layer_idx = [layer.index for layer in adapter.moe_layers(model)]
        self.teacher = record_selections(model, adapter, sample, batch_size, scope=scope)
        self.tokens = sample.num_tokens()

    def __call__(self, tensors: dict[int, dict[str, torch.Tensor]]) -> float:
        previous = write_router_tensors(self.model, self.adapter, tensors, self.store_dtype)
        try:
            student = record_selections(self.model, self.adapter, self.sample, self.batch_size)
        finally:
            write_router_tensors(self.model, self.adapter, previous)
        return agreement_metrics(self.teacher, student, self.layer_idx, "check")["check/all"]
