"""Distil a custom router into the family's standard router weights, for checkpoints that need no custom code.

Why not the router-LoRA trainer (moesurgeon/lora)? Its objective is next-token loss plus load
balancing over whole-model forwards; here the target is the custom router's *selection*, per layer.
Selections depend only on the router input, so the teacher is run once with the custom routers in
place on a random sample of whole blocks (about `max_tokens` real tokens), and for every such token
each layer's router input, the custom (edited) logits and the custom top-k are cached. Each
layer's router weight (and a router bias where the family has one as a Parameter, gpt_oss) is
then trained on that cache alone — teacher forcing, no model forwards in the loop, seconds on a
CPU. The update is full-rank: E x H parameters per layer, the size of a rank-E/2 LoRA on that
matrix, so low rank would save nothing worth the extra machinery; merging is writing it back.

Student logits are the family's own: the router's forward is called with the trainable tensors
(`torch.func.functional_call`), so fp32 casts and biases are exactly the family's.

Loss per token, in the family's choice space (logits; sigmoid score + correction bias for
deepseek_v3): a pairwise ranking term, softplus(margin - (c_selected - c_other)) over every
(selected, not selected) pair of the teacher's top-k, which is what top-k agreement needs; plus
`kl_weight` x KL(teacher distribution || student distribution) over all experts, which keeps the
routing weights close. The group limit of deepseek_v3 is not modelled in the loss; it is in the
measured agreement.

Agreement is measured end to end by the caller (agreement.py) on held-out data: later layers then
see hidden states shaped by the student's earlier choices, as a deployed checkpoint would.

Early decisions: all layers train in lockstep (step s of every layer, then step s+1), so the whole
student exists after every step. Every `check_every` steps the caller's `check(tensors)` gives its
agreement — experiment=role_router measures it end to end on a sample of held-out blocks, because
the per-layer teacher-forced figure is not a safe stand-in: on the embedded model it was 0.007-0.009
above the end-to-end one at every step count (errors compound over layers; more layers, more so).
Given a floor (`train_routers(floor=...)`), the outcome is decided at the first check that allows it:
- `reached`: the checked agreement is at least floor + `decision_margin` (capped at 1). Checking ends
  there; training goes on to `steps` (the best student: on the embedded model stopping at step 25
  instead of 300 cost 0.02 of held-out agreement), unless `stop_at_floor`;
- `unreachable` (with `give_up`): after more than `patience` checks, the best figure so far plus its
  recent gain per check, continued over every check left, stays below floor - `decision_margin`.
  Learning curves flatten (and the learning rate decays), so the linear continuation usually
  over-estimates what is left: a heuristic, not a bound. Training stops;
- `budget`: neither, all `steps` ran.
The margin covers the sampling error of the checked sample against the whole held-out split.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..arch import ArchAdapter, MoELayer
from ..block_runner import Batch, Scope, run_blocks
from ..data import TokenBlocks
from .errors import RouterConfigError
from .substitute import is_substituted

log = logging.getLogger("moesurgeon")


@dataclass
class DistillConfig:
    steps: int = 300              # optimizer steps per layer
    lr: float = 1e-2
    batch_tokens: int = 4096      # cached tokens per step
    max_tokens: int = 50_000      # real tokens (whole blocks) run and cached; memory ~ max_tokens x hidden x 4 B per layer
    margin: float = 1.0           # ranking margin, in logits (x0.1 in sigmoid choice space)
    kl_weight: float = 0.5
    train_bias: bool = True       # also train a router bias Parameter where the family has one (gpt_oss)
    seed: int = 0
    check_every: int = 25         # steps between the caller's agreement checks
    check_tokens: int = 16_384    # experiment=role_router: held-out tokens (whole blocks, per label) each check runs
    give_up: bool = True          # with a floor: stop as soon as it is out of reach
    stop_at_floor: bool = False   # with a floor: stop as soon as it is reached (else train all steps, unchecked)
    patience: int = 3             # checks of recent gain the "out of reach" projection looks at
    decision_margin: float = 0.01  # how far the checked figure must clear (or miss) the floor to stop early

    def __post_init__(self) -> None:
        for key in ("steps", "batch_tokens", "max_tokens", "check_every", "check_tokens", "patience"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise RouterConfigError(f"distill.{key}={v!r}: expected a positive integer")
        if not self.lr > 0:
            raise RouterConfigError(f"distill.lr={self.lr!r}: expected a positive learning rate, e.g. 1e-2")
        if self.kl_weight < 0 or self.margin < 0:
            raise RouterConfigError(f"distill.kl_weight={self.kl_weight}, distill.margin={self.margin}: expected >= 0")
        if not 0 <= self.decision_margin < 1:
            raise RouterConfigError(f"distill.decision_margin={self.decision_margin!r}: expected a share of top-k "
                                    "selections in [0, 1), e.g. 0.01")


@dataclass
class TeacherCache:
    hidden: torch.Tensor   # [N, H] router inputs
    logits: torch.Tensor   # [N, E] float32, the custom router's (edited) logits
    indices: torch.Tensor  # [N, k] the custom router's selection


def sample_blocks(blocks: TokenBlocks, max_tokens: int, seed: int = 0) -> TokenBlocks:
    """A seeded random subset of whole blocks holding about `max_tokens` real tokens (all blocks if fewer).

    Whole blocks, not scattered tokens, so the teacher pass costs max_tokens forwards rather than the split."""
    if blocks.num_tokens() <= max_tokens:
        return blocks
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))
    counts = blocks.attention_mask.sum(-1)[order].cumsum(0)
    take = order[: int((counts < max_tokens).sum()) + 1].sort().values
    return TokenBlocks(blocks.input_ids[take], blocks.attention_mask[take], blocks.labels[take], list(blocks.label_names))


def collect_teacher(model, adapter: ArchAdapter, blocks: TokenBlocks, batch_size: int = 8, max_tokens: int = 50_000,
                    scope: Scope | None = None, seed: int = 0) -> dict[int, TeacherCache]:
    """Run the model (custom routers substituted) on ~max_tokens real tokens and cache them per MoE layer."""
    layers = adapter.moe_layers(model)
    parts: dict[int, list[tuple]] = {layer.index: [] for layer in layers}

    def hook_for(layer: MoELayer):
        def hook(module, inputs, output, batch: Batch) -> None:
            keep = batch.real(output[0].device)
            h = inputs[0].reshape(-1, inputs[0].shape[-1])[keep]
            parts[layer.index].append((h.cpu(), output[0].reshape(-1, output[0].shape[-1])[keep].float().cpu(),
                                       output[2].reshape(-1, output[2].shape[-1])[keep].cpu()))
        return hook

    run_blocks(model, sample_blocks(blocks, max_tokens, seed), batch_size,
               hooks=[(layer.router, hook_for(layer)) for layer in layers], by_label=True, scope=scope)
    return {i: TeacherCache(*(torch.cat(c) for c in zip(*p))) for i, p in parts.items() if p}


def distill_loss(layer: MoELayer, adapter: ArchAdapter, student: torch.Tensor, teacher: torch.Tensor,
                 indices: torch.Tensor, margin: float, kl_weight: float) -> torch.Tensor:
    # ranking in the family's choice space; bounded sigmoid scores get a tenth of the logit margin
    unit = 0.1 if adapter.choice_in_score_space(layer) else 1.0
    c = adapter.choice_scores(layer, student) / unit
    selected = torch.zeros_like(c, dtype=torch.bool).scatter_(1, indices, True)
    pos = c.gather(1, indices)                                   # [N, k]
    gap = pos.unsqueeze(-1) - c.unsqueeze(1)                     # [N, k, E]: selected minus every expert
    pairs = (~selected).unsqueeze(1).expand_as(gap)
    rank = F.softplus(margin - gap)[pairs].mean()
    if kl_weight == 0:
        return rank
    target = adapter.log_distribution(teacher).exp()             # 0 where the teacher has -inf
    kl = F.kl_div(adapter.log_distribution(student), target, reduction="batchmean")
    return rank + kl_weight * kl


def _params(layer: MoELayer, train_bias: bool) -> dict[str, torch.Tensor]:
    """float32 copies of every router Parameter; the weight (and a bias, if asked) require grad.
    All are passed so that a bf16 model's bias does not meet float32 inputs in F.linear."""
    out = {}
    for name, p in layer.router.named_parameters(recurse=False):
        trainable = name == "weight" or (train_bias and name == "bias")
        out[name] = p.detach().float().clone().requires_grad_(trainable)
    if "weight" not in out:
        raise RouterConfigError(f"{layer.router_name} has no `weight` Parameter: distillation trains routers that "
                                "hold an [experts, hidden] weight")
    return out


class _LayerStudent:
    """One router's trainable tensors, optimizer and sampling stream: steps are taken one at a time so
    that all layers can advance together."""

    def __init__(self, layer: MoELayer, adapter: ArchAdapter, cache: TeacherCache, cfg: DistillConfig):
        if is_substituted(layer.router):
            raise RouterConfigError(f"{layer.router_name} still routes through a custom router: restore the "
                                    "substitution before training the standard router")
        self.layer, self.adapter, self.cfg = layer, adapter, cfg
        self.params = _params(layer, cfg.train_bias)
        self.device = layer.router.weight.device
        self.hidden = cache.hidden.to(self.device, torch.float32)
        self.teacher, self.indices = cache.logits.to(self.device), cache.indices.to(self.device)
        self.opt = torch.optim.Adam([p for p in self.params.values() if p.requires_grad], lr=cfg.lr)
        self.gen = torch.Generator().manual_seed(cfg.seed + layer.index)
        self.first = self.last = float("nan")

    def step(self, step: int) -> None:
        cfg, n = self.cfg, self.hidden.shape[0]
        for g in self.opt.param_groups:  # cosine decay to 10%: large steps first, then settle
            g["lr"] = cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / cfg.steps)))
        rows = torch.randint(0, n, (min(cfg.batch_tokens, n),), generator=self.gen).to(self.device)
        logits = functional_call(self.layer.router, self.params, (self.hidden[rows],))[0].float()
        loss = distill_loss(self.layer, self.adapter, logits, self.teacher[rows], self.indices[rows], cfg.margin,
                            cfg.kl_weight)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.last = float(loss.detach())
        self.first = self.last if step == 0 else self.first

    @torch.no_grad()
    def agreement(self, hidden: torch.Tensor, indices: torch.Tensor) -> float:
        """Teacher-forced top-k agreement (|S_teacher ∩ S_student| / k, averaged) on the given tokens."""
        chosen = functional_call(self.layer.router, self.params, (hidden.to(self.device, torch.float32),))[2]
        return float((indices.to(chosen.device).unsqueeze(-1) == chosen.unsqueeze(-2)).any(-1).float().mean())

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.params.items() if v.requires_grad}


@dataclass
class DistillResult:
    tensors: dict[int, dict[str, torch.Tensor]]  # {layer index: new float32 router tensors}
    metrics: dict[str, float]
    outcome: str = "budget"          # "reached" | "unreachable" | "budget" (see the module docstring)
    steps_run: int = 0
    decided_step: int | None = None  # the check that decided "reached" / "unreachable"
    checked: float | None = None     # the last check's agreement (None: no check ran)
    projected: float | None = None   # "unreachable": the optimistic projection that fell short
    checks: list[tuple[int, float]] = field(default_factory=list)  # (step, checked agreement)


class _FloorWatch:
    """Decides from the checks whether training can stop: floor reached, or out of reach."""

    def __init__(self, floor: float, cfg: DistillConfig):
        self.floor, self.cfg, self.best = floor, cfg, []

    def verdict(self, step: int, value: float) -> tuple[str | None, float | None]:
        cfg = self.cfg
        self.best.append(max(value, self.best[-1]) if self.best else value)
        if step >= cfg.steps:
            return None, None  # the budget is spent: nothing left to save
        if value >= min(self.floor + cfg.decision_margin, 1.0):
            return "reached", None
        if not cfg.give_up or len(self.best) <= cfg.patience:
            return None, None
        gain = max(self.best[-1] - self.best[-1 - cfg.patience], 0.0) / cfg.patience
        left = math.ceil((cfg.steps - step) / cfg.check_every)
        projected = min(self.best[-1] + gain * left, 1.0)
        return ("unreachable", projected) if projected < self.floor - cfg.decision_margin else (None, None)


Check = Callable[[dict[int, dict[str, torch.Tensor]]], float]


def train_routers(model, adapter: ArchAdapter, caches: dict[int, TeacherCache], cfg: DistillConfig,
                  floor: float | None = None, check: Check | None = None) -> DistillResult:
    """Train every cached layer's router, all layers in lockstep. With `check` (the current tensors -> an
    agreement), check every `check_every` steps; with a floor too, until the outcome is decided."""
    students = [_LayerStudent(layer, adapter, caches[layer.index], cfg)
                for layer in adapter.moe_layers(model) if layer.index in caches]
    watch = _FloorWatch(floor, cfg) if floor is not None and check is not None else None
    result = DistillResult({}, {}, steps_run=cfg.steps)
    for step in range(1, cfg.steps + 1):
        for student in students:
            student.step(step - 1)
        if check is None or result.outcome != "budget" or (step % cfg.check_every and step < cfg.steps):
            continue
        result.checked = check({s.layer.index: s.tensors() for s in students})
        result.checks.append((step, result.checked))
        log.info("distill step %d/%d: top-k agreement %.4f on the check sample", step, cfg.steps, result.checked)
        outcome, result.projected = watch.verdict(step, result.checked) if watch else (None, None)
        if outcome:
            result.outcome, result.decided_step = outcome, step
            stop = outcome == "unreachable" or cfg.stop_at_floor
            log.info("distillation: the floor %g is %s at step %d of %d%s", floor, "reached" if outcome == "reached"
                     else f"out of reach (at most {result.projected:.4f} projected)", step, cfg.steps,
                     "; stopping" if stop else "; training on to the last step, unchecked")
            if stop:
                result.steps_run = step
                break
    m = result.metrics
    m.update({"distill/outcome": result.outcome, "distill/steps_run": result.steps_run,
              "distill/decided_step": result.decided_step,
              "distill/stopped_early_step": result.steps_run if result.steps_run < cfg.steps else None})
    if result.checked is not None:
        m["distill/checked_agreement"] = result.checked
    for s in students:
        i = s.layer.index
        result.tensors[i] = s.tensors()
        stats = {"first_loss": s.first, "final_loss": s.last,
                 "teacher_forced_agreement": s.agreement(s.hidden, s.indices), "tokens": s.hidden.shape[0]}
        m.update({f"distill/{k}/layer{i}": v for k, v in stats.items()})
        log.info("distilled %s: loss %.4f -> %.4f, teacher-forced agreement %.3f on %d tokens", s.layer.router_name,
                 s.first, s.last, stats["teacher_forced_agreement"], stats["tokens"])
    return result


def distill_routers(model, adapter: ArchAdapter, caches: dict[int, TeacherCache], cfg: DistillConfig
                    ) -> tuple[dict[int, dict[str, torch.Tensor]], dict[str, float]]:
    """Train every cached layer's router for all `steps`; returns ({layer index: new tensors}, flat metrics)."""
    result = train_routers(model, adapter, caches, cfg)
    return result.tensors, result.metrics


@torch.no_grad()
def write_router_tensors(model, adapter: ArchAdapter, new: dict[int, dict[str, torch.Tensor]],
                         store_dtype: torch.dtype | None = None) -> dict[int, dict[str, torch.Tensor]]:
    """Copy new router tensors into the model (rounded through `store_dtype`, the checkpoint's, so memory
    equals what an export writes); returns the previous tensors for undoing."""
    previous = {}
    for layer in adapter.moe_layers(model):
        if layer.index not in new:
            continue
        previous[layer.index] = {}
        for name, value in new[layer.index].items():
            target = getattr(layer.router, name)
            previous[layer.index][name] = target.detach().clone()
            v = value.to(store_dtype) if store_dtype is not None else value
            target.copy_(v.to(target.device, target.dtype).reshape(target.shape))
    return previous
