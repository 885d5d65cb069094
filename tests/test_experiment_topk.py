"""experiment=topk_override / topk_sweep through the real Hydra configs on tiny checkpoints."""

import csv
import json

import pytest
from transformers import AutoModelForCausalLM

from moesurgeon.arch import get_adapter
from moesurgeon.runner import run_experiment
from helpers_hydra import compose_cfg
from tiny_models import write_tiny_jsonl


def overrides(tmp_path, ckpt):
    data = write_tiny_jsonl(tmp_path / "eval.jsonl")
    return [f"model.path={ckpt}", "data=jsonl", f"data.heldout.path={data}", "data.label_field=domain",
            "data.block_size=32", "data.batch_size=4", "progress=false"]


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_topk_override_measures_and_exports(tiny_checkpoint, tmp_path, family):
    ckpt = tiny_checkpoint(family)
    out = tmp_path / "run"
    metrics = run_experiment(compose_cfg(["experiment=topk_override", "topk_override.top_k=3",
                                          *overrides(tmp_path, ckpt)]), out)
    for g in ("code", "prose", "all"):
        assert metrics[f"baseline/ppl/{g}"] > 1 and metrics[f"patched/ppl/{g}"] > 1
        assert f"rel_change/ppl/{g}" in metrics
    assert metrics["baseline/tokens_per_s"] > 0 and metrics["speed_ratio"] > 0
    assert json.loads((out / "checkpoint" / "config.json").read_text())["num_experts_per_tok"] == 3
    assert metrics["export/verified_reload"] and metrics["export/tensors_replaced"] == 0
    reloaded = AutoModelForCausalLM.from_pretrained(out / "checkpoint")
    adapter = get_adapter(reloaded)
    assert {adapter.get_top_k(layer) for layer in adapter.moe_layers(reloaded)} == {3}


def test_topk_bad_values_and_per_layer_export_refused(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("qwen3_moe")
    base = overrides(tmp_path, ckpt)
    for bad in ("0", "9"):
        with pytest.raises(ValueError, match=rf"topk_override.top_k={bad}: expected 1 <= k <= 8"):
            run_experiment(compose_cfg(["experiment=topk_override", f"topk_override.top_k={bad}", *base]),
                           tmp_path / f"b{bad}")
    with pytest.raises(ValueError, match="per-layer top-k cannot be exported"):
        run_experiment(compose_cfg(["experiment=topk_override", "topk_override.top_k={0: 1, 2: 3}", *base]),
                       tmp_path / "pl")
    metrics = run_experiment(compose_cfg(["experiment=topk_override", "topk_override.top_k={0: 1, 2: 3}",
                                          "export.enabled=false", *base]), tmp_path / "pl2")
    assert "export/dir" not in metrics and metrics["patched/ppl/all"] > 1
    assert not (tmp_path / "pl2" / "checkpoint").exists()


def test_topk_sweep_table_and_plot(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("mixtral")
    out = tmp_path / "sweep"
    metrics = run_experiment(compose_cfg(["experiment=topk_sweep", "topk_sweep.max_k=3", *overrides(tmp_path, ckpt)]),
                             out)
    rows = list(csv.DictReader(open(out / "topk_sweep.csv")))
    assert [int(r["top_k"]) for r in rows] == [1, 2, 3]
    assert (out / "topk_sweep.png").stat().st_size > 1000
    # the metrics hold exactly the table's figures, and the best k is the table's lowest perplexity
    ppl_all = {int(r["top_k"]): float(r["ppl/all"]) for r in rows}
    assert {k: metrics[f"k{k}/ppl/all"] for k in (1, 2, 3)} == ppl_all
    assert metrics["best_k_by_ppl_all"] == min(ppl_all, key=ppl_all.get)
    assert metrics["trained_top_k"] == json.loads((ckpt / "config.json").read_text())["num_experts_per_tok"]
    assert metrics["k2/tokens_per_s"] == float(rows[1]["tokens_per_s"]) > 0
