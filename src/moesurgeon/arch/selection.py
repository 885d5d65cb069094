"""Turn edited router logits into the family's (logits, weights, indices), honouring masks and forced experts.

Every built-in custom router ends here. Edits are expressed in logit space:
- an excluded expert (mask, forbid) has logit -inf;
- a boosted expert has a larger logit;
- a forced expert is named in a boolean `force` mask [T, E] with a per-entry `margin`.

The selection and the weights are then the family's own, via `adapter.route_from_logits`. Two cases
need more than that, because the family's choice is not a function of the logits alone:
- forced experts: softmax / top-k-on-logits families (qwen, mixtral, olmoe, gpt_oss) choose by
  logit order, so a forced expert's logit is lifted to `margin` above the best non-forced one —
  it is then chosen, and its weight is that of a top choice rather than a saturated 1.0;
- families with a choice-only bias (`adapter.choice_bias`, deepseek_v3): the choice is
  sigmoid(logit) + bias, so lifting a logit cannot out-rank a large bias. For those the forcing
  is applied to the choice bias of a per-call view of the router (`with_choice_bias`), which is
  exactly where the family applies it; weights still come from the unedited sigmoid scores.
  (Excluded -inf experts need nothing here: `route_from_logits` never selects them.)

After routing, the result is checked: no excluded expert selected, every forced expert selected.
A violation means the adapter's routing changed under us, and is raised rather than silently
running the wrong experts.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .base import ArchAdapter, MoELayer

# Added to the choice score of forced experts in choice-bias families: sigmoid scores and the
# biases are O(1), so this wins every comparison, including the group scores (sum of top-2).
_FORCE_CHOICE_BONUS = 1.0e4


class _ChoiceBiasView:
    """The router as the adapter sees it, but with another choice bias (e.g. per token, [T, E])."""

    def __init__(self, router: torch.nn.Module, attr: str, bias: torch.Tensor):
        self._router = router
        setattr(self, attr, bias)

    def __getattr__(self, name: str):
        return getattr(self._router, name)


def with_choice_bias(adapter: ArchAdapter, layer: MoELayer, bias: torch.Tensor) -> MoELayer:
    """The layer as `adapter.route_from_logits` sees it, with the family's choice bias replaced by `bias`."""
    if adapter.choice_bias(layer) is None:
        raise ValueError(f"router {layer.router_name}: {adapter.model_type} chooses experts without a choice-only "
                         "bias, so there is none to replace; edit the logits instead")
    return replace(layer, router=_ChoiceBiasView(layer.router, adapter.bias_attrs["choice"], bias))


def lift_forced(logits: torch.Tensor, force: torch.Tensor, margin: torch.Tensor | float) -> torch.Tensor:
    """Raise each forced logit to at least `margin` above the best non-forced, non-excluded logit."""
    best_other = logits.masked_fill(force, float("-inf")).amax(dim=-1, keepdim=True)
    lifted = torch.maximum(logits, best_other + margin)
    # a row whose other experts are all excluded has nothing to beat: keep its logits
    return torch.where(force & torch.isfinite(best_other), lifted, logits)


def route_edited(
    adapter: ArchAdapter,
    layer: MoELayer,
    logits: torch.Tensor,
    force: torch.Tensor | None = None,
    margin: torch.Tensor | float = 1.0,
    check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The family's routing of edited `logits` [T, E]; `force` [T, E] bool marks experts that must be chosen."""
    excluded = torch.isneginf(logits)
    if force is not None and not bool(force.any()):
        force = None
    if force is not None:
        choice_bias = adapter.choice_bias(layer)
        if choice_bias is not None:
            layer = with_choice_bias(adapter, layer, choice_bias.float() + force.float() * _FORCE_CHOICE_BONUS)
        else:
            logits = lift_forced(logits, force, margin)
    out = adapter.route_from_logits(layer, logits)
    if check:
        _check_selection(layer, out[2], excluded, force)
    return out


def _check_selection(layer: MoELayer, indices: torch.Tensor, excluded: torch.Tensor, force: torch.Tensor | None) -> None:
    chose_excluded = excluded.gather(1, indices)
    # a row with fewer allowed experts than k must fill its slots somehow; only flag rows that had enough
    enough = (~excluded).sum(dim=-1) >= indices.shape[-1]
    if bool((chose_excluded.any(dim=-1) & enough).any()):
        raise RuntimeError(
            f"router {layer.router_name}: the family routing selected an expert whose logit is -inf (masked or "
            "forbidden). The adapter's route_from_logits no longer excludes -inf experts: please report this"
        )
    if force is not None:
        missing = force.sum(dim=-1) != force.gather(1, indices).sum(dim=-1)
        if bool(missing.any()):
            raise RuntimeError(
                f"router {layer.router_name}: a forced expert was not selected for {int(missing.sum())} tokens; "
                "the family's selection did not honour the lifted logits: please report this model"
            )
