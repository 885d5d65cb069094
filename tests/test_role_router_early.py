"""experiment=role_router: the distilled export's fate decided early, and the exact role-bias export instead of it.

Tiny checkpoints; every assertion is on recorded fields (steps run, outcome, agreement), never on time.
"""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from moesurgeon.arch import get_adapter
from moesurgeon.routers import RoleAwareRouter, RoleContext, RoleSet, RouterConfigError, substitute_routers
from moesurgeon.routers.distill import DistillConfig
from moesurgeon.surgery.export_plan import check_sample, plan_distilled
from moesurgeon.runner import run_experiment
from moesurgeon.data import TokenBlocks
from helpers_hydra import cfg_for
from tiny_models import TINY_TEXTS, tiny_model


def boost(experts, strength=2.0):
    return f"prefer:[{{mode:boost,experts:{experts},strength:{strength}}}]"


# both roles push the same experts by the same amount: one static logit bias for every token
UNIFORM = f"+role_router.roles={{code:{{label:code,{boost('[1,2]')}}},prose:{{label:prose,{boost('[1,2]')}}}}}"
# opposite experts for the two roles
OPPOSITE = f"+role_router.roles={{code:{{label:code,{boost('[0,1]', 4.0)}}},prose:{{label:prose,{boost('[6,7]', 4.0)}}}}}"


def write_same_text_both_labels(path):
    """Every text twice, once labelled code and once prose: the role cannot be read off the content."""
    texts = [t for ts in TINY_TEXTS.values() for t in ts]
    with open(path, "w") as f:
        for label in ("code", "prose"):
            for text in texts * 2:
                f.write(json.dumps({"text": text * 3, "domain": label}) + "\n")
    return path


def test_unreachable_floor_refused_early_from_the_cli(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("qwen3_moe")
    data = write_same_text_both_labels(tmp_path / "same.jsonl")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "moesurgeon", "experiment=role_router", f"model.path={ckpt}", "data=jsonl",
           f"data.heldout.path={data}", f"data.train.path={data}", "data.label_field=domain", "data.block_size=32",
           "data.batch_size=8", "progress=false", "role_router.figures=false", "~role_router.roles", OPPOSITE,
           "role_router.export.distill.steps=300", "role_router.export.distill.check_every=5", f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert "distillation gave up after" in proc.stderr and "min_agreement=0.9" in proc.stderr
    assert "No exact export exists for this router here" in proc.stderr and "steered differently" in proc.stderr
    assert "export.enabled=false" in proc.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["export/done"] is False and m["distill/outcome"] == "unreachable"
    assert m["distill/stopped_early_step"] == m["distill/steps_run"] == m["distill/decided_step"] < 300
    assert m["distill/checked_agreement"] < 0.9 - 0.01
    for role in ("code", "prose"):  # the measurements still ran and were written
        assert m[f"before/ppl/{role}"] > 1 and m[f"after/ppl/{role}"] > 1
        assert m[f"role_share/after/{role}"] > m[f"role_share/before/{role}"]
    assert "export/agreement/all" not in m  # decided on the check sample: no pass over the whole split was spent
    assert not (out / "checkpoint").exists()


def test_floor_reached_stops_before_the_step_budget(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("qwen3_moe")
    out = tmp_path / "run"
    m = run_experiment(cfg_for(tmp_path, ckpt, "role_router.export.distill.steps=300",
                               "role_router.export.distill.check_every=5",
                               "role_router.export.distill.stop_at_floor=true",
                               "role_router.export.min_agreement=0.8", "role_router.figures=false"), out)
    assert m["distill/outcome"] == "reached"
    assert m["distill/stopped_early_step"] == m["distill/steps_run"] == m["distill/decided_step"] < 300
    assert m["distill/checked_agreement"] >= 0.81
    assert m["export/done"] is True and m["export/agreement/all"] >= 0.8
    AutoModelForCausalLM.from_pretrained(out / "checkpoint")


def test_uniform_role_boost_exported_exactly_on_gpt_oss(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("gpt_oss")
    out = tmp_path / "exact"
    m = run_experiment(cfg_for(tmp_path, ckpt, roles=UNIFORM), out)
    assert m["export/mode"] == "bias" and m["export/exact"] is True and m["export/done"] is True
    assert m["export/agreement/all"] == 1.0
    assert not any(k.startswith("distill/") for k in m)  # nothing was distilled
    assert m["role_share/after/code"] > m["role_share/before/code"]
    AutoModelForCausalLM.from_pretrained(out / "checkpoint")  # plain transformers reloads it
    old = {k: v for f in ckpt.glob("*.safetensors") for k, v in load_file(f).items() if k.endswith("router.bias")}
    new = {k: v for f in (out / "checkpoint").glob("*.safetensors") for k, v in load_file(f).items()
           if k.endswith("router.bias")}
    assert old.keys() == new.keys() and len(old) == 3
    for k in old:
        expected = old[k].clone()
        expected[[1, 2]] += 2.0
        assert torch.equal(new[k], expected), k


def _plan(family, roles, requested="auto", label_names=("code", "prose")):
    model = tiny_model(family)
    adapter = get_adapter(model)
    roles = RoleSet.from_mapping(roles)
    ctx = RoleContext(roles)
    ids = torch.randint(3, 90, (4, 8))
    data = TokenBlocks(ids, torch.ones_like(ids), torch.arange(4) % len(label_names), list(label_names))
    with substitute_routers(model, adapter, lambda layer: RoleAwareRouter(layer, adapter, roles, ctx)) as swap:
        custom = dict(swap.routers)
    return plan_distilled(requested, adapter, adapter.moe_layers(model), custom, ctx, [data], DistillConfig())


def _role(label, experts, mode="boost", strength=2.0):
    return {"label": label, "prefer": [{"mode": mode, "experts": experts, "strength": strength}]}


def test_which_role_routers_have_an_exact_export():
    same = {"code": _role("code", [1, 2]), "prose": _role("prose", [1, 2])}
    plan = _plan("gpt_oss", same)
    assert plan.mode == "bias" and plan.no_exact == ""
    assert all(torch.equal(b, torch.tensor([0, 2.0, 2.0, 0, 0, 0, 0, 0])) for b in plan.biases.values())
    assert _plan("gpt_oss", same, requested="distill").mode == "distill"  # asked for: distilled, not replaced
    cases = [  # (family, roles, labels in the data, what the reason says)
        ("mixtral", same, ("code", "prose"), "mixtral routers have no logit-space bias tensor"),
        ("deepseek_v3", same, ("code", "prose"), "choice-only correction bias is no substitute"),
        ("gpt_oss", {"code": _role("code", [1, 2]), "prose": _role("prose", [3, 4])}, ("code", "prose"),
         "steered differently"),
        ("gpt_oss", {"code": _role("code", [1, 2])}, ("code", "prose"), "['no role', 'code']"),
        ("gpt_oss", {"code": _role("code", [1], mode="force", strength=1.0)}, ("code",), "force experts"),
        ("gpt_oss", {"code": _role("code", [1], mode="forbid")}, ("code",), "router=expert_mask"),
    ]
    for family, roles, labels, why in cases:
        plan = _plan(family, roles, label_names=labels)
        assert plan.mode == "distill" and plan.biases is None and why in plan.no_exact, (family, plan.no_exact)


def test_check_sample_keeps_each_labels_share():
    ids = torch.randint(3, 90, (40, 10))
    mask = torch.ones_like(ids)
    labels = torch.tensor([0] * 30 + [1] * 10)  # 75 % / 25 % of the tokens
    heldout = TokenBlocks(ids, mask, labels, ["code", "prose"])
    sample = check_sample(heldout, tokens=200, seed=1)
    assert 200 <= sample.num_tokens() <= 220 and (sample.labels == 0).sum() == 15 and (sample.labels == 1).sum() == 5
    rows = [next(i for i in range(40) if torch.equal(ids[i], s)) for s in sample.input_ids]
    assert rows == sorted(rows)  # whole blocks of the split, in order
    assert check_sample(heldout, tokens=10_000) is heldout
    with pytest.raises(RouterConfigError, match=r"distill.decision_margin=1.0: expected a share .* in \[0, 1\)"):
        DistillConfig(decision_margin=1.0)
