"""Router LoRA: train low-rank updates of the MoE routers only (PEFT), checkpoint, resume, merge.

`wrap_routers` -> `train_router_lora` -> `merge_routers`; recipes/router_lora.py strings them
together with evaluation and export.
"""

from .checkpointing import ResumeError, find_resume_dir
from .losses import load_balancing_loss, lm_loss, routing_entropy_bits
from .router_peft import (
    RouterLoraError,
    RouterLoraSpec,
    check_only_router_lora_trainable,
    lora_state,
    lora_targets,
    merge_routers,
    trainable_report,
    wrap_routers,
)
from .train_config import TrainConfig, TrainConfigError
from .trainer import TrainResult, make_accelerator, train_router_lora

__all__ = [
    "ResumeError", "RouterLoraError", "RouterLoraSpec", "TrainConfig", "TrainConfigError", "TrainResult",
    "check_only_router_lora_trainable", "find_resume_dir", "lm_loss", "load_balancing_loss", "lora_state",
    "lora_targets", "make_accelerator", "merge_routers", "routing_entropy_bits", "train_router_lora",
    "trainable_report", "wrap_routers",
]
