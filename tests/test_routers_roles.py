"""Roles: parsing and validation, per-token roles from tags and labels, boost / force / forbid, auto experts."""

import pytest
import torch
from tokenizers import AddedToken

from moesurgeon.arch import get_adapter
from moesurgeon.hooks import count_hooks
from moesurgeon.routers import RoleAwareRouter, RoleContext, RoleSet, RouterConfigError, substitute_routers
from tiny_models import tiny_model, tiny_tokenizer


def roleset(**prefs):
    raw = {"code": {"tag": "<|role=code|>", "label": "code", "prefer": prefs.get("code", [])},
           "prose": {"tag": "<|role=prose|>", "label": "prose", "prefer": prefs.get("prose", [])}}
    return RoleSet.from_mapping(raw)


def tokenizer_with_tags():
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [AddedToken("<|role=code|>"), AddedToken("<|role=prose|>")]})
    return tok


def test_role_ids_follow_tags_and_labels():
    tok = tokenizer_with_tags()
    roles = roleset()
    tag_ids = roles.tag_token_ids(tok)
    code_id = tok.convert_tokens_to_ids("<|role=code|>")
    prose_id = tok.convert_tokens_to_ids("<|role=prose|>")
    model = tiny_model("qwen3_moe", vocab_size=len(tok))
    ids = torch.tensor([[5, 6, code_id, 7, 8, prose_id, 9], [5, 6, 7, 8, 9, 10, 11]])
    ctx = RoleContext(roles, tag_ids)
    seen = []
    with ctx.attach(model):
        ctx_hook = model.model.register_forward_hook(lambda *a: seen.append(ctx.token_roles(14, ids.device).view(2, 7)))
        model(input_ids=ids)
        with ctx.data_label("prose"):
            model(input_ids=ids)
        ctx_hook.remove()
    assert seen[0].tolist() == [[-1, -1, 0, 0, 0, 1, 1], [-1] * 7]
    assert seen[1].tolist() == [[1, 1, 0, 0, 0, 1, 1], [1] * 7]


def test_role_carries_over_during_generation():
    tok = tokenizer_with_tags()
    roles = roleset(code=[{"mode": "force", "experts": [3], "strength": 1.0}])
    model = tiny_model("qwen3_moe", vocab_size=len(tok))
    adapter = get_adapter(model)
    ctx = RoleContext(roles, roles.tag_token_ids(tok))
    code_id = tok.convert_tokens_to_ids("<|role=code|>")
    prompt = torch.tensor([[5, code_id, 7, 8]])
    picks = []
    hooks = count_hooks(model)
    with substitute_routers(model, adapter, lambda layer: RoleAwareRouter(layer, adapter, roles, ctx)), ctx.attach(model):
        handle = adapter.moe_layers(model)[0].router.register_forward_hook(lambda m, i, o: picks.append(o[2]))
        model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
        handle.remove()
    assert count_hooks(model) == hooks
    assert len(picks) == 3  # the prompt, then one step per new token after the first
    assert (picks[0][1:] == 3).any(-1).all()  # from the tag onward
    for step in picks[1:]:
        assert (step == 3).any(-1).all()  # generated tokens keep the prompt's role


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_boost_force_forbid_effects(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    roles = roleset(code=[{"mode": "force", "experts": [2, 5]}], prose=[{"mode": "forbid", "experts": [0, 1, 2, 3]},
                                                                       {"mode": "boost", "experts": [7], "strength": 50}])
    ctx = RoleContext(roles)
    ids = torch.randint(3, 96, (2, 12))
    picks = {}
    with substitute_routers(model, adapter, lambda layer: RoleAwareRouter(layer, adapter, roles, ctx)), ctx.attach(model):
        layer = adapter.moe_layers(model)[1]
        handle = layer.router.register_forward_hook(lambda m, i, o: picks.__setitem__(ctx._row_role, o))
        with ctx.role("code"):
            model(input_ids=ids)
        with ctx.role("prose"):
            model(input_ids=ids)
        with ctx.role(None):
            model(input_ids=ids)
        handle.remove()
    code, prose, none = picks[0], picks[1], picks[-1]
    assert (code[2].sort(-1).values == torch.tensor([2, 5])).all()
    if family == "mixtral":  # always renormalised; deepseek_v3 scales by routed_scaling_factor
        assert torch.allclose(code[1].sum(-1), torch.ones(24))
    assert not torch.isin(prose[2], torch.tensor([0, 1, 2, 3])).any() and (prose[2] == 7).any(-1).all()
    ref = layer.router(torch.zeros(1, 32))  # restored router still works
    assert ref[2].shape == (1, 2)
    assert not (none[2].sort(-1).values == torch.tensor([2, 5])).all()


def test_role_validation_errors():
    model = tiny_model("qwen3_moe")
    adapter = get_adapter(model)
    layer = adapter.moe_layers(model)[0]
    with pytest.raises(RouterConfigError, match=r"unknown role 'cod'.*\['code', 'prose'\]"):
        roleset().index("cod")
    with pytest.raises(RouterConfigError, match=r"unknown role 'cod'"):
        RoleContext(roleset()).role("cod").__enter__()
    with pytest.raises(RouterConfigError, match=r"expert index 9 is out of range.*8 experts"):
        roleset(code=[{"mode": "boost", "experts": [9]}]).layer_tables(layer, 2)
    with pytest.raises(RouterConfigError, match=r"forces 3 experts \[0, 1, 2\] in layer 0, more than top-k=2"):
        roleset(code=[{"mode": "force", "experts": [0, 1, 2]}]).layer_tables(layer, 2)
    with pytest.raises(RouterConfigError, match=r"forbids 7 of 8 experts in layer 0, leaving 1, fewer than top-k=2"):
        roleset(code=[{"mode": "forbid", "experts": list(range(7))}]).layer_tables(layer, 2)
    with pytest.raises(RouterConfigError, match=r"both forces and forbids experts \[1\]"):
        roleset(code=[{"mode": "force", "experts": [1]}, {"mode": "forbid", "experts": [1]}]).layer_tables(layer, 2)
    with pytest.raises(RouterConfigError, match=r"mode='push': expected one of"):
        roleset(code=[{"mode": "push", "experts": [1]}])
    with pytest.raises(RouterConfigError, match="has no trigger"):
        RoleSet.from_mapping({"code": {"prefer": []}})
    with pytest.raises(RouterConfigError, match=r"tag '<\|role=code\|>' is \d+ tokens"):
        roleset().tag_token_ids(tiny_tokenizer())  # tags not added to this tokenizer
    ctx = RoleContext(roleset())
    with pytest.raises(RouterConfigError, match="outside `with context.attach"):
        ctx.token_roles(4, torch.device("cpu"))


def test_forced_experts_must_fit_the_group_limit():
    model = tiny_model("deepseek_v3", topk_group=1)  # 2 groups of 4 experts, a token uses the best one
    adapter = get_adapter(model)
    layer = adapter.moe_layers(model)[0]
    context = RoleContext(roleset())
    with pytest.raises(RouterConfigError, match=r"role 'code' forces experts in groups \[0, 1\] of layer 1, but this "
                                                 r"family chooses from the best 1 of 2 groups of 4 experts"):
        RoleAwareRouter(layer, adapter, roleset(code=[{"mode": "force", "experts": [2, 5]}]), context)
    within = roleset(code=[{"mode": "force", "experts": [4, 6]}])  # both in group 1: allowed
    assert RoleAwareRouter(layer, adapter, within, RoleContext(within)).any_force
    # without a group limit (2 of 2 groups usable) the same experts can be forced
    free = tiny_model("deepseek_v3")
    free_adapter = get_adapter(free)
    spread = roleset(code=[{"mode": "force", "experts": [2, 5]}])
    assert RoleAwareRouter(free_adapter.moe_layers(free)[0], free_adapter, spread, RoleContext(spread)).any_force


def test_triggers_checked_against_data():
    tok = tokenizer_with_tags()
    tag_only = RoleSet.from_mapping({"code": {"tag": "<|role=code|>"}})
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(RouterConfigError, match=r"role 'code' would never apply: its tag '<\|role=code\|>' \(token \d+\) "
                                                r"never occurs in data.heldout"):
        tag_only.check_triggers(tag_only.tag_token_ids(tok), ids, [], where="data.heldout")
    code_id = tok.convert_tokens_to_ids("<|role=code|>")
    tag_only.check_triggers(tag_only.tag_token_ids(tok), torch.tensor([[5, code_id]]), [])
    bad_label = RoleSet.from_mapping({"code": {"label": "kode"}})
    with pytest.raises(RouterConfigError, match=r"label 'kode' is not a label of the data \(labels: \['code', 'prose'\]\)"):
        bad_label.check_triggers({}, ids, ["code", "prose"])


def test_auto_experts_from_profile():
    model = tiny_model("qwen3_moe")
    adapter = get_adapter(model)
    layers = adapter.moe_layers(model)
    share = torch.zeros(2, 2, 8)
    share[:, 0, [6, 1]] = torch.tensor([0.5, 0.3])
    share[:, 1, [2, 4, 7]] = torch.tensor([0.2, 0.5, 0.3])
    roles = roleset(code=[{"mode": "boost", "experts": "auto"}], prose=[{"mode": "boost", "experts": "auto", "top_n": 3}])
    assert roles.needs_profile()
    resolved = roles.resolve_auto(share, ["code", "prose"], layers, {0: 2, 2: 2})
    assert resolved.role_experts("code", 0) == [1, 6] and resolved.role_experts("prose", 2) == [2, 4, 7]
    with pytest.raises(RouterConfigError, match=r"no group 'code' \(groups: \['english'\]\)"):
        roles.resolve_auto(share[:, :1], ["english"], layers, {0: 2, 2: 2})


def test_context_and_swap_leave_no_hooks_after_errors():
    model = tiny_model("qwen3_moe")
    adapter = get_adapter(model)
    roles = roleset(code=[{"mode": "boost", "experts": [1], "strength": 1.0}])
    ctx = RoleContext(roles)
    model(input_ids=torch.randint(3, 96, (1, 5)))
    hooks = count_hooks(model)
    with pytest.raises(RuntimeError, match="boom"):
        with substitute_routers(model, adapter, lambda layer: RoleAwareRouter(layer, adapter, roles, ctx)), \
                ctx.attach(model), ctx.role("code"):
            model(input_ids=torch.randint(3, 96, (1, 5)))
            raise RuntimeError("boom")
    assert count_hooks(model) == hooks and ctx._row_role == -1
    with pytest.raises(RouterConfigError, match="outside `with context.attach"):  # a router without its context
        with substitute_routers(model, adapter, lambda layer: RoleAwareRouter(layer, adapter, roles, ctx)):
            model(input_ids=torch.randint(3, 96, (1, 5)))
    assert count_hooks(model) == hooks
