"""The regression guard of a router-tuning run: did the target improve, and did the others hold?

Tuning routers towards one domain moves tokens of every domain between experts, so the other
domains' held-out perplexity is the regression guard: the run passes when no other domain's
perplexity rose by more than `bound` (a fraction, 0.02 = 2%). Improvements elsewhere are not
regressions. The verdict is data, not an exception: a failed guard still writes its metrics.
"""

from __future__ import annotations

import logging

from ..evaluate import relative_change

log = logging.getLogger("moesurgeon")


def check_bound(bound) -> float:
    if isinstance(bound, bool) or not isinstance(bound, (int, float)) or bound < 0:
        raise ValueError(f"router_lora.guard_bound={bound!r}: expected a fraction >= 0, e.g. router_lora.guard_bound=0.02 (2%)")
    return float(bound)


def regression_guard(baseline: dict[str, float], tuned: dict[str, float], target: str | None,
                     bound: float) -> dict:
    """Flat metrics: target/*, guard/*. `target=None`: tuned on everything, every domain is guarded."""
    groups = [g for g in baseline if g != "all" and g in tuned]
    change = relative_change(tuned, baseline)
    target_key = target if target is not None else "all"
    others = [g for g in groups if g != target] if target is not None else groups
    worst = max(others, key=lambda g: change[g]) if others else None
    out = {
        "target/domain": target_key,
        "target/rel_change": change.get(target_key, float("nan")),
        "target/improved": bool(change.get(target_key, 0.0) < 0.0),
        "guard/bound": bound,
        "guard/domains": len(others),
        "guard/max_other_rel_change": change[worst] if worst else 0.0,
        "guard/worst_domain": worst or "",
    }
    out["guard/passed"] = bool(out["guard/max_other_rel_change"] <= bound)
    out["success"] = bool(out["guard/passed"] and out["target/improved"])
    return out


def announce(verdict: dict) -> None:
    """Log the verdict; a failure is shouted, not buried in metrics.json."""
    target, change = verdict["target/domain"], verdict["target/rel_change"]
    if verdict["target/improved"]:
        log.info("target %s: held-out ppl %+.3f%% (improved)", target, 100 * change)
    else:
        log.warning("target %s: held-out ppl %+.3f%% -- NOT improved by router tuning", target, 100 * change)
    if verdict["guard/passed"]:
        log.info("regression guard passed: worst other domain %s %+.3f%% <= bound %.2f%%",
                 verdict["guard/worst_domain"] or "-", 100 * verdict["guard/max_other_rel_change"],
                 100 * verdict["guard/bound"])
        return
    bar = "!" * 78
    log.error(bar)
    log.error("REGRESSION GUARD FAILED: %s held-out perplexity rose %+.3f%%, above the bound of %.2f%% "
              "(router_lora.guard_bound).", verdict["guard/worst_domain"], 100 * verdict["guard/max_other_rel_change"],
              100 * verdict["guard/bound"])
    log.error("The adapter and checkpoint were still written; lower router_lora.train.lr / .steps, raise "
              "router_lora.train.aux_coef, or do not ship this checkpoint.")
    log.error(bar)
