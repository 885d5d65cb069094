"""PrototypeRouter: role experts' rows move towards centred role prototypes; the result is a plain router weight."""

import pytest
import torch

from moesurgeon.arch import get_adapter
from moesurgeon.data import TokenBlocks
from moesurgeon.routers import PrototypeRouter, RoleSet, RouterConfigError, role_prototypes, substitute_routers
from moesurgeon.routers.distill import write_router_tensors
from moesurgeon.routers.prototype_router import prototype_weight
from tiny_models import tiny_model


def role_blocks(low: int, high: int, seed: int) -> TokenBlocks:
    ids = torch.randint(low, high, (4, 12), generator=torch.Generator().manual_seed(seed))
    return TokenBlocks(ids, torch.ones_like(ids), torch.zeros(4, dtype=torch.long), ["x"])


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_prototype_rows_and_exact_weight_equivalent(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    roles = RoleSet.from_mapping({"a": {"label": "a", "prefer": [{"mode": "boost", "experts": [1, 2]}]},
                                  "b": {"label": "b", "prefer": [{"mode": "boost", "experts": [2, 5]}]}})
    protos = role_prototypes(model, adapter, {"a": role_blocks(3, 40, 0), "b": role_blocks(50, 95, 1)})
    layers = adapter.moe_layers(model)
    assert set(protos) == {layer.index for layer in layers} and protos[layers[0].index]["a"].shape == (32,)
    old = {layer.index: layer.router.weight.detach().clone() for layer in layers}
    hidden = torch.randn(20, 32)
    with substitute_routers(model, adapter, lambda l: PrototypeRouter(l, adapter, roles, protos, "replace")) as swap:
        custom_out = {layer.index: layer.router(hidden) for layer in layers}
        new = {i: {"weight": r.new_weight} for i, r in swap.routers.items()}
    for i, w in new.items():
        changed = (w["weight"] != old[i]).any(dim=-1).nonzero().flatten().tolist()
        assert changed == [1, 2, 5]  # only role experts' rows
        assert torch.allclose(w["weight"].norm(dim=-1), old[i].norm(dim=-1), atol=1e-5)  # replace keeps row norms
    write_router_tensors(model, adapter, new)
    for layer in layers:  # the plain router with the new weight routes exactly as the custom module did
        plain = layer.router(hidden)
        assert torch.equal(plain[2], custom_out[layer.index][2])
        assert torch.allclose(plain[0], custom_out[layer.index][0], atol=1e-5)


def test_prototype_errors():
    roles = RoleSet.from_mapping({"a": {"label": "a", "prefer": [{"mode": "boost", "experts": [1]}]}})
    w = torch.randn(8, 32)
    with pytest.raises(RouterConfigError, match=r"no prototype for roles \['a'\]"):
        prototype_weight(w, 0, roles, {})
    with pytest.raises(RouterConfigError, match=r"alpha=1.5: expected a number in \(0, 1\]"):
        prototype_weight(w, 0, roles, {"a": torch.randn(32)}, "mix", alpha=1.5)
    with pytest.raises(RouterConfigError, match=r"mode='blend': expected one of"):
        prototype_weight(w, 0, roles, {"a": torch.randn(32)}, "blend")


def test_prototype_router_declares_its_export_and_resources():
    import inspect

    assert PrototypeRouter.exact_export == "weights"
    # the resources are exactly the constructor's run-time objects: not layer/adapter, not config values
    params = set(inspect.signature(PrototypeRouter.__init__).parameters) - {"self", "layer", "adapter"}
    config_values = {"mode", "alpha", "gain"}
    assert set(PrototypeRouter.resources) == params - config_values == {"roles", "prototypes"}
