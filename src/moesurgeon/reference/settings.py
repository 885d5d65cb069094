"""ReferenceBuildConfig: every setting that determines a reference build (typed; no Hydra here).

The field names are the build's public settings: the recipe maps the `reference:` config block onto
them, and `reference_build.json` in the model directory records them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import DOMAINS


@dataclass
class ReferenceBuildConfig:
    """Everything that determines a reference build."""

    seed: int = 0
    # training budget
    steps: int = 600
    batch_size: int = 16  # sequences per step, split evenly across the domains
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 40
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # architecture
    num_layers: int = 4
    hidden_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    num_experts: int = 16
    moe_intermediate_size: int = 128
    top_k: int = 2
    router_aux_loss_coef: float = 0.01
    aux_loss: str = "per_layer"  # "per_layer" (balance every layer) | "hf" (transformers' pooled loss)
    vocab_size: int = 4096
    max_position_embeddings: int = 2048
    # data
    heldout_bytes_per_domain: int = 80_000  # UTF-8 bytes of text in the held-out split
    shipped_train_bytes_per_domain: int = 300_000  # size of the shipped train.jsonl sample
    tokenizer_chars_per_domain: int = 1_500_000  # cap per domain for BPE training (balance)
    max_corpus_chars_per_domain: int | None = None  # cap for smoke builds
    math_train_docs: int = 2000
    cache_dir: Path = field(default_factory=lambda: Path("~/.cache/moesurgeon/reference"))
    # evaluation
    eval_max_tokens_per_domain: int | None = None
    # runtime / output
    threads: int = 2
    max_shard_size: str = "4MB"
    progress: bool = True

    def __post_init__(self) -> None:
        self.cache_dir = Path(self.cache_dir).expanduser()
        if self.batch_size % len(DOMAINS):
            n = len(DOMAINS)
            raise ValueError(
                f"batch_size={self.batch_size}: expected a multiple of {n}, because every batch holds "
                f"batch_size / {n} sequences of each domain; use e.g. {max(n, self.batch_size // n * n)}"
            )
        if self.aux_loss not in ("per_layer", "hf"):
            raise ValueError(f"aux_loss={self.aux_loss!r}: expected 'per_layer' (balance every layer) or 'hf' "
                             "(transformers' loss, pooled over the layers)")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k}: expected an integer in [1, {self.num_experts}] "
                             f"(num_experts={self.num_experts})")
