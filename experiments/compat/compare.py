"""Compare two dump_outputs.py JSON files (runtime A = transformers 5, runtime B = the other one).

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
  6. non-vacuous    — every patched checkpoint (any label but --baseline) gives outputs that differ
                      from the baseline's in the same runtime by more than --min-effect in max
                      |logprob diff| (or in greedy tokens), and a checkpoint said to carry a router
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
    print(f"A: transformers {ra['transformers']} / torch {ra['torch']}    "
          f"B: transformers {rb['transformers']} / torch {rb['torch']}    dtype {dtype}")
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
            rw = ck["router_weights"]
            print(f"   routers {side}: {'ok  ' if rw['all_exact'] else 'FAIL'} loaded == on disk "
                  f"({len(rw['tensors'])} tensors, disk digest {rw['disk_digest'][:12]})")
            if not rw["all_exact"]:
                bad = {n: t["max_abs_diff"] for n, t in rw["tensors"].items() if not t["exact"]}
                failures.append(f"{lab}: runtime {side} router weights differ from disk: {bad}")
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
                ok = eff > args.min_effect or gdiff > 0
                print(f"   effect vs {args.baseline} in {side}: {'ok  ' if ok else 'FAIL'} max|dlogprob| {eff:.3g},"
                      f" greedy differs on {gdiff}/{len(ck['prompts'])} prompts")
                rec[f"effect_vs_baseline_{side}"] = {"max_abs_logprob_diff": eff, "greedy_prompts_differing": gdiff}
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
