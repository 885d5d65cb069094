"""RouterUsageProbe: hook every router, accumulate usage statistics while the model runs.

    stats, tokens_per_s = profile_usage(model, adapter, blocks)    # through block_runner.run_blocks

or by hand, telling the probe which tokens of each forward are real and which group each row is in:

    with RouterUsageProbe(model, adapter, group_names=["code", "math"]) as probe:
        for batch in batches:
            with probe.batch(attention_mask=batch["attention_mask"], label_ids=batch["label_ids"]):
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    stats = probe.stats            # UsageStats, on the CPU

`probe.hooks()` are block-runner hooks (they read the `Batch` in flight); `with probe:` registers the
same hooks itself. Accumulation is streaming: memory depends on layers x groups x experts^2, never on
the number of tokens. Padding is excluded through the batch's attention mask. Accumulators live on
the router's device so no per-batch host sync is needed. Hooks are removed on exit, also after an
exception. Records are keyed by each router's fully qualified module name.
"""

from __future__ import annotations

import json
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..arch import ArchAdapter, MoELayer
from ..block_runner import Batch, BatchHook, BatchSlot
from ..hooks import forward_hooks
from .stats import UsageStats, entropy_bits


def probed_layers(model: nn.Module, adapter: ArchAdapter) -> tuple[list[MoELayer], int]:
    """The MoE layers a probe hooks and their one expert count (statistics are [L, G, E] tensors)."""
    layers = adapter.moe_layers(model)
    experts = {layer.num_experts for layer in layers}
    if len(experts) != 1:
        raise ValueError(f"MoE layers have different expert counts {sorted(experts)}; the probe expects one")
    return layers, experts.pop()


class RouterUsageProbe:
    def __init__(
        self,
        model: nn.Module,
        adapter: ArchAdapter,
        group_names: list[str] | None = None,
        trace_path: str | Path | None = None,
        trace_max_tokens: int = 100_000,
    ):
        self.model = model
        self.adapter = adapter
        self.layers, self.num_experts = probed_layers(model, adapter)
        self.group_names = list(group_names) if group_names else ["all"]
        self.trace_path = Path(trace_path) if trace_path else None
        self.trace_max_tokens = trace_max_tokens
        self._trace_written = 0
        self._trace_file = None
        self._stats: UsageStats | None = None
        self._slot = BatchSlot()  # the batch given to `probe.batch()`, for hooks registered by `with probe:`
        self._stack: ExitStack | None = None

    # ------------------------------------------------------------------ lifecycle
    def hooks(self) -> list[tuple[nn.Module, BatchHook]]:
        """One block-runner hook per router: accumulate what it routed for the real tokens of the batch."""
        return [(layer.router, self._make_hook(pos, layer)) for pos, layer in enumerate(self.layers)]

    @contextmanager
    def tracing(self) -> Iterator[None]:
        """Open the trace file (when `trace_path` was given) for the forwards run inside."""
        if self.trace_path is None:
            yield
            return
        with open(self.trace_path, "w", encoding="utf-8") as f:
            self._trace_file = f
            try:
                yield
            finally:
                self._trace_file = None

    def __enter__(self) -> "RouterUsageProbe":
        stack = ExitStack()
        try:
            stack.enter_context(forward_hooks([(module, self._slot.bind(fn)) for module, fn in self.hooks()]))
            stack.enter_context(self.tracing())
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    @contextmanager
    def batch(
        self,
        attention_mask: torch.Tensor | None = None,
        label_ids: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
    ) -> Iterator[None]:
        """Tell the probe which tokens of the next forward are real and which group each row is in.

        Without a mask every token is real; without labels every row is in the first group."""
        if label_ids is not None and (label_ids.min() < 0 or label_ids.max() >= len(self.group_names)):
            raise ValueError(f"label_ids {label_ids.tolist()} out of range for groups {self.group_names}")
        if attention_mask is None and input_ids is None:
            if label_ids is not None:
                raise ValueError("probe.batch(label_ids=...) also needs attention_mask or input_ids: the "
                                 "sequence length tells which tokens belong to which row")
            batch = None
        else:
            mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            labels = label_ids if label_ids is not None else torch.zeros(mask.shape[0], dtype=torch.long)
            batch = Batch(input_ids, mask, labels.long())
        with self._slot.holding(batch):
            yield

    @property
    def stats(self) -> UsageStats:
        if self._stats is None:
            raise RuntimeError("the probe has seen no forward pass: run the model inside `with probe:`")
        return self._stats.to("cpu")

    # ------------------------------------------------------------------ accumulation
    def _ensure_stats(self, device) -> UsageStats:
        if self._stats is None:
            top_k = [self.adapter.get_top_k(layer) for layer in self.layers]
            names = [layer.router_name for layer in self.layers]
            self._stats = UsageStats.zeros(names, self.group_names, self.num_experts, top_k, device=device)
        return self._stats

    def _make_hook(self, pos: int, layer: MoELayer) -> BatchHook:
        def hook(module, inputs, output, batch: Batch | None) -> None:
            with torch.no_grad():
                self._accumulate(pos, layer, output, batch)

        return hook

    def _accumulate(self, pos: int, layer: MoELayer, output, batch: Batch | None = None) -> None:
        """Add one router call; `batch` None: every token is real and in the first group."""
        routing = self.adapter.routing(layer, output)
        probs, indices, weights = routing.probs, routing.indices, routing.weights
        T, E, G = probs.shape[0], self.num_experts, len(self.group_names)
        device = probs.device
        stats = self._ensure_stats(device)
        # W[t, g] = 1 when token t is real and in group g: every statistic is then one small
        # matmul W^T @ X, with no boolean indexing and no per-group loop over tokens.
        if batch is None:
            mask, groups = None, torch.zeros(T, dtype=torch.long, device=device)
        else:
            mask, groups = batch.flat(T, device, f"router {layer.router_name}")
        W = torch.nn.functional.one_hot(groups, G).float()
        if mask is not None:
            W = W * mask.unsqueeze(-1)
        selected = torch.zeros(T, E, device=device).scatter_(1, indices, 1.0)
        mass = torch.zeros(T, E, device=device).scatter_(1, indices, weights)
        Wt = W.T
        # float32 sums are exact for per-batch counts below 2**24; totals accumulate in int64/float64
        stats.tokens[pos] += Wt.sum(-1).round().long()
        stats.counts[pos] += (Wt @ selected).round().long()
        stats.gate_mass[pos] += (Wt @ mass).double()
        stats.prob_sum[pos] += (Wt @ probs).double()
        stats.entropy_sum[pos] += (Wt @ entropy_bits(probs)).double()
        # exact joint counts per group: (T x G*E)^T @ (T x E) of 0/1 selections
        per_group = (W.unsqueeze(-1) * selected.unsqueeze(1)).reshape(T, G * E)
        stats.coact[pos] += (per_group.T @ selected).reshape(G, E, E).round().long()
        if self._trace_file is not None:
            rows = mask.nonzero().squeeze(-1) if mask is not None else torch.arange(T, device=device)
            self._write_trace(layer, rows, indices[rows], weights[rows], batch)

    def _write_trace(self, layer: MoELayer, rows, indices, weights, batch: Batch | None) -> None:
        if self._trace_written >= self.trace_max_tokens:
            return
        n = min(len(rows), self.trace_max_tokens - self._trace_written)
        ids = batch.input_ids if batch is not None else None
        seq = ids.shape[-1] if ids is not None else None
        ids = ids.reshape(-1) if ids is not None else None
        idx, wts = indices[:n].tolist(), weights[:n].tolist()
        for j, row in enumerate(rows[:n].tolist()):
            rec = {"layer": layer.router_name, "token_index": row, "experts": idx[j], "weights": [round(w, 6) for w in wts[j]]}
            if ids is not None:
                rec["token_id"] = int(ids[row])
                rec["example"], rec["position"] = divmod(row, seq)
            self._trace_file.write(json.dumps(rec) + "\n")
        self._trace_written += n
