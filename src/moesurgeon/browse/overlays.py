"""Usage overlays: how earlier runs saw the router use each expert, drawn on the same layer x expert grid.

Accepted inputs (`browse.usage`, one path or a list; a run directory stands for the files in it):
- `usage_stats.safetensors` (experiment=router_usage; format in probe/stats.py): per label group and
  for all tokens together, the share of selections per expert, the share of gate mass, and the mean
  router score;
- `expert_scores.safetensors` (expert scores of earlier runs): every tensor of shape [L, E] or
  [L, G, E] becomes one track per group, with metadata `layer_names` (router names, JSON list) and
  optionally `group_names`.

A file from another model is refused with the reason: its layers must be MoE layers of this
checkpoint, its routers must have this checkpoint's router name, and its expert count must be the
number of experts this checkpoint holds in each of those layers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ..probe.stats import FORMAT as USAGE_FORMAT
from .errors import BrowseError
from .layout import ModelLayout, layer_of

FILE_NAMES = ("usage_stats.safetensors", "expert_scores.safetensors")


def overlay_files(paths: list[Path]) -> list[Path]:
    """Expand run directories into the overlay files they hold; refuse paths that hold none."""
    files = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            found = [path / n for n in FILE_NAMES if (path / n).is_file()]
            if not found:
                raise BrowseError(f"browse.usage={path}: a directory without {' or '.join(FILE_NAMES)}; pass the "
                                  "file, or the run directory of experiment=router_usage")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise BrowseError(f"browse.usage={path}: no such file or directory")
    return files


def read_overlays(paths: list[Path], layout: ModelLayout) -> list[dict]:
    """Tracks [{name, source, group, layers: {L: [E]}}] from every file; BrowseError for a foreign file."""
    tracks: list[dict] = []
    for path in overlay_files(paths):
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error types for a damaged file  # noqa: BLE001
            raise BrowseError(f"browse.usage={path}: not a readable safetensors file ({exc})") from None
        layer_names = _json_list(meta, "layer_names", path)
        groups = _json_list(meta, "group_names", path, required=False) or None
        indices = _check_layers(path, layer_names, layout)
        if meta.get("format") == USAGE_FORMAT:
            tracks += _usage_tracks(path, tensors, indices, groups or ["all"], layout)
        else:
            tracks += _score_tracks(path, tensors, indices, groups, layout)
    return tracks


def _json_list(meta: dict, key: str, path: Path, required: bool = True) -> list | None:
    if key not in meta:
        if required:
            raise BrowseError(f"browse.usage={path}: no `{key}` in its metadata; expected a usage_stats.safetensors "
                              "of experiment=router_usage or an expert_scores.safetensors")
        return None
    try:
        value = json.loads(meta[key])
    except ValueError:
        value = None
    if not isinstance(value, list):
        raise BrowseError(f"browse.usage={path}: metadata `{key}` is not a JSON list")
    return value


def _check_layers(path: Path, layer_names: list, layout: ModelLayout) -> list[int]:
    if not layout.layers:
        raise BrowseError(f"browse.usage={path}: this checkpoint has no MoE layers the browser recognises, so "
                          "there is nothing to draw usage on")
    indices = []
    for name in layer_names:
        index = layer_of(f"{name}.")
        if index is None or index not in layout.layers:
            raise BrowseError(f"browse.usage={path} is from another model: it has router {name!r}, but this "
                              f"checkpoint's MoE layers are {sorted(layout.layers)}. Use a usage file of this model")
        router = next(iter(layout.layers[index].router.values()), "")
        want = router.rsplit(".", 2)[-2] if router.count(".") >= 2 else ""
        if want and str(name).rsplit(".", 1)[-1] != want:
            raise BrowseError(f"browse.usage={path} is from another model family: router {name!r}, while this "
                              f"checkpoint's routers are named '...{want}'. Use a usage file of this model")
        indices.append(index)
    return indices


def _check_experts(path: Path, name: str, tensor: torch.Tensor, indices: list[int], layout: ModelLayout) -> None:
    if tensor.shape[0] != len(indices):
        raise BrowseError(f"browse.usage={path}: tensor {name} has {tensor.shape[0]} layers, metadata names "
                          f"{len(indices)}; the file is damaged")
    for i in indices:
        have = layout.expert_count(i)
        if tensor.shape[-1] != have:
            raise BrowseError(f"browse.usage={path} is from another model: {tensor.shape[-1]} experts per layer, "
                              f"but layer {i} of this checkpoint holds {have} (a pruned export and its source differ "
                              "here). Use a usage file profiled on this checkpoint")


def _usage_tracks(path: Path, t: dict, indices: list[int], groups: list, layout: ModelLayout) -> list[dict]:
    for key in ("counts", "gate_mass", "prob_sum", "tokens"):
        if key not in t:
            raise BrowseError(f"browse.usage={path}: usage file without tensor {key!r}; the file is damaged")
    counts, mass, probs, tokens = t["counts"].double(), t["gate_mass"].double(), t["prob_sum"].double(), t["tokens"]
    _check_experts(path, "counts", counts, indices, layout)
    views = [("all", counts.sum(1), mass.sum(1), probs.sum(1), tokens.sum(1))]
    if len(groups) > 1:
        views += [(g, counts[:, k], mass[:, k], probs[:, k], tokens[:, k]) for k, g in enumerate(groups)]
    tracks = []
    for group, c, m, p, n in views:
        share = c / c.sum(-1, keepdim=True).clamp_min(1)
        mshare = m / m.sum(-1, keepdim=True).clamp_min(1e-30)
        mean_p = p / n.double().unsqueeze(-1).clamp_min(1)
        for label, values, what in (("usage share", share, "share of this layer's selections"),
                                    ("gate mass share", mshare, "share of this layer's routing weight"),
                                    ("mean router score", mean_p, "mean score over all tokens")):
            tracks.append({"name": f"{label} ({group})", "source": str(path), "group": group, "description": what,
                           "layers": {i: values[k].tolist() for k, i in enumerate(indices)},
                           "tokens": {i: int(n[k]) for k, i in enumerate(indices)}})
    return tracks


def _score_tracks(path: Path, t: dict, indices: list[int], groups: list | None, layout: ModelLayout) -> list[dict]:
    tracks = []
    for name, tensor in sorted(t.items()):
        if tensor.dim() not in (2, 3) or tensor.dtype == torch.bool or tensor.is_complex():
            continue
        _check_experts(path, name, tensor, indices, layout)
        if tensor.dim() == 2:
            views = [("all", tensor)]
        else:
            names = groups if groups and len(groups) == tensor.shape[1] else [str(k) for k in range(tensor.shape[1])]
            views = [(g, tensor[:, k]) for k, g in enumerate(names)]
        for group, values in views:
            tracks.append({"name": f"{name} ({group})", "source": str(path), "group": group,
                           "description": f"{name} from {path.name}",
                           "layers": {i: values[k].double().tolist() for k, i in enumerate(indices)}})
    if not tracks:
        raise BrowseError(f"browse.usage={path}: no tensor of shape [layers, experts] or [layers, groups, experts]")
    return tracks
