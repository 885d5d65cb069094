"""What every expert surgery does with expert scores and perplexity, in one place.

`stored_scores` reads an earlier run's expert_scores.safetensors before any weight is read (a
missing or foreign file, or one for another expert count, is a setting to fix, named in one line);
`moe_layers_as_planned` checks the loaded model against the plan made from config.json;
`scores_of_run` computes the scores on data.train when needed (one probed pass), checks that they
belong to this model's routers and writes them into the run dir; `record_change` puts the before /
after held-out perplexity and its relative change per label into the metrics and the log.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ..errors import ConfigError
from ..evaluate import relative_change
from ..probe import ExpertScores, score_experts

log = logging.getLogger("moesurgeon")

__all__ = ["moe_layers_as_planned", "record_change", "scores_of_run", "stored_scores"]


def moe_layers_as_planned(adapter, model, planned: list[int]) -> tuple[list, list[str]]:
    """(the loaded model's MoE layers, their router names); refuses a model whose MoE layers are not the ones
    config.json described when the surgery was planned (before any weight was read)."""
    layers = adapter.moe_layers(model)
    found = [layer.index for layer in layers]
    if found != planned:
        raise ConfigError(f"the loaded model's MoE layers {found} differ from the ones its config.json describes "
                          f"{planned}; check the checkpoint")
    return layers, [layer.router_name for layer in layers]


def stored_scores(setting: str, path: str | None, num_experts: int) -> ExpertScores | None:
    """The scores file (or run dir) `path` given as `<setting>=...`, checked against the expert count."""
    if not path:
        return None
    try:
        scores = ExpertScores.load(path)
    except (OSError, ValueError) as err:  # a missing or foreign file is a setting to fix, said in one line
        raise ConfigError(f"{setting}={path}: {err}") from None
    if scores.num_experts != num_experts:
        raise ConfigError(f"{setting}={path}: scores for {scores.num_experts} experts per layer, but this model has "
                          f"{num_experts}; pass the scores of a run on this model")
    return scores


def scores_of_run(setting: str, stored: ExpertScores | None, compute: bool, model, adapter, train, batch_size: int,
                  progress: bool, router_names: list[str], out_dir: Path, metrics: dict) -> ExpertScores | None:
    """`stored`, or (compute=True) the scores of one probed pass over `train`; checked against this model's
    routers and saved as <out_dir>/expert_scores.safetensors. Timing goes into `metrics`."""
    scores = stored
    if compute:
        t0 = time.perf_counter()
        scores, tps = score_experts(model, adapter, train, batch_size, progress, desc="expert scores")
        metrics.update({"scores/seconds": time.perf_counter() - t0, "scores/tokens_per_s": tps})
    if scores is not None:
        if scores.layer_names != router_names:
            raise ConfigError(f"{setting}: scores for routers {scores.layer_names}, this model's routers are "
                              f"{router_names}; pass the scores of a run on this model")
        scores.save(out_dir / "expert_scores.safetensors")
    return scores


def record_change(metrics: dict, before, after, digits: int = 1) -> None:
    """before/after held-out perplexity (evaluate_perplexity results) and rel_change/ppl/<label> into metrics."""
    metrics.update({**before.flat("before"), **after.flat("after")})
    for group, change in relative_change(after.ppl, before.ppl).items():
        metrics[f"rel_change/ppl/{group}"] = change
        log.info(f"%-10s ppl %8.3f -> %8.3f (%+.{digits}f%%)", group, before.ppl[group], after.ppl[group],
                 100 * change)
