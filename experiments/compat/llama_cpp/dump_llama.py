"""Score and greedily continue the compat prompts with llama.cpp (llama-cpp-python) and compare with a
transformers 5 dump from ../dump_outputs.py.

The HF token ids recorded in the transformers dump are fed to llama.cpp directly (its tokenizer for
this model is not claimed to match: see convert.py), so this compares the model computation only:
  * `<arch>.expert_used_count` in the GGUF metadata == config.json's num_experts_per_tok,
  * per-token logprobs of each fixed continuation (teacher forced),
  * greedy continuation of --new-tokens tokens (argmax over llama.cpp's logits, KV cache as usual).

    python dump_llama.py --hf-dump tf5_float32.json --gguf LABEL=FILE.gguf [...] --out llama.json \
        [--logprob-tol 1e-4]
Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from llama_cpp import Llama


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def run(llm: Llama, prompt_ids: list[int], cont_ids: list[int], new_tokens: int) -> dict:
    llm.reset()
    llm.eval(prompt_ids + cont_ids)
    logp = log_softmax(np.array(llm.scores[: llm.n_tokens]))
    cont = [float(logp[len(prompt_ids) - 1 + i, t]) for i, t in enumerate(cont_ids)]
    llm.reset()
    llm.eval(prompt_ids)
    greedy, margins = [], []
    for _ in range(new_tokens):
        last = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
        top2 = np.sort(last)[-2:]
        tok = int(np.argmax(last))
        greedy.append(tok)
        margins.append(float(top2[1] - top2[0]))
        if tok == llm.token_eos():
            break
        llm.eval([tok])
    return {"continuation_logprobs": cont, "greedy_ids": greedy, "greedy_top1_top2_margin": margins}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-dump", required=True, type=Path)
    ap.add_argument("--gguf", action="append", required=True, metavar="LABEL=FILE")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--logprob-tol", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import llama_cpp

    hf = json.loads(args.hf_dump.read_text())
    new_tokens = hf["settings"]["new_tokens"]
    result = {"runtime": {"llama_cpp_python": llama_cpp.__version__},
              "reference_runtime": hf["runtime"], "logprob_tol": args.logprob_tol, "checkpoints": {}}
    failures = []
    print(f"llama-cpp-python {llama_cpp.__version__} (GGUF f32) vs transformers {hf['runtime']['transformers']}"
          f" ({hf['settings']['dtype']}); tolerance max |logprob diff| <= {args.logprob_tol:g}, greedy identical")
    for spec in args.gguf:
        label, _, path = spec.partition("=")
        ref = hf["checkpoints"][label]
        t0 = time.perf_counter()
        llm = Llama(model_path=path, n_ctx=256, n_batch=256, logits_all=True, n_threads=args.threads,
                    seed=0, verbose=False, type_k=0, type_v=0)  # 0 = GGML_TYPE_F32 KV cache (default f16)
        arch = llm.metadata.get("general.architecture", "?")
        used = llm.metadata.get(f"{arch}.expert_used_count")
        want = ref["top_k"]["config_json"]
        ok_k = used is not None and int(used) == int(want)
        print(f"\n== {label}: {arch}.expert_used_count={used} (config.json {want}) {'ok' if ok_k else 'FAIL'}")
        if not ok_k:
            failures.append(f"{label}: expert_used_count {used} != {want}")
        rec = {"expert_used_count": used, "config_top_k": want, "prompts": {}}
        for name, p in ref["prompts"].items():
            got = run(llm, p["prompt_ids"], p["continuation_ids"], len(p["greedy_ids"]) or new_tokens)
            d = max(abs(a - b) for a, b in zip(got["continuation_logprobs"], p["continuation_logprobs"]))
            same = got["greedy_ids"] == p["greedy_ids"]
            step = None if same else next((i for i, (a, b) in enumerate(zip(got["greedy_ids"], p["greedy_ids"]))
                                           if a != b), min(len(got["greedy_ids"]), len(p["greedy_ids"])))
            ok = same and d <= args.logprob_tol
            print(f"   {name:8s} {'ok  ' if ok else 'FAIL'} greedy {'identical' if same else f'diverge at {step}'}"
                  f" ({len(got['greedy_ids'])} tokens); max|dlogprob| {d:.3g}")
            if not same:
                failures.append(f"{label}/{name}: greedy tokens diverge at step {step}"
                                f" (HF margin there {p['greedy_top1_top2_margin'][step] if step < len(p['greedy_top1_top2_margin']) else None})")
            if not d <= args.logprob_tol:
                failures.append(f"{label}/{name}: max |logprob diff| {d:.3g} > {args.logprob_tol:g}")
            rec["prompts"][name] = {**got, "max_abs_logprob_diff": d, "greedy_identical": same}
        rec["seconds"] = time.perf_counter() - t0
        rec["max_abs_logprob_diff"] = max(r["max_abs_logprob_diff"] for r in rec["prompts"].values())
        result["checkpoints"][label] = rec
        del llm
    worst = max(r["max_abs_logprob_diff"] for r in result["checkpoints"].values())
    result.update(max_abs_logprob_diff=worst, failures=failures, passed=not failures)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"\nllama.cpp: max |logprob diff| over all checkpoints and prompts: {worst:.3g}")
    for f in failures:
        print(f"FAIL: {f}")
    print("PASS" if not failures else f"FAILED ({len(failures)} problems)")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
