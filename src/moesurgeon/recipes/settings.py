"""Each experiment's settings: one dataclass per recipe, the one place their defaults and meaning live.

`python -m moesurgeon experiment=NAME` reads the settings of recipe NAME under one key, NAME
(`router_lora.domain=math`, `topk_sweep.max_k=8`). `register_settings` stores each dataclass's
defaults in Hydra's ConfigStore as `NAME/default`, which `conf/experiment/NAME.yaml` selects and
then overrides (lightning-hydra-template's `configs/experiment/` style). The runner turns the
composed `NAME:` node into the dataclass with `to_settings` (recipes/convert.py): an unknown key or
a value of the wrong type stops there, naming the key, before anything is loaded.

Every field's comment is its documentation; `python -m moesurgeon experiment=NAME --cfg job`
prints the composed values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..lora.router_peft import RouterLoraSpec
from ..lora.train_config import TrainConfig
from ..reference.build import ReferenceBuildConfig
from ..routers.distill import DistillConfig
from ..routers.errors import RouterConfigError


@dataclass
class RouterUsageSettings:
    coact_layer: int | str | None = None  # router name or MoE-layer position of the co-activation heatmap; null: middle
    trace: bool = False                   # write trace.jsonl: per token, layer, experts and weights (small runs)
    trace_max_rows: int = 100_000         # tokens traced at most
    compare_to: str | None = None         # another run's usage_stats.safetensors: adds a difference heatmap


@dataclass
class TopkOverrideSettings:
    # experts per token: k for every MoE layer, or {layer_index: k}. A per-layer top-k runs in memory only
    # (config.json has one top-k for all layers): run it with export.enabled=false
    top_k: int | dict[int, int] = 4


@dataclass
class TopkSweepSettings:
    max_k: int | None = None  # the sweep runs k = 1 .. max_k; null: every k the family's routing allows


@dataclass
class UsageDiffSettings:
    a: str                    # a usage_stats.safetensors (experiment=router_usage, or before/ of router_lora)
    b: str                    # the profile compared with it (b minus a)
    name_a: str | None = None  # names in the figures and the log; null: the run the file comes from
    name_b: str | None = None  # (its last two directories, e.g. router_usage/2026-11-29_10-00-00)


@dataclass
class BuildReferenceSettings(ReferenceBuildConfig):
    """The reference build's settings (reference/build.py, ReferenceBuildConfig: every field there) plus `install`."""

    install: bool = False     # true: replace the shipped assets (src/moesurgeon/assets/) with this build (atomic swap)


@dataclass
class RouterLoraSettings:
    domain: str | None = "math"     # label of data.train to tune on (null: all); its held-out ppl is the target
    guard_bound: float = 0.02       # every other domain's held-out ppl may rise by at most this fraction (2%)
    usage_reports: bool = True      # full router-usage reports in before/ and after/ (shift figures: always)
    # resume: false | true (this run dir: pass hydra.run.dir) | auto (resume when this run dir holds a
    # checkpoint) | <run dir or train_state/step-N dir>
    resume: bool | str = False
    # LoRA shape: rank (at most min(experts, hidden) of the routers), alpha (null: alpha = rank), use_rslora
    lora: RouterLoraSpec = field(default_factory=lambda: RouterLoraSpec(rank=4))
    # optimisation (lora/train_config.py, TrainConfig: each key's meaning). Every key but save_every, keep_last
    # and log_every is part of the run's fingerprint: resuming with a different value is refused
    train: TrainConfig = field(default_factory=TrainConfig)


EXPORT_MODES = ("auto", "prune", "bias", "weights", "distill")


@dataclass
class RoleRouterExport:
    """How the custom router becomes a standard checkpoint (written when export.enabled=true)."""

    # auto | prune | bias | weights | distill. auto: the router class's exact export (its `exact_export`: prune for
    # ExpertMaskRouter, bias for StaticBiasRouter, weights for PrototypeRouter); a role-aware router exactly, as the
    # routers' own bias, when it boosts every token of the data alike on a family whose router has a logit bias
    # (gpt_oss); otherwise it distils
    mode: str = "auto"
    allow_inexact: bool = False     # prune: write a non-exact pruned deepseek_v3 checkpoint anyway, with its deviation
    # distill: refuse the export below this top-k agreement with the custom router (end to end, held-out data).
    # The distillation runs before the before/after measurements, is checked end to end every
    # `distill.check_every` steps on a sample of held-out blocks, and gives up as soon as the floor is out of
    # reach: the refusal is logged then, the measurements still run and are written (metrics.json,
    # export/done=false), and the command exits non-zero
    min_agreement: float = 0.9
    # distillation settings (routers/distill.py, DistillConfig: each key's meaning). stop_at_floor=true stops
    # training once a check clears min_agreement + decision_margin: faster, but the student at that step (embedded
    # model: 0.929 held-out agreement at step 25 vs 0.949 at 300)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self) -> None:
        if self.mode not in EXPORT_MODES:
            raise RouterConfigError(f"role_router.export.mode={self.mode!r}: expected one of {list(EXPORT_MODES)}; "
                                    "to measure without writing a checkpoint pass export.enabled=false")
        if not 0 <= self.min_agreement <= 1:
            raise RouterConfigError(f"role_router.export.min_agreement={self.min_agreement:g}: expected a share of "
                                    "top-k selections in [0, 1], e.g. 0.9")


@dataclass
class RoleRouterSettings:
    # Roles: a trigger (tag: a single-token tag in the prompt, applies from the tag onward; label: a value of
    # data.label_field, applies to the whole block) and expert preferences per layer (prefer: [{mode: boost|force|
    # forbid, experts: [..]|auto, strength}]; routers/roles.py). conf/experiment/role_router.yaml declares the
    # embedded model's domains
    roles: dict[str, Any] = field(default_factory=dict)
    # the custom router: a Hydra `_target_` node from the `router` group (router=role_aware|expert_mask|prototype|
    # static_bias); built per MoE layer with `layer`, `adapter` and the resources its class declares
    router: dict[str, Any] | None = None
    active_roles: list[str] | None = None   # steer only these declared roles (null: all)
    layers: list[int] | None = None         # MoE layer indices to substitute (null: all)
    figures: bool = True                    # heatmaps before/after, per label before/after/difference, role shares
    export: RoleRouterExport = field(default_factory=RoleRouterExport)


@dataclass
class BrowseRecipeSettings:
    # usage overlays: usage_stats.safetensors / expert_scores.safetensors of earlier runs of THIS model, or their
    # run directories (one path or a list)
    usage: list[str] | str | None = None
    compare_to: str | None = None   # another checkpoint directory: the diff track (which tensors changed, how much)
    expert_map: str | None = None   # its expert_map.json, when it is not beside either checkpoint (or its run dir)
    data: bool = False              # expert OUTPUT similarity on data.heldout (loads the model)
    data_tokens: int = 512          # calibration tokens per layer for browse.data=true
    serve: bool = False             # after writing, serve browser/ on 127.0.0.1 until Ctrl-C (prints the URL)
    port: int = 0                   # browse.serve port; 0: any free port
    cache_dir: str | None = None    # per-shard statistics cache; null: <run dir>/../browse_cache
    sigma_steps: int = 5            # Lanczos steps per matrix for its top singular value; 0: none (fastest)
    sample_per_expert: int = 8192   # weights per expert sampled for the weight-similarity estimate
    chunk_mb: int = 16              # largest piece of a tensor read at once (memory ~ (2 + 5 x threads) x this)

    def __post_init__(self) -> None:
        from ..browse import BrowseError, BrowseSettings

        BrowseSettings(self.sigma_steps, self.sample_per_expert, self.chunk_mb).check()
        if self.data_tokens < 1:
            raise BrowseError(f"browse.data_tokens={self.data_tokens}: expected a positive number of tokens")


@dataclass
class ExpertPruneSettings:
    criterion: str = "reap"        # random | frequency | gate_mass | reap: per layer, the lowest-scored experts go
    ratio: float = 0.25            # share of each MoE layer's experts removed (same count per layer), in (0, 1)
    keep: list[int] | dict[int, list[int]] | None = None  # pinned experts: for every layer, or {layer_index: [..]}
    seed: int = 0                  # criterion=random: the draw
    scores: str | None = None      # expert_scores.safetensors (or run dir) of an earlier run; null: score data.train
    figures: bool = True           # expert_scores.png (every criterion, removed experts crossed out) + per label


@dataclass
class ExpertMergeSettings:
    ratio: float = 0.25            # share of each MoE layer's experts merged away (same count per layer), in (0, 1)
    # what experts are clustered by: output (mean expert output on the same calibration tokens, as HC-SMoE) |
    # weight (the experts' weights) | router (their router rows)
    similarity: str = "output"
    linkage: str = "average"       # hierarchical clustering linkage: average | complete | single
    # the merged expert's router row (and per-expert router bias): dominant (the row of the cluster's most-used
    # member) | freq_mean (the members' rows averaged, weighted by how often each was chosen)
    router_rule: str = "dominant"
    calib_tokens: int = 512        # similarity=output: calibration tokens of data.train per layer
    scores: str | None = None      # expert_scores.safetensors (or run dir) of an earlier run; null: score data.train


@dataclass
class ExpertTransplantSettings:
    donor: str | None = None       # checkpoint directory of the same family and shapes (a sibling fine-tune, an export)
    # the experts copied from the donor into the same slots of the target: for every MoE layer ([3, 7]) or
    # {layer_index: [experts]}
    experts: list[int] | dict[int, list[int]] | None = None
    routers: bool = False          # also copy those experts' router rows (and per-expert router biases) from the donor


@dataclass
class ExpertGrowSettings:
    add: int = 2                   # new experts per MoE layer (config.json's expert count grows by this)
    # clone_top: copies of the most-used experts (data.train usage, or `scores`) | clone_noise: the same plus
    # Gaussian noise of `noise` x each tensor's RMS | random: new weights drawn like the layer's (RMS-matched)
    init: str = "clone_top"
    noise: float = 0.01
    seed: int = 0
    # the added experts' router rows: mute (never chosen where the router has a per-expert bias: exact on gpt_oss
    # and deepseek_v3; zero rows elsewhere: exact only while every token has >= k positive logits, measured) |
    # live (the parent's row and bias, or a random row: they compete at once; not function-preserving)
    router: str = "mute"
    scores: str | None = None      # expert_scores.safetensors (or run dir) of an earlier run; null: score data.train


@dataclass(frozen=True)
class Recipe:
    settings: type           # the dataclass of the experiment's settings
    loads_model: bool = True  # False: the run context holds no model config (usage_diff, build_reference)
    # False, or a function of the settings: the checkpoint need not carry tokenizer files (browse reads weights only)
    needs_tokenizer: Any = True


# experiment (recipe module under moesurgeon.recipes, and the key of its settings) -> its recipe
RECIPES: dict[str, Recipe] = {
    "router_usage": Recipe(RouterUsageSettings),
    "topk_override": Recipe(TopkOverrideSettings),
    "topk_sweep": Recipe(TopkSweepSettings),
    "usage_diff": Recipe(UsageDiffSettings, loads_model=False),
    "build_reference": Recipe(BuildReferenceSettings, loads_model=False),
    "router_lora": Recipe(RouterLoraSettings),
    "role_router": Recipe(RoleRouterSettings),
    "browse": Recipe(BrowseRecipeSettings, needs_tokenizer=lambda s: s.data),
    "expert_prune": Recipe(ExpertPruneSettings),
    "expert_merge": Recipe(ExpertMergeSettings),
    "expert_transplant": Recipe(ExpertTransplantSettings),
    "expert_grow": Recipe(ExpertGrowSettings),
}


def register_settings() -> None:
    """Store each experiment's defaults as the config `NAME/default` (selected by conf/experiment/NAME.yaml)."""
    from hydra.core.config_store import ConfigStore

    from .convert import defaults_of

    store = ConfigStore.instance()
    for name, recipe in RECIPES.items():
        store.store(group=name, name="default", node=defaults_of(recipe.settings))
