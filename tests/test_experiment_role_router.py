"""experiment=role_router through the real Hydra configs on tiny checkpoints."""

import json

import pytest
from transformers import AutoModelForCausalLM

from moesurgeon.recipes.role_router import ExportRefusedError
from moesurgeon.routers import RouterConfigError
from moesurgeon.runner import run_experiment
from helpers_hydra import cfg_for


def test_role_aware_measured_and_distilled(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("qwen3_moe")
    out = tmp_path / "run"
    m = run_experiment(cfg_for(tmp_path, ckpt), out)
    for role in ("code", "prose"):
        assert m[f"role_share/after/{role}"] > m[f"role_share/before/{role}"]
        assert m[f"before/ppl/{role}"] > 1 and m[f"after/ppl/{role}"] > 1 and m[f"exported/ppl/{role}"] > 1
    assert m["before/tokens_per_s"] > 0 and m["after/tokens_per_s"] > 0
    assert m["export/mode"] == "distill" and m["export/done"] is True
    assert m["export/agreement/all"] >= 0.9 and m["export/verified_reload"]
    # the floor was cleared at a check, then training ran its whole budget for the best student
    assert m["distill/outcome"] == "reached" and m["distill/decided_step"] < m["distill/steps_run"] == 60
    experts = json.loads((out / "role_experts.json").read_text())
    assert set(experts) == {"code", "prose"} and all(len(v) == 2 for v in experts["code"].values())
    for name in ("usage_heatmap_before.png", "usage_heatmap_after.png", "usage_before_after_code.png", "role_share.png"):
        assert (out / name).stat().st_size > 1000
    AutoModelForCausalLM.from_pretrained(out / "checkpoint")  # a standard checkpoint


def test_export_refused_below_agreement_floor(tiny_checkpoint, tmp_path):
    """Distillation ran its whole (tiny) budget; the end-to-end held-out figure refuses the export."""
    ckpt = tiny_checkpoint("qwen3_moe")
    out = tmp_path / "refused"
    cfg = cfg_for(tmp_path, ckpt, "role_router.export.min_agreement=1.0", "role_router.export.distill.steps=5",
                  "role_router.export.distill.give_up=false", "role_router.figures=false")
    with pytest.raises(ExportRefusedError, match=r"agree with the custom router on [\d.]+% of held-out top-k "
                                                 r"selections, below role_router.export.min_agreement=1;.*Options: "):
        run_experiment(cfg, out)
    metrics = json.loads((out / "metrics.json").read_text())  # the runner wrote the error's figures
    assert metrics["success"] is False and metrics["error"].startswith("ExportRefusedError: distilled routers agree")
    assert metrics["export/done"] is False and 0 <= metrics["export/agreement/all"] < 1
    assert metrics["distill/outcome"] == "budget" and metrics["distill/steps_run"] == 5
    assert metrics["before/ppl/code"] > 1 and metrics["after/ppl/code"] > 1
    assert not (out / "checkpoint").exists()


def test_expert_mask_pruned_on_deepseek(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("deepseek_v3")
    out = tmp_path / "mask"
    m = run_experiment(cfg_for(tmp_path, ckpt, "router=expert_mask", "role_router.router.experts=[2,5]",
                               "role_router.figures=false"), out)
    assert m["export/mode"] == "prune" and m["export/exact"] and m["export/max_abs_logit_diff"] < 1e-5
    config = json.loads((out / "checkpoint" / "config.json").read_text())
    assert config["n_routed_experts"] == 6


def test_bad_inputs_fail_with_the_fix(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("qwen3_moe")
    with pytest.raises(RouterConfigError, match=r"unknown role 'cod'.*\['code', 'prose'\]"):
        run_experiment(cfg_for(tmp_path, ckpt, "role_router.active_roles=[cod]"), tmp_path / "a")
    with pytest.raises(RouterConfigError, match=r"role_router.export.mode=bias cannot express a RoleAwareRouter "
                                                r"\(its exact export: none, it distils\)"):
        run_experiment(cfg_for(tmp_path, ckpt, "role_router.export.mode=bias"), tmp_path / "b")
    with pytest.raises(RouterConfigError, match="qwen3_moe routers have no `bias` tensor"):
        run_experiment(cfg_for(tmp_path, ckpt, "router=static_bias", "role_router.export.mode=bias"), tmp_path / "c")
    with pytest.raises(RouterConfigError, match=r"expert index 8 is out of range"):
        run_experiment(cfg_for(tmp_path, ckpt, "router=expert_mask", "role_router.router.experts=[8]"), tmp_path / "d")
    with pytest.raises(RouterConfigError, match=r"role 'code' would never apply: its tag '</s>'"):
        run_experiment(cfg_for(tmp_path, ckpt, roles="+role_router.roles={code:{tag:'</s>'}}"), tmp_path / "e")
    with pytest.raises(RouterConfigError, match=r"min_agreement=1.01: expected a share .* in \[0, 1\]"):
        run_experiment(cfg_for(tmp_path, ckpt, "role_router.export.min_agreement=1.01"), tmp_path / "f")
    with pytest.raises(RouterConfigError, match=r"role_router.export.mode='none'.*pass export.enabled=false"):
        run_experiment(cfg_for(tmp_path, ckpt, "role_router.export.mode=none"), tmp_path / "g")


def test_export_switched_off_measures_only(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("qwen3_moe")
    out = tmp_path / "off"
    m = run_experiment(cfg_for(tmp_path, ckpt, "export.enabled=false", "role_router.figures=false"), out)
    assert m["export/mode"] == "none" and "export/done" not in m and not any(k.startswith("distill/") for k in m)
    assert m["role_share/after/code"] > m["role_share/before/code"] and m["success"] is True
    assert not (out / "checkpoint").exists()
