"""Dump what a transformers runtime computes for one or more checkpoints, as JSON.

Runs under transformers 4.x or 5.x; needs only torch + transformers (+ safetensors, which
transformers itself depends on). Nothing from moesurgeon is imported, so the runtime under test
sees the checkpoint exactly as any user of that runtime would.

For every checkpoint and every fixed prompt it records
  * the prompt / continuation token ids (so tokenizers can be compared too),
  * greedy generation (`model.generate(do_sample=False)`) of --new-tokens tokens, with the
    top-1/top-2 logit margin at each step (to tell a real disagreement from a near-tie),
  * per-token log-probabilities of a fixed continuation (one teacher-forced forward pass),
and per checkpoint what the runtime made of the MoE routing:
  * `num_experts_per_tok` in config.json on disk and in the loaded config,
  * the top-k attribute of every loaded MoE block / router module (transformers 4: the block's
    `top_k`; transformers 5: `block.gate.top_k`),
  * the top-k actually executed: expert-token assignments counted with forward hooks, divided by
    the tokens entering the block (4.x: rows fed to each expert module; 5.x: the `top_k_index`
    handed to the fused experts module),
  * whether the loaded router weights equal the router tensors stored on disk (bit-exact after
    casting back to the stored dtype) and a digest of the on-disk router tensors,
  * the expert count: every expert-count key in config.json (pruned / grown exports edit it), the
    loaded config's, and per MoE block the experts actually instantiated and the router's rows.

    python dump_outputs.py --out tf5.json --checkpoint reference=/path/a --checkpoint topk3=/path/b
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

# (name, prompt, fixed continuation scored token by token). Chosen to look like the embedded
# reference corpus (CPython source, the Jargon File, Russian fortunes, generated math worksheets).
PROMPTS: list[tuple[str, str, str]] = [
    ("code",
     "def read_lines(path):\n    \"\"\"Return the lines of a text file.\"\"\"\n    with open(path) as f:\n",
     "        return [line.rstrip('\\n') for line in f]\n"),
    ("english",
     ":hacker: n.\n\nA person who enjoys exploring the details of programmable systems and",
     " how to stretch their capabilities, as opposed to most users."),
    ("russian",
     "Мир подобен книге; и тот, кто знает только свою страну,",
     " прочитал в ней лишь первую страницу."),
    ("math",
     "Worksheet 17.\n\n1. 360 = 2^3 * 3^2 * 5\n\n2. (14 + 6) * 3 =",
     " 20 * 3 = 60\n\n3. 7^2 mod 5 = 4"),
]


def load_tokenizer(path: str):
    """AutoTokenizer; if that fails, the raw tokenizer.json (recorded, so compare.py can report it)."""
    try:
        return AutoTokenizer.from_pretrained(path), {"loader": "AutoTokenizer", "error": None}
    except Exception as err:  # noqa: BLE001 - any failure is a finding to report, not to hide
        root = err
        while root.__context__ is not None and not isinstance(root, (AttributeError, TypeError, ValueError, KeyError)):
            root = root.__context__
        from transformers import PreTrainedTokenizerFast

        cfg = json.loads((Path(path) / "tokenizer_config.json").read_text())
        special = {k: cfg[k] for k in ("eos_token", "pad_token", "bos_token", "unk_token") if isinstance(cfg.get(k), str)}
        tok = PreTrainedTokenizerFast(tokenizer_file=str(Path(path) / "tokenizer.json"), **special)
        return tok, {"loader": "PreTrainedTokenizerFast(tokenizer_file=tokenizer.json) fallback",
                     "error": f"{type(root).__name__}: {root}".strip()}


def load_model(path: str, dtype: torch.dtype):
    major = int(transformers.__version__.split(".")[0])
    minor = int(transformers.__version__.split(".")[1])
    kwargs = {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model.eval()


def moe_blocks(model) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if type(m).__name__.endswith("SparseMoeBlock")]


def block_top_k(block) -> dict:
    """Every top-k attribute the runtime keeps on the block and its router."""
    found = {}
    if hasattr(block, "top_k"):
        found["block.top_k"] = int(block.top_k)
    gate = getattr(block, "gate", None)
    if gate is not None and hasattr(gate, "top_k"):
        found["gate.top_k"] = int(gate.top_k)
    return found


# config keys that hold the routed-expert count in the families moesurgeon exports (a config may hold
# several, e.g. the embedded Qwen3-MoE writes both num_experts and num_local_experts)
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


def block_experts(block) -> dict:
    """Experts the runtime built for one block, and the router's output rows."""
    experts = block.experts
    if isinstance(experts, torch.nn.ModuleList):  # transformers 4: one module per expert
        built = len(experts)
    else:  # transformers 5: fused tensors with the expert index first
        built = int(next(experts.parameters()).shape[0])
    return {"experts": built, "router_rows": int(block.gate.weight.shape[0])}


def expert_counts(model, disk_cfg: dict, blocks) -> dict:
    return {
        "config_json": {k: disk_cfg[k] for k in EXPERT_COUNT_KEYS if k in disk_cfg},
        "loaded_config": {k: getattr(model.config, k) for k in EXPERT_COUNT_KEYS
                          if getattr(model.config, k, None) is not None},
        "modules": {n: block_experts(b) for n, b in blocks},
    }


class AssignmentCounter:
    """Counts expert-token assignments actually computed in each MoE block."""

    def __init__(self, blocks):
        self.tokens = {n: 0 for n, _ in blocks}
        self.assignments = {n: 0 for n, _ in blocks}
        self.handles = []
        for name, block in blocks:
            self.handles.append(block.register_forward_pre_hook(self._tokens_hook(name), with_kwargs=True))
            experts = block.experts
            if isinstance(experts, torch.nn.ModuleList):  # transformers 4: one module per expert
                for expert in experts:
                    self.handles.append(expert.register_forward_pre_hook(self._rows_hook(name), with_kwargs=True))
            else:  # transformers 5: fused experts module called with (hidden, top_k_index, top_k_weights)
                n_exp = getattr(experts, "num_experts", None)
                self.handles.append(experts.register_forward_pre_hook(self._index_hook(name, n_exp), with_kwargs=True))

    def _first(self, args, kwargs, key):
        return args[0] if args else kwargs[key]

    def _tokens_hook(self, name):
        def hook(module, args, kwargs):
            h = self._first(args, kwargs, "hidden_states")
            self.tokens[name] += int(h.shape[:-1].numel())
        return hook

    def _rows_hook(self, name):
        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            self.assignments[name] += int(x.shape[:-1].numel())
        return hook

    def _index_hook(self, name, n_exp):
        def hook(module, args, kwargs):
            idx = args[1] if len(args) > 1 else kwargs["top_k_index"]
            valid = idx < n_exp if n_exp is not None else torch.ones_like(idx, dtype=torch.bool)
            self.assignments[name] += int(valid.sum())
        return hook

    def effective_k(self) -> dict[str, float]:
        return {n: (self.assignments[n] / self.tokens[n] if self.tokens[n] else None) for n in self.tokens}

    def remove(self):
        for h in self.handles:
            h.remove()


def disk_tensors(ckpt: Path, names: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
    else:
        weight_map = {n: "model.safetensors" for n in names}
    out = {}
    for name in names:
        with safe_open(str(ckpt / weight_map[name]), framework="pt") as f:
            out[name] = f.get_tensor(name)
    return out


def router_check(model, ckpt: Path, blocks) -> dict:
    """Loaded router weights vs the tensors on disk."""
    loaded = {f"{n}.gate.weight": b.gate.weight.detach() for n, b in blocks}
    stored = disk_tensors(ckpt, list(loaded))
    digest = hashlib.sha256()
    per_tensor = {}
    for name in sorted(stored):
        disk = stored[name]
        mem = loaded[name]
        digest.update(name.encode())
        digest.update(disk.contiguous().view(torch.uint8).numpy().tobytes())
        same_shape = tuple(mem.shape) == tuple(disk.shape)
        exact = same_shape and torch.equal(mem.to(disk.dtype), disk)
        diff = float((mem.float() - disk.float()).abs().max()) if same_shape else None
        per_tensor[name] = {"exact": bool(exact), "max_abs_diff": diff, "disk_dtype": str(disk.dtype)}
    return {"all_exact": all(v["exact"] for v in per_tensor.values()), "disk_digest": digest.hexdigest(),
            "tensors": per_tensor}


@torch.no_grad()
def run_prompt(model, tok, prompt: str, continuation: str, new_tokens: int, counter: AssignmentCounter) -> dict:
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    c_ids = tok(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p_ids + c_ids])

    # teacher-forced log-probs of the continuation; the routing counters cover exactly this pass
    for d in (counter.tokens, counter.assignments):
        for k in d:
            d[k] = 0
    logits = model(input_ids=ids).logits.float()
    eff_k = counter.effective_k()
    logp = torch.log_softmax(logits[0], dim=-1)
    positions = range(len(p_ids) - 1, len(p_ids) + len(c_ids) - 1)
    cont_logprobs = [float(logp[pos, t]) for pos, t in zip(positions, c_ids)]

    # greedy generation with the runtime's own generate() (KV cache and all)
    prompt_ids = torch.tensor([p_ids])
    gen = model.generate(
        input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=new_tokens,
        do_sample=False, output_scores=True, return_dict_in_generate=True,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
    )
    gen_ids = gen.sequences[0, len(p_ids):].tolist()
    margins = []
    for step_scores in gen.scores:
        top2 = torch.topk(step_scores[0].float(), 2).values
        margins.append(float(top2[0] - top2[1]))
    return {
        "prompt_ids": p_ids,
        "continuation_ids": c_ids,
        "continuation_logprobs": cont_logprobs,
        "continuation_logprob_sum": sum(cont_logprobs),
        "greedy_ids": gen_ids,
        "greedy_text": tok.decode(gen_ids),
        "greedy_top1_top2_margin": margins,
        "effective_top_k": eff_k,
    }


def dump_checkpoint(label: str, path: str, dtype: torch.dtype, new_tokens: int) -> dict:
    ckpt = Path(path)
    disk_cfg = json.loads((ckpt / "config.json").read_text())
    t0 = time.perf_counter()
    tok, tok_info = load_tokenizer(path)
    model = load_model(path, dtype)
    load_s = time.perf_counter() - t0
    blocks = moe_blocks(model)
    if not blocks:
        raise SystemExit(f"{label}: no *SparseMoeBlock found in {type(model).__name__}; unknown architecture")
    counter = AssignmentCounter(blocks)
    prompts = {}
    t0 = time.perf_counter()
    for name, prompt, continuation in PROMPTS:
        prompts[name] = run_prompt(model, tok, prompt, continuation, new_tokens, counter)
    run_s = time.perf_counter() - t0
    counter.remove()
    return {
        "label": label,
        "path": str(ckpt.resolve()),
        "model_class": type(model).__name__,
        "block_class": type(blocks[0][1]).__name__,
        "router_class": type(blocks[0][1].gate).__name__,
        "experts_class": type(blocks[0][1].experts).__name__,
        "tokenizer_class": type(tok).__name__,
        "tokenizer_load": tok_info,
        "dtype": str(model.dtype),
        "top_k": {
            "config_json": disk_cfg.get("num_experts_per_tok"),
            "loaded_config": getattr(model.config, "num_experts_per_tok", None),
            "modules": {n: block_top_k(b) for n, b in blocks},
        },
        "experts": expert_counts(model, disk_cfg, blocks),
        "router_weights": router_check(model, ckpt, blocks),
        "prompts": prompts,
        "seconds": {"load": load_s, "run": run_s},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", action="append", required=True, metavar="LABEL=DIR",
                    help="a checkpoint to dump, repeatable")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    result = {
        "runtime": {"transformers": transformers.__version__, "torch": torch.__version__,
                    "python": platform.python_version(), "executable": sys.executable},
        "settings": {"dtype": args.dtype, "new_tokens": args.new_tokens,
                     "prompts": [{"name": n, "prompt": p, "continuation": c} for n, p, c in PROMPTS]},
        "checkpoints": {},
    }
    for spec in args.checkpoint:
        label, sep, path = spec.partition("=")
        if not sep:
            label, path = Path(spec).name, spec
        result["checkpoints"][label] = dump_checkpoint(label, path, dtype, args.new_tokens)
        print(f"[dump_outputs] transformers {transformers.__version__}: {label} done", file=sys.stderr)
    Path(args.out).write_text(json.dumps(result, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
