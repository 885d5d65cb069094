"""Expert scores from one probed pass, routed tokens only: frequency, gate mass, REAP saliency, output norm.

    scores, tokens_per_s = score_experts(model, adapter, blocks)      # through block_runner.run_blocks
    scores.save(run_dir / "expert_scores.safetensors"); ExpertScores.load(path)
    scores.criterion("reap")                                          # [L, E], all label groups together

Per MoE layer x label group x expert, over the real tokens routed to expert j (with top-k, a token
counts once for each expert it selects):
- `counts`        tokens that selected j (equal to the usage probe's counts)
- `gate_mass`     sum of g_j(x), the routing weights as the family applies them to expert outputs
                  (renormalised where the family renormalises, times any routed scaling factor)
- `saliency_sum`  sum of g_j(x) * ||f_j(x)||_2  -> `reap` = saliency_sum / counts (REAP's score)
- `norm_sum`      sum of ||f_j(x)||_2           -> `output_norm` = norm_sum / counts

How: a hook on each router keeps its routing (`adapter.routing`: indices and weights) for the batch
in flight; a hook on the MoE block's experts module (`adapter.experts_attr`) reads the flat hidden
states [T, H] the experts receive (every supported family hands the experts the same flat tokens
the router saw) and runs each selected expert once on its routed real tokens with
`adapter.run_expert` — the routed compute again, never every expert on every token. The hook's
own calls into the experts module are not scored again (a re-entrancy guard).

File: safetensors with `tokens [L, G]`, `counts`, `gate_mass`, `saliency_sum`, `norm_sum`, `reap`,
`output_norm` ([L, G, E]) and metadata `format`, `layer_names`, `group_names`, `top_k` (JSON lists),
as `UsageStats` (probe/stats.py) writes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..arch import ArchAdapter, MoELayer
from ..block_runner import Batch, BatchHook, Scope, run_blocks
from ..data import TokenBlocks
from ..distributed import Shard, sum_into
from .stats import read_layer_tables, write_layer_tables
from .usage_probe import probed_layers

__all__ = ["CRITERIA_FROM_SCORES", "ExpertScoreProbe", "ExpertScores", "score_experts"]

FORMAT = "moesurgeon.expert_scores.v1"
SUMS = ("tokens", "counts", "gate_mass", "saliency_sum", "norm_sum")
CRITERIA_FROM_SCORES = ("frequency", "gate_mass", "reap", "output_norm")


@dataclass
class ExpertScores:
    layer_names: list[str]
    group_names: list[str]
    top_k: list[int]
    tokens: torch.Tensor        # [L, G] int64 real tokens that reached the router
    counts: torch.Tensor        # [L, G, E] int64
    gate_mass: torch.Tensor     # [L, G, E] float64
    saliency_sum: torch.Tensor  # [L, G, E] float64
    norm_sum: torch.Tensor      # [L, G, E] float64

    @property
    def num_experts(self) -> int:
        return self.counts.shape[-1]

    @property
    def reap(self) -> torch.Tensor:
        """[L, G, E] mean of g_j(x) * ||f_j(x)|| over the tokens routed to j (0 for an expert never routed)."""
        return self.saliency_sum / self.counts.double().clamp_min(1)

    @property
    def output_norm(self) -> torch.Tensor:
        """[L, G, E] mean ||f_j(x)|| over the tokens routed to j (0 for an expert never routed)."""
        return self.norm_sum / self.counts.double().clamp_min(1)

    def merged(self) -> "ExpertScores":
        """All label groups summed into one group named 'all' (means recomputed from the sums)."""
        summed = {n: getattr(self, n).sum(dim=1, keepdim=True) for n in SUMS}
        return ExpertScores(self.layer_names, ["all"], self.top_k, **summed)

    def criterion(self, name: str) -> torch.Tensor:
        """[L, E] float64 score of every expert over all label groups; higher = more worth keeping."""
        m = self.merged()
        table = {"frequency": m.counts.double(), "gate_mass": m.gate_mass, "reap": m.reap,
                 "output_norm": m.output_norm}
        if name not in table:
            raise ValueError(f"expert score criterion={name!r}: expected one of {list(table)}")
        return table[name][:, 0]

    # ------------------------------------------------------------------ file format
    def save(self, path: str | Path) -> Path:
        tensors = {n: getattr(self, n) for n in SUMS}
        tensors.update(reap=self.reap, output_norm=self.output_norm)  # the means too, for readers of the file
        return write_layer_tables(path, FORMAT, self.layer_names, self.group_names, self.top_k, tensors)

    @classmethod
    def load(cls, path: str | Path) -> "ExpertScores":
        """Read a file written by `save`; a run directory holding `expert_scores.safetensors` works too."""
        path = Path(path)
        if path.is_dir():
            path = path / "expert_scores.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"expert scores {path}: no such file; expected the expert_scores.safetensors "
                                    "of an earlier experiment=expert_prune run (or its run directory)")
        layers, groups, top_k, tensors = read_layer_tables(
            path, FORMAT, "{path}: not a moesurgeon expert-scores file (metadata format={found!r}, expected "
            f"{FORMAT!r}); pass the expert_scores.safetensors an expert_prune run wrote")
        return cls(layers, groups, top_k, **{n: tensors[n] for n in SUMS})


class ExpertScoreProbe:
    """Block-runner hooks on every router and experts module that accumulate `ExpertScores`."""

    def __init__(self, model: nn.Module, adapter: ArchAdapter, group_names: list[str] | None = None):
        self.adapter = adapter
        self.layers, self.num_experts = probed_layers(model, adapter)
        self.group_names = list(group_names) if group_names else ["all"]
        self._routing: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer pos -> (indices, weights)
        self._sums: dict[int, dict[str, torch.Tensor]] = {}                # layer pos -> {name: [G(, E)]}
        self._inside = False  # True while the probe itself runs an expert (its hook must not score that call)

    def hooks(self) -> list[tuple[nn.Module, BatchHook]]:
        out: list[tuple[nn.Module, BatchHook]] = []
        for pos, layer in enumerate(self.layers):
            out.append((layer.router, self._router_hook(pos, layer)))
            out.append((getattr(layer.block, self.adapter.experts_attr), self._experts_hook(pos, layer)))
        return out

    @property
    def scores(self) -> ExpertScores:
        if len(self._sums) != len(self.layers):
            raise RuntimeError(f"the expert-score probe saw {len(self._sums)} of {len(self.layers)} MoE layers: run "
                               "the model through run_blocks with probe.hooks()")
        stacked = {n: torch.stack([self._sums[p][n].cpu() for p in range(len(self.layers))]) for n in SUMS}
        top_k = [self.adapter.get_top_k(layer) for layer in self.layers]
        return ExpertScores([layer.router_name for layer in self.layers], self.group_names, top_k, **stacked)

    def _router_hook(self, pos: int, layer: MoELayer) -> BatchHook:
        def hook(module, inputs, output, batch: Batch | None) -> None:
            if not self._inside:
                routing = self.adapter.routing(layer, output)
                self._routing[pos] = (routing.indices, routing.weights)

        return hook

    def _experts_hook(self, pos: int, layer: MoELayer) -> BatchHook:
        def hook(module, inputs, output, batch: Batch | None) -> None:
            if self._inside:
                return
            if pos not in self._routing:
                raise RuntimeError(f"experts of {layer.block_name} ran before its router {layer.router_name}: "
                                   "this family's block order is not the one the expert-score probe knows")
            indices, weights = self._routing.pop(pos)
            with torch.no_grad():
                self._inside = True
                try:
                    self._accumulate(pos, layer, inputs[0], indices, weights, batch)
                finally:
                    self._inside = False

        return hook

    def _accumulate(self, pos: int, layer: MoELayer, hidden: torch.Tensor, indices: torch.Tensor,
                    weights: torch.Tensor, batch: Batch | None) -> None:
        hidden = hidden.reshape(-1, hidden.shape[-1])
        T, G, E, device = hidden.shape[0], len(self.group_names), self.num_experts, hidden.device
        if indices.shape[0] != T:
            raise ValueError(f"router {layer.router_name} routed {indices.shape[0]} tokens but its experts received "
                             f"{T}: the expert-score probe needs the flat tokens the router saw")
        if batch is None:
            real = torch.ones(T, dtype=torch.bool, device=device)
            groups = torch.zeros(T, dtype=torch.long, device=device)
        else:
            real, groups = batch.flat(T, device, f"router {layer.router_name}")
        sums = self._sums.get(pos)
        if sums is None:
            sums = self._sums[pos] = {
                "tokens": torch.zeros(G, dtype=torch.int64, device=device),
                "counts": torch.zeros(G, E, dtype=torch.int64, device=device),
                **{n: torch.zeros(G, E, dtype=torch.float64, device=device)
                   for n in ("gate_mass", "saliency_sum", "norm_sum")}}
        indices, weights = indices.to(device), weights.to(device).double()
        sums["tokens"] += torch.bincount(groups[real], minlength=G)
        chosen = (indices >= 0) & (indices < E) & real.unsqueeze(-1)  # [T, k]
        for expert in torch.unique(indices[chosen]).tolist():
            tok, slot = torch.nonzero(chosen & (indices == expert), as_tuple=True)
            out = self.adapter.run_expert(layer, hidden[tok], expert)
            norm = out.reshape(len(tok), -1).double().norm(dim=-1)
            gate = weights[tok, slot]
            g = groups[tok]
            sums["counts"][:, expert] += torch.bincount(g, minlength=G)
            sums["gate_mass"][:, expert].index_add_(0, g, gate)
            sums["saliency_sum"][:, expert].index_add_(0, g, gate * norm)
            sums["norm_sum"][:, expert].index_add_(0, g, norm)


def score_experts(model, adapter: ArchAdapter, blocks: TokenBlocks, batch_size: int = 8, progress: bool = True,
                  desc: str = "expert scores", *, by_label: bool = False, scope: Scope | None = None,
                  shard: Shard | None = None) -> tuple[ExpertScores, float]:
    """(expert scores grouped by the blocks' labels, tokens/s of the probed forward). `shard` (torchrun):
    this process scores its share of the batches, the sums are added over every process."""
    if len(blocks) == 0:
        raise ValueError("no token blocks to score experts on: the dataset produced no blocks")
    probe = ExpertScoreProbe(model, adapter, group_names=blocks.label_names or ["all"])
    done = run_blocks(model, blocks, batch_size, hooks=probe.hooks(), by_label=by_label, scope=scope,
                      progress=progress, desc=desc, shard=shard)
    scores = probe.scores
    if shard is not None:
        sum_into(shard, [getattr(scores, name) for name in SUMS])
    return scores, done.tokens_per_s
