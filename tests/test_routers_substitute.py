"""Router substitution: the family contract is kept, aux-loss capture still works, restore is complete."""

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from moesurgeon.arch import get_adapter
from moesurgeon.hooks import count_hooks
from moesurgeon.routers import (
    CustomRouter, ExpertMaskRouter, RoleAwareRouter, RouterConfigError, StaticBiasRouter, is_substituted,
    substitute_routers,
)
from tiny_models import tiny_model

FAMILIES = ["qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss"]


class UserRouter(CustomRouter):
    """A user's own router: boosts one expert. Plugged in through `_target_` below."""

    def __init__(self, layer, adapter, expert: int = 0, strength: float = 50.0):
        super().__init__(layer, adapter)
        self.expert, self.strength = expert, strength

    def edit(self, logits, hidden_states):
        bump = torch.zeros_like(logits)
        bump[:, self.expert] = self.strength
        return logits + bump


def _ids(seed=0):
    return torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_router_keeps_contract_and_aux_loss(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    ids = _ids()
    ref = model(input_ids=ids, output_router_logits=True)
    hooks_before = count_hooks(model)
    hidden = torch.randn(7, 32)
    expected = {layer.index: layer.router(hidden) for layer in adapter.moe_layers(model)}
    with substitute_routers(model, adapter, lambda layer: CustomRouter(layer, adapter)) as swap:
        assert all(is_substituted(layer.router) for layer in adapter.moe_layers(model))
        for layer in adapter.moe_layers(model):
            got = layer.router(hidden)
            for want, have in zip(expected[layer.index], got, strict=True):
                assert have.dtype == want.dtype and have.shape == want.shape
                assert torch.equal(have, want)
        out = model(input_ids=ids, output_router_logits=True)
        assert len(out.router_logits) == len(adapter.moe_layers(model))  # capture hooks still fire
        if ref.aux_loss is not None:
            assert torch.allclose(out.aux_loss, ref.aux_loss)
        assert torch.equal(out.logits, ref.logits)
        assert swap.active
    assert not any(is_substituted(layer.router) for layer in adapter.moe_layers(model))
    assert all("forward" not in layer.router.__dict__ for layer in adapter.moe_layers(model))
    assert count_hooks(model) == hooks_before


def test_router_swapped_after_first_capture_still_reports_logits():
    model = tiny_model("qwen3_moe")
    adapter = get_adapter(model)
    model(input_ids=_ids(), output_router_logits=True)  # transformers installs its capture hooks here
    with substitute_routers(model, adapter, lambda layer: ExpertMaskRouter(layer, adapter, experts=[0, 1])):
        out = model(input_ids=_ids(), labels=_ids(), output_router_logits=True)
        assert len(out.router_logits) == 2 and torch.isfinite(out.aux_loss) and torch.isfinite(out.loss)
        for logits in out.router_logits:
            assert torch.isneginf(logits[:, [0, 1]]).all()


def test_restore_after_exception_and_no_hook_left():
    model = tiny_model("mixtral")
    adapter = get_adapter(model)
    model(input_ids=_ids())
    hooks = count_hooks(model)
    with pytest.raises(ZeroDivisionError):
        with substitute_routers(model, adapter, lambda layer: ExpertMaskRouter(layer, adapter, experts=[2])):
            model(input_ids=_ids())
            1 / 0
    assert count_hooks(model) == hooks
    assert not any(is_substituted(layer.router) for layer in adapter.moe_layers(model))


def test_user_class_through_hydra_target_and_chosen_layers():
    model = tiny_model("qwen3_moe")
    adapter = get_adapter(model)
    cfg = OmegaConf.create({"_target_": "test_routers_substitute.UserRouter", "expert": 5})
    make = instantiate(cfg, _partial_=True)
    with substitute_routers(model, adapter, lambda layer: make(layer=layer, adapter=adapter), layers=[2]) as swap:
        assert sorted(swap.routers) == [2]
        chosen = {}
        for layer in adapter.moe_layers(model):
            chosen[layer.index] = layer.router(torch.randn(6, 32))[2]
        assert (chosen[2] == 5).any(dim=-1).all()  # boosted everywhere in layer 2
        assert not is_substituted(adapter.moe_layers(model)[0].router)


def test_substitution_errors():
    model = tiny_model("qwen3_moe")
    adapter = get_adapter(model)
    with pytest.raises(RouterConfigError, match=r"router layers \[1\] are not MoE layers.*\[0, 2\]"):
        substitute_routers(model, adapter, lambda layer: CustomRouter(layer, adapter), layers=[1])
    with pytest.raises(RouterConfigError, match="expected a torch.nn.Module"):
        substitute_routers(model, adapter, lambda layer: "not a module")
    assert not any(is_substituted(layer.router) for layer in adapter.moe_layers(model))
    with substitute_routers(model, adapter, lambda layer: CustomRouter(layer, adapter)):
        with pytest.raises(RouterConfigError, match="already route through a custom router"):
            substitute_routers(model, adapter, lambda layer: CustomRouter(layer, adapter))


def test_router_classes_declare_export_and_resources():
    """recipes read these instead of testing classes and constructor signatures."""
    assert (CustomRouter.exact_export, CustomRouter.resources) == (None, ())
    assert (UserRouter.exact_export, UserRouter.resources) == (None, ())  # user routers: distillation only
    assert (ExpertMaskRouter.exact_export, ExpertMaskRouter.resources) == ("prune", ())
    assert (StaticBiasRouter.exact_export, StaticBiasRouter.resources) == ("bias", ())
    assert (RoleAwareRouter.exact_export, RoleAwareRouter.resources) == (None, ("roles", "context"))

