"""Distillation: the standard router learns a custom router's selections; only router tensors change."""

import pytest
import torch

from moesurgeon.arch import get_adapter
from moesurgeon.routers import RoleAwareRouter, RoleContext, RoleSet, StaticBiasRouter, record_selections, substitute_routers
from moesurgeon.routers.agreement import topk_agreement
from moesurgeon.routers.distill import DistillConfig, collect_teacher, distill_routers, sample_blocks, write_router_tensors
from moesurgeon.routers.errors import RouterConfigError
from moesurgeon.data import TokenBlocks
from tiny_models import tiny_model


def blocks(n=24, seq=16, seed=0):
    """Label a draws tokens from 3..49, label b from 50..95: the role can be read off the content, as a
    standard router (which sees hidden states, not labels) must."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    ids = torch.randint(3, 50, (n, seq), generator=g) + 46 * labels[:, None]
    return TokenBlocks(ids, torch.ones_like(ids), labels, ["a", "b"])


@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v3"])
def test_distilled_router_imitates_custom(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    roles = RoleSet.from_mapping({"a": {"label": "a", "prefer": [{"mode": "boost", "experts": [1, 2], "strength": 3.0}]},
                                  "b": {"label": "b", "prefer": [{"mode": "forbid", "experts": [1, 2]}]}})
    ctx = RoleContext(roles)
    data = blocks()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with substitute_routers(model, adapter, lambda layer: RoleAwareRouter(layer, adapter, roles, ctx)), ctx.attach(model):
        teacher = record_selections(model, adapter, data, 8, scope=ctx.data_label)
        caches = collect_teacher(model, adapter, data, 8, max_tokens=10_000, scope=ctx.data_label)
    untrained = record_selections(model, adapter, data, 8)
    new, metrics = distill_routers(model, adapter, caches, DistillConfig(steps=100, lr=2e-2))
    write_router_tensors(model, adapter, new)
    student = record_selections(model, adapter, data, 8)
    for label in teacher:
        base = topk_agreement(teacher[label], untrained[label]).mean()
        got = topk_agreement(teacher[label], student[label]).mean()
        assert got > base and got > 0.85, (label, float(base), float(got))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".mlp.router." in n or ".mlp.gate." in n for n in changed)
    if family == "gpt_oss":
        assert any(n.endswith("router.bias") for n in changed)  # the family's bias is trained too
    assert all(v > 0.85 for k, v in metrics.items() if "teacher_forced_agreement" in k)


def test_distill_refuses_substituted_router_and_bad_config():
    model = tiny_model("qwen3_moe")
    adapter = get_adapter(model)
    data = blocks(n=4)
    with substitute_routers(model, adapter, lambda layer: StaticBiasRouter(layer, adapter, {0: 1.0})):
        caches = collect_teacher(model, adapter, data, 4)
        with pytest.raises(RouterConfigError, match="still routes through a custom router"):
            distill_routers(model, adapter, caches, DistillConfig(steps=1))
    with pytest.raises(RouterConfigError, match=r"distill.steps=0: expected a positive integer"):
        DistillConfig(steps=0)
    assert len(sample_blocks(blocks(n=40), max_tokens=100)) == 7  # whole blocks of 16 tokens, just past 100


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_distill_loss_ranks_in_the_family_choice_space(family):
    """Softmax families rank logits with a margin of 1; deepseek_v3 ranks sigmoid + correction bias, x10."""
    from moesurgeon.routers.distill import distill_loss

    model = tiny_model(family)
    adapter = get_adapter(model)
    layer = adapter.moe_layers(model)[0]
    student = torch.tensor([[2.0, 0.5, -1.0, 0.0, 0.1, -0.3, 1.0, 0.2]])
    indices = torch.tensor([[0, 6]])
    if family == "deepseek_v3":
        c = (student.sigmoid() + layer.router.e_score_correction_bias.float()) / 0.1
    else:
        c = student
    others = [e for e in range(8) if e not in (0, 6)]
    pairs = [torch.nn.functional.softplus(1.0 - (c[0, s] - c[0, o])) for s in (0, 6) for o in others]
    expected = torch.stack(pairs).mean()
    got = distill_loss(layer, adapter, student, student, indices, margin=1.0, kl_weight=0.0)
    assert torch.allclose(got, expected, rtol=1e-6)
    # the KL term is zero when student and teacher agree, positive otherwise
    same = distill_loss(layer, adapter, student, student, indices, margin=1.0, kl_weight=1.0)
    assert torch.allclose(same, expected, atol=1e-6)
    apart = distill_loss(layer, adapter, student, -student, indices, margin=1.0, kl_weight=1.0)
    assert float(apart) > float(same) + 0.1
