"""Compare two dump_outputs.py JSON files (runtime A = transformers 5, runtime B = the other one).

Runtime B may also be a vllm_leg/dump_vllm.py dump, which writes the same format.

Per checkpoint label present in both files it checks, and prints:
  1. tokenization   — prompt and continuation token ids identical in both runtimes;
  2. greedy         — the generated token ids identical. Only when --tie-margin > 0: a divergence
                      at a step where *both* runtimes' top-1/top-2 logit margin is <= tie-margin
                      is accepted as a numerical near-tie (reported; tokens after it are not compared);
  3. logprobs       — max |logprob diff| over every continuation token <= --logprob-tol;
  4. top-k honoured — in EACH runtime: config.json's num_experts_per_tok == the loaded config's ==
                      every MoE module's top-k attribute == the top-k actually executed (expert-token
                      assignments / tokens, counted with hooks during the scoring pass);
  5. routers loaded — in EACH runtime the loaded router weights equal the on-disk tensors bit for bit;
  5b. expert count  — in EACH runtime (when the dump records it): every expert-count key of config.json,
                      the loaded config's, the experts every MoE module instantiated and its router's rows
                      all agree (a pruned / grown export edits the count; a runtime that reads a stale key or
                      pads to the source's count would be caught);
  5c. experts A=B    — both runtimes built the same number of experts in every MoE layer;
  6. non-vacuous    — every patched checkpoint (any label but --baseline) gives outputs that differ
                      from the baseline's in the same runtime by more than --min-effect in max
                      |logprob diff| (or in greedy tokens) - or, for a function-preserving export (grow),
                      the runtime built another expert count than for the baseline - and a checkpoint said to carry a router
                      patch (--router-patched LABEL) has on-disk router tensors that differ from the
                      baseline's. Otherwise the check could not tell "patch honoured" from "ignored".
Tokenizer files that runtime B's AutoTokenizer cannot load are a failure unless
--allow-tokenizer-fallback (then reported as a finding; dump_outputs.py loaded tokenizer.json directly).

Exit status 0 when every check passes, 1 otherwise. Writes a JSON summary with --summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULTS = {  # dtype -> (logprob tolerance, tie margin)
    "float32": (1e-4, 0.0),
    "bfloat16": (0.125, 0.0625),
}


def max_abs_diff(a: list[float], b: list[float]) -> float:
    return max((abs(x - y) for x, y in zip(a, b)), default=0.0)


def greedy_check(pa: dict, pb: dict, tie_margin: float) -> tuple[bool, str, int | None]:
    ga, gb = pa["greedy_ids"], pb["greedy_ids"]
    if ga == gb:
        return True, f"identical ({len(ga)} tokens)", None
    step = next((i for i, (x, y) in enumerate(zip(ga, gb)) if x != y), min(len(ga), len(gb)))
    ma = pa["greedy_top1_top2_margin"][step] if step < len(pa["greedy_top1_top2_margin"]) else None
    mb = pb["greedy_top1_top2_margin"][step] if step < len(pb["greedy_top1_top2_margin"]) else None
    near_tie = ma is not None and mb is not None and ma <= tie_margin and mb <= tie_margin
    what = f"diverge at step {step} (margins {ma}, {mb})"
    return near_tie, what + (" - accepted near-tie" if near_tie else ""), step


def topk_check(ck: dict) -> tuple[bool, str]:
    tk = ck["top_k"]
    want = tk["config_json"]
    attrs = sorted({v for m in tk["modules"].values() for v in m.values()})
    executed = sorted({round(v, 6) for p in ck["prompts"].values() for v in p["effective_top_k"].values()
                       if v is not None})
    ok = tk["loaded_config"] == want and attrs == [want] and executed == [float(want)]
    names = sorted({k for m in tk["modules"].values() for k in m})
    return ok, (f"config.json={want} loaded_config={tk['loaded_config']} "
                f"{'/'.join(names) or 'no attribute'}={attrs} executed={executed}")


def runtime_name(rt: dict) -> str:
    """A dump's runtime as printed: its own name (vLLM's dump sets one) or the transformers version."""
    return rt.get("name") or f"transformers {rt['transformers']}"


def experts_built(ck: dict) -> dict[str, int] | None:
    """MoE layer -> experts the runtime instantiated (None for dumps that do not record it)."""
    ex = ck.get("experts")
    return None if ex is None else {n: m["experts"] for n, m in ex["modules"].items()}


def experts_check(ck: dict) -> tuple[bool, str] | None:
    ex = ck.get("experts")
    if ex is None:  # dumps written before the expert count was recorded
        return None
    values = set(ex["config_json"].values()) | set(ex["loaded_config"].values())
    values |= {v for m in ex["modules"].values() for v in m.values()}
    per_module = sorted({(m["experts"], m["router_rows"]) for m in ex["modules"].values()})
    return len(values) == 1, (f"config.json {ex['config_json']} loaded_config {ex['loaded_config']}"
                              f" modules (experts, router rows) {per_module}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path, help="dump of runtime A (reference: transformers 5)")
    ap.add_argument("b", type=Path, help="dump of runtime B (under test)")
    ap.add_argument("--logprob-tol", type=float, default=None)
    ap.add_argument("--tie-margin", type=float, default=None)
    ap.add_argument("--baseline", default="reference", help="label of the unpatched source checkpoint")
    ap.add_argument("--router-patched", action="append", default=[], metavar="LABEL")
    ap.add_argument("--min-effect", type=float, default=1e-3)
    ap.add_argument("--allow-tokenizer-fallback", action="store_true")
    ap.add_argument("--summary", type=Path, default=None)
    args = ap.parse_args(argv)

    A, B = (json.loads(p.read_text()) for p in (args.a, args.b))
    dtype = A["settings"]["dtype"]
    if B["settings"]["dtype"] != dtype or A["settings"]["prompts"] != B["settings"]["prompts"]:
        print("FAIL: the two dumps were made with different settings/prompts")
        return 1
    tol_default, tie_default = DEFAULTS.get(dtype, (1e-4, 0.0))
    tol = args.logprob_tol if args.logprob_tol is not None else tol_default
    tie = args.tie_margin if args.tie_margin is not None else tie_default
    ra, rb = A["runtime"], B["runtime"]
    print(f"A: {runtime_name(ra)} / torch {ra['torch']}    B: {runtime_name(rb)} / torch {rb['torch']}    dtype {dtype}")
    print(f"tolerances: max |logprob diff| <= {tol:g}; greedy tokens identical"
          + (f" (near-tie divergence accepted when both margins <= {tie:g})" if tie > 0 else ""))

    failures: list[str] = []
    findings: list[str] = []
    summary = {"runtime_a": ra, "runtime_b": rb, "dtype": dtype, "logprob_tol": tol, "tie_margin": tie,
               "checkpoints": {}}
    labels = [lab for lab in A["checkpoints"] if lab in B["checkpoints"]]
    missing = sorted(set(A["checkpoints"]) ^ set(B["checkpoints"]))
    if missing:
        failures.append(f"checkpoints dumped by only one runtime: {missing}")
    base_a = A["checkpoints"].get(args.baseline)
    base_b = B["checkpoints"].get(args.baseline)

    for lab in labels:
        ca, cb = A["checkpoints"][lab], B["checkpoints"][lab]
        rec: dict = {"prompts": {}}
        print(f"\n== {lab}  ({cb['model_class']}: B router {cb['router_class']}, B experts {cb['experts_class']};"
              f" A router {ca['router_class']}, A experts {ca['experts_class']})")
        for side, ck in (("A", ca), ("B", cb)):
            tl = ck.get("tokenizer_load", {"loader": "AutoTokenizer", "error": None})
            if tl["error"]:
                msg = f"{lab}: runtime {side} AutoTokenizer failed ({tl['error']}); used {tl['loader']}"
                (findings if args.allow_tokenizer_fallback else failures).append(msg)
                print(f"   tokenizer {side}: {tl['loader']}  <- AutoTokenizer: {tl['error']}")
            ok, what = topk_check(ck)
            print(f"   top-k {side}: {'ok  ' if ok else 'FAIL'} {what}")
            rec[f"top_k_{side}"] = what
            if not ok:
                failures.append(f"{lab}: runtime {side} top-k not honoured: {what}")
            ex = experts_check(ck)
            if ex is not None:
                ok, what = ex
                print(f"   experts {side}: {'ok  ' if ok else 'FAIL'} {what}")
                rec[f"experts_{side}"] = what
                if not ok:
                    failures.append(f"{lab}: runtime {side} expert count inconsistent: {what}")
            rw = ck["router_weights"]
            print(f"   routers {side}: {'ok  ' if rw['all_exact'] else 'FAIL'} loaded == on disk "
                  f"({len(rw['tensors'])} tensors, disk digest {rw['disk_digest'][:12]})")
            if not rw["all_exact"]:
                bad = {n: t["max_abs_diff"] for n, t in rw["tensors"].items() if not t["exact"]}
                failures.append(f"{lab}: runtime {side} router weights differ from disk: {bad}")
        built_a, built_b = experts_built(ca), experts_built(cb)
        if built_a is not None and built_b is not None:
            same = built_a == built_b
            print(f"   experts A vs B: {'ok  ' if same else 'FAIL'} same experts built per layer"
                  f" ({sorted(set(built_a.values()))} / {sorted(set(built_b.values()))})")
            if not same:
                failures.append(f"{lab}: the runtimes built different expert counts: A {built_a} B {built_b}")
        worst = 0.0
        for name, pa in ca["prompts"].items():
            pb = cb["prompts"][name]
            same_tok = pa["prompt_ids"] == pb["prompt_ids"] and pa["continuation_ids"] == pb["continuation_ids"]
            g_ok, g_what, _ = greedy_check(pa, pb, tie)
            d = max_abs_diff(pa["continuation_logprobs"], pb["continuation_logprobs"])
            worst = max(worst, d)
            line_ok = same_tok and g_ok and d <= tol
            print(f"   {name:8s} {'ok  ' if line_ok else 'FAIL'} tokenization {'same' if same_tok else 'DIFFERENT'};"
                  f" greedy {g_what}; max|dlogprob| {d:.3g} over {len(pa['continuation_logprobs'])} tokens;"
                  f" min greedy margin A {min(pa['greedy_top1_top2_margin'], default=float('nan')):.3g}")
            print(f"            A: {pa['greedy_text']!r}")
            if pa["greedy_ids"] != pb["greedy_ids"]:
                print(f"            B: {pb['greedy_text']!r}")
            rec["prompts"][name] = {"tokenization_same": same_tok, "greedy": g_what,
                                    "greedy_identical": pa["greedy_ids"] == pb["greedy_ids"],
                                    "max_abs_logprob_diff": d}
            if not same_tok:
                failures.append(f"{lab}/{name}: tokenization differs between runtimes")
            if not g_ok:
                failures.append(f"{lab}/{name}: greedy tokens {g_what}")
            if not d <= tol:
                failures.append(f"{lab}/{name}: max |logprob diff| {d:.3g} > {tol:g}")
        rec["max_abs_logprob_diff"] = worst
        rec["greedy_identical_all"] = all(p["greedy_identical"] for p in rec["prompts"].values())

        if lab != args.baseline and base_a is not None and base_b is not None:
            for side, ck, base in (("A", ca, base_a), ("B", cb, base_b)):
                eff = max(max_abs_diff(ck["prompts"][n]["continuation_logprobs"],
                                       base["prompts"][n]["continuation_logprobs"]) for n in ck["prompts"])
                gdiff = sum(ck["prompts"][n]["greedy_ids"] != base["prompts"][n]["greedy_ids"] for n in ck["prompts"])
                # a function-preserving export (grow: the added experts start muted) has the source's outputs by
                # design; then only its structure tells it apart: the runtime must have built other expert counts
                built, built_base = experts_built(ck), experts_built(base)
                structural = built is not None and built_base is not None and built != built_base
                ok = eff > args.min_effect or gdiff > 0 or structural
                why = ("" if eff > args.min_effect or gdiff > 0 else
                       f" - same outputs, but experts built {sorted(set(built.values()))} vs {args.baseline}'s"
                       f" {sorted(set(built_base.values()))} (a function-preserving export)" if structural else "")
                print(f"   effect vs {args.baseline} in {side}: {'ok  ' if ok else 'FAIL'} max|dlogprob| {eff:.3g},"
                      f" greedy differs on {gdiff}/{len(ck['prompts'])} prompts{why}")
                rec[f"effect_vs_baseline_{side}"] = {"max_abs_logprob_diff": eff, "greedy_prompts_differing": gdiff,
                                                     "expert_count_differs": structural}
                if not ok:
                    failures.append(f"{lab}: runtime {side} outputs indistinguishable from {args.baseline}")
            if lab in args.router_patched:
                changed = cb["router_weights"]["disk_digest"] != base_b["router_weights"]["disk_digest"]
                print(f"   router tensors on disk differ from {args.baseline}: {'ok  ' if changed else 'FAIL'}")
                if not changed:
                    failures.append(f"{lab}: declared router-patched but its router tensors equal {args.baseline}'s")
        summary["checkpoints"][lab] = rec

    worst_all = max((r["max_abs_logprob_diff"] for r in summary["checkpoints"].values()), default=0.0)
    summary.update(max_abs_logprob_diff=worst_all, failures=failures, findings=findings,
                   greedy_identical_all=all(r["greedy_identical_all"] for r in summary["checkpoints"].values()),
                   passed=not failures)
    print(f"\nmax |logprob diff| over all checkpoints and prompts: {worst_all:.3g} (tolerance {tol:g});"
          f" greedy tokens identical everywhere: {summary['greedy_identical_all']}")
    for f in findings:
        print(f"FINDING: {f}")
    for f in failures:
        print(f"FAIL: {f}")
    print("PASS" if not failures else f"FAILED ({len(failures)} problems)")
    if args.summary:
        args.summary.write_text(json.dumps(summary, indent=1))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
