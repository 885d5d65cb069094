"""Checkpoint browser on tiny checkpoints of all six families, per-expert and fused on disk.

Every number the page shows is checked against the model's own parameters: per-expert norms, RMS
and max |w|, the exact expert x expert weight cosine, router row norms and the router cosine. The
layout (MoE layers, experts, router tensors) must be found from the files and config.json alone.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from moesurgeon.browse import BrowseSettings, build_browser
from moesurgeon.browse.kernels import Kernels
from tiny_models import EXPECTED_MOE_LAYERS, tiny_model

EXACT = BrowseSettings(sample_per_expert=1 << 16)  # every tiny expert fits the sample: similarity exact


def save(model, path, fused: bool):
    # transformers 5 writes per-expert tensors by default; save_original_format=False keeps its fused layout
    model.save_pretrained(path, save_original_format=not fused, max_shard_size="60KB")
    return path


def expert_vectors(model, layer: int) -> torch.Tensor:
    """[E, all weights of the expert] from the in-memory (fused) parameters, biases included."""
    experts = model.model.layers[layer].mlp.experts
    params = [p for _, p in sorted(experts.named_parameters())]
    return torch.cat([p.detach().reshape(p.shape[0], -1).double() for p in params], dim=1)


def router_weight(model, layer: int) -> torch.Tensor:
    mlp = model.model.layers[layer].mlp
    router = getattr(mlp, "gate", None) or getattr(mlp, "router")
    return router.weight.detach().double()


def cosine(x: torch.Tensor) -> torch.Tensor:
    x = x / x.norm(dim=1, keepdim=True)
    return x @ x.T


@pytest.mark.parametrize("fused", [False, True], ids=["per_expert", "fused"])
def test_every_family_and_layout(family, fused, tmp_path):
    model = tiny_model(family)
    ckpt = save(model, tmp_path / "ckpt", fused)
    metrics = build_browser(ckpt, tmp_path / "out", settings=EXACT, cache_dir=None, progress=False)
    data = json.loads((tmp_path / "out" / "data.json").read_text())
    assert (tmp_path / "out" / "index.html").stat().st_size > 10_000
    assert data["model"]["model_type"] == family
    assert data["model"]["moe_layers"] == EXPECTED_MOE_LAYERS[family]
    assert metrics["browse/moe_layers"] == len(EXPECTED_MOE_LAYERS[family])
    assert metrics["browse/shards"] > 1 and metrics["browse/unreadable_shards"] == 0
    storage = set(data["model"]["storage"].values())
    assert storage == {"fused" if fused or family == "gpt_oss" else "per-expert"}
    for layer in EXPECTED_MOE_LAYERS[family]:
        row = data["experts"]["layers"][str(layer)]
        vec = expert_vectors(model, layer)
        assert len(row["norm"]) == vec.shape[0] == 8
        torch.testing.assert_close(torch.tensor(row["norm"], dtype=torch.float64), vec.norm(dim=1), rtol=1e-5, atol=0)
        rms = vec.norm(dim=1) / math.sqrt(vec.shape[1])
        torch.testing.assert_close(torch.tensor(row["rms"], dtype=torch.float64), rms, rtol=1e-5, atol=0)
        torch.testing.assert_close(torch.tensor(row["maxabs"], dtype=torch.float64), vec.abs().max(dim=1).values,
                                   rtol=1e-5, atol=0)
        sim = data["similarity"][str(layer)]
        assert sim["exact"] is True
        torch.testing.assert_close(torch.tensor(sim["matrix"], dtype=torch.float64), cosine(vec), rtol=0, atol=1e-5)
        router = data["router"][str(layer)]
        w = router_weight(model, layer)
        torch.testing.assert_close(torch.tensor(router["row_norm"], dtype=torch.float64), w.norm(dim=1), rtol=1e-5,
                                   atol=0)
        torch.testing.assert_close(torch.tensor(router["matrix"], dtype=torch.float64), cosine(w), rtol=0, atol=1e-5)
    if family == "gpt_oss":
        assert set(data["router"]["0"]["vectors"]) == {"bias"}
    if family == "deepseek_v3":
        bias = model.model.layers[1].mlp.gate.e_score_correction_bias.detach().double()
        torch.testing.assert_close(torch.tensor(data["router"]["1"]["vectors"]["e_score_correction_bias"],
                                                dtype=torch.float64), bias, rtol=1e-6, atol=1e-7)


def test_kernel_statistics_match_torch():
    """One bf16 matrix: sum of squares, max |w|, near-zero count, sigma_1 (converged Lanczos estimate)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 160, generator=g)
    x[:, 3] *= 20  # a dominant direction: the estimate converges fast
    x[5, 7] = 0.0
    xb = x.to(torch.bfloat16)
    s = Kernels(steps=12).stats(xb, sigma=True, sample=64)
    ref = xb.double()
    assert s.numel == ref.numel()
    assert s.sumsq == pytest.approx(float((ref ** 2).sum()), rel=1e-6)
    assert s.maxabs == float(ref.abs().max())
    threshold = torch.tensor(1e-2 * math.sqrt(s.sumsq / s.numel), dtype=torch.bfloat16).double()
    assert s.nearzero == int((ref.abs() < threshold).sum()) and s.nearzero >= 1
    assert s.sigma1 == pytest.approx(float(torch.linalg.matrix_norm(ref, 2)), rel=1e-5)
    assert s.sample.numel() == 64 and s.nonfinite == 0


def test_kernel_counts_nonfinite_values():
    x = torch.ones(8, 8)
    x[0, 0], x[1, 1] = float("nan"), float("inf")
    s = Kernels().stats(x, sigma=True)
    assert (s.nonfinite, s.numel, s.maxabs) == (2, 64, 1.0)
    assert s.sumsq == pytest.approx(62.0, rel=1e-6)  # the 62 finite ones
    assert s.nearzero == 0  # the zeroed NaN/inf are not counted as near-zero weights
