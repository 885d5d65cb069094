"""A role-aware router that boosts every token alike is a static logit bias: exact where the family's router has one.

`RoleAwareRouter` adds its token's row of a per-layer [roles + 1, E] table to the router logits (the
last row, all zero, is "no role"). When every real token of the run's data (train and held-out) gets
the same row in a layer, that edit is a constant per-expert logit offset. A router that computes
`x W^T + bias` (gpt_oss) holds it exactly in its own `bias`: logits, choice and weights are the
custom router's (up to float summation order, and rounding to the stored dtype).

Not a static logit bias, so no exact export is offered (the reasons are reported to the caller):
- rows that differ between the roles the data uses (the usual case: each role prefers its own
  experts): a standard router sees hidden states, not roles;
- forced experts: lifted to a margin above the best other logit, a per-token amount;
- forbidden experts (-inf): router=expert_mask exports a mask exactly, as a pruned checkpoint;
- routers without a logit-space bias tensor. Softmax routers (qwen, mixtral, olmoe) have none. A
  choice-only bias (`adapter.choice_bias`, deepseek_v3) is not one: a logit boost also changes the
  sigmoid routing weights, and sigmoid(l + b) is not sigmoid(l) + a constant, so the choice
  differs too.
Which tensors a router has is the adapter's answer (surgery/bias_export.py `bias_tensor`), never a
test of the model type here.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..arch import ArchAdapter, MoELayer
from ..data import TokenBlocks
from ..block_runner import label_groups
from ..routers.errors import RouterConfigError
from ..routers.role_context import RoleContext
from ..routers.role_aware import RoleAwareRouter
from .bias_export import bias_tensor


class _RoleProbe(nn.Module):
    """Stands in for a model under `context.attach`: records the role ids the context gives real tokens."""

    def __init__(self, context: RoleContext):
        super().__init__()
        self.context = context
        self.seen: set[int] = set()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        roles = self.context.token_roles(input_ids.numel(), input_ids.device).view(input_ids.shape)
        self.seen.update(roles[attention_mask.bool()].unique().tolist())


@torch.no_grad()
def roles_in_data(context: RoleContext, splits: Iterable[TokenBlocks]) -> set[int]:
    """Role indices (-1: no role) that real tokens of these blocks get, by the context's own rule (tags, then
    the label of each group, exactly as the measurement and teacher passes apply them). No model forward."""
    probe = _RoleProbe(context)
    with context.attach(probe):
        for blocks in splits:
            for label, group in label_groups(blocks).items():
                with context.data_label(label):
                    probe(input_ids=group.input_ids, attention_mask=group.attention_mask)
    return probe.seen


def _role_name(router: RoleAwareRouter, r: int) -> str:
    return "no role" if r < 0 else router.roles.names[r]


def uniform_role_bias(custom: dict[int, nn.Module], adapter: ArchAdapter, layers: list[MoELayer], used: set[int]
                      ) -> tuple[dict[int, torch.Tensor] | None, str]:
    """({layer index: logit bias [E]}, "") when the custom routers are exactly one static logit bias that this
    family's router bias can hold, else (None, why not)."""
    if not custom or not all(isinstance(r, RoleAwareRouter) for r in custom.values()):
        kinds = sorted({type(r).__name__ for r in custom.values()})
        return None, f"{', '.join(kinds)} has no known standard-tensor equivalent"
    if not used:
        return None, "the data gives no real token a role"
    by_index = {layer.index: layer for layer in layers}
    why: list[str] = []
    biases: dict[int, torch.Tensor] = {}
    for i, router in sorted(custom.items()):
        n_roles = len(router.roles.roles)
        rows = sorted(used)
        table = router.bias_table[[n_roles if r < 0 else r for r in rows]].float().cpu()
        force = router.force_table[[n_roles if r < 0 else r for r in rows]].cpu()
        if bool(force.any()):
            who = [_role_name(router, r) for r, f in zip(rows, force) if bool(f.any())]
            why.append(f"roles {who} force experts (lifted above each token's best other logit, a per-token amount)")
        elif not bool(torch.isfinite(table).all()):
            who = [_role_name(router, r) for r, t in zip(rows, table) if not bool(torch.isfinite(t).all())]
            why.append(f"roles {who} forbid experts (-inf); router=expert_mask exports a mask exactly, by pruning")
        elif not bool((table == table[0]).all()):
            names = [_role_name(router, r) for r in rows]
            why.append(f"in layer {i} the data's roles {names} are steered differently, and a standard router "
                       "sees hidden states, not roles")
        else:
            biases[i] = table[0]
        if why:
            break  # one layer says enough; the rest are built the same way
    try:
        for i in custom:
            bias_tensor(adapter, by_index[i], "logits")
    except RouterConfigError:
        extra = (" (its choice-only correction bias is no substitute: a logit boost also moves the sigmoid routing "
                 "weights and is not a constant shift of the choice score)"
                 if adapter.choice_bias(by_index[i]) is not None else "")
        why.append(f"{adapter.model_type} routers have no logit-space bias tensor to hold even a uniform boost{extra}")
    return (None, "; ".join(why)) if why else (biases, "")
