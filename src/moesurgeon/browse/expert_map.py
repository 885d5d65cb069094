"""Which expert of the browsed checkpoint is which expert of the one it is compared to.

A pruning export renumbers the experts it keeps (0..E'-1 in their old order), so expert 3 of the
export may be expert 5 of its source. The map comes from, in this order:

1. an `expert_map.json` (written by expert surgery: for every MoE layer, keyed by router name, the
   source indices of the kept experts in their new order) passed as `expert_map`, or found in the
   browsed checkpoint's directory or its parent (the run directory); found beside the compared
   checkpoint instead, it is read the other way round;
2. the bytes themselves: the first and middle bytes of each of an expert's tensors are read from both
   checkpoints (a few hundred bytes per tensor) and an expert is matched to the expert of the other
   checkpoint that most of its tensors equal; an expert copied unchanged always matches, and one
   whose matrices were partly edited still does;
3. otherwise expert e is compared with expert e when both layers hold the same number of experts.

The result per layer: a list, for each expert of the browsed checkpoint, of the other checkpoint's
index (or None: no counterpart), plus how it was decided.
"""

from __future__ import annotations

import json
from pathlib import Path

from .chunks import readable
from .errors import BrowseError
from .inventory import Inventory
from .layout import LayerLayout, ModelLayout, layer_of

MAP_FILE = "expert_map.json"
_PROBE = 64  # bytes read at the start and in the middle of an expert's first tensor


def load_map_file(path: Path) -> dict[int, list[int]]:
    """{layer index: source indices of the kept experts, in their new order} from expert_map.json."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BrowseError(f"expert map {path}: unreadable ({exc}); expected JSON {{router name: [source expert "
                          "indices in their new order]}}") from None
    if not isinstance(raw, dict):
        raise BrowseError(f"expert map {path}: a JSON {type(raw).__name__}; expected an object keyed by router name")
    out = {}
    for name, kept in raw.items():
        index = layer_of(f"{name}.")
        if index is None or not isinstance(kept, list) or not all(isinstance(k, int) for k in kept):
            raise BrowseError(f"expert map {path}: entry {name!r}: expected a router name like "
                              "'model.layers.3.mlp.gate' mapped to a list of expert indices")
        out[index] = list(kept)
    return out


def find_map_file(a_dir: Path, b_dir: Path) -> tuple[Path, bool] | None:
    """(file, True when it describes the browsed checkpoint as the new one) or None."""
    for directory, forward in ((a_dir, True), (a_dir.parent, True), (b_dir, False), (b_dir.parent, False)):
        if (directory / MAP_FILE).is_file():
            return directory / MAP_FILE, forward
    return None


def expert_maps(inv_a: Inventory, lay_a: ModelLayout, inv_b: Inventory, lay_b: ModelLayout,
                explicit: Path | None) -> tuple[dict[int, list[int | None]], dict[int, str]]:
    """({layer: [b index or None for each a expert]}, {layer: how the map was decided})."""
    source: tuple[Path, bool] | None = (Path(explicit), True) if explicit is not None else None
    if source is None:
        source = find_map_file(inv_a.root, inv_b.root)
    from_file: dict[int, list[int]] = {}
    if source is not None:
        table = load_map_file(source[0])
        if source[1]:
            from_file = table
        else:  # the compared checkpoint is the new one: invert
            from_file = {i: _invert(kept, lay_a.expert_count(i)) for i, kept in table.items()}
    maps: dict[int, list[int | None]] = {}
    how: dict[int, str] = {}
    for index, la in lay_a.layers.items():
        lb = lay_b.layers.get(index)
        if lb is None:
            continue
        n_a, n_b = len(la.parts), len(lb.parts)
        ignored = ""
        if index in from_file and len(from_file[index]) == n_a:
            maps[index] = [k if k is not None and 0 <= k < n_b else None for k in from_file[index]]
            how[index] = f"from {source[0]}"
            continue
        if index in from_file:  # a map of some other export (a stray file in a shared parent directory?)
            ignored = f" ({source[0]} lists {len(from_file[index])} experts for this layer, which holds {n_a}: ignored)"

        matched = _match_bytes(inv_a, la, inv_b, lb)
        if matched is not None and n_a == n_b:
            taken = {k for k in matched if k is not None}
            # an expert changed in place (fine-tuned) matches nothing: it is still expert e of the other
            matched = [k if k is not None else (e if e not in taken else None) for e, k in enumerate(matched)]
        if matched is not None and (n_a != n_b or matched != list(range(n_a))):
            maps[index], how[index] = matched, "matched by identical bytes"
        elif n_a == n_b:
            maps[index], how[index] = list(range(n_a)), "same index"
        else:
            maps[index] = matched or [None] * n_a
            how[index] = (f"{n_a} experts here, {n_b} there and no {MAP_FILE}: experts matched by identical bytes "
                          "where possible, the others have no counterpart")
        how[index] += ignored
    return maps, how


def _invert(kept: list[int], count: int) -> list[int | None]:
    inverse: list[int | None] = [None] * count
    for new, old in enumerate(kept):
        if 0 <= old < count:
            inverse[old] = new
    return inverse


def _match_bytes(inv_a: Inventory, la: LayerLayout, inv_b: Inventory, lb: LayerLayout) -> list[int | None] | None:
    """For each expert of `la`: the expert of `lb` that most of its parts' probe bytes equal (a unique best),
    else None. Voting over parts keeps an expert matched when one of its matrices was edited."""
    index: dict[bytes, list[int]] = {}
    for e, parts in lb.parts.items():
        for part in parts:
            probe = _probe(inv_b, part, e)
            if probe is not None:
                index.setdefault(probe, []).append(e)
    out: list[int | None] = []
    hits = 0
    for e in sorted(la.parts):
        votes: dict[int, int] = {}
        for part in la.parts[e]:
            candidates = index.get(_probe(inv_a, part, e) or b"", [])
            if len(candidates) == 1:
                votes[candidates[0]] = votes.get(candidates[0], 0) + 1
        best = sorted(votes.items(), key=lambda kv: -kv[1])
        unique = bool(best) and (len(best) == 1 or best[0][1] > best[1][1])
        out.append(best[0][0] if unique else None)
        hits += unique
    return out if hits else None


def _probe(inv: Inventory, part, expert: int) -> bytes | None:
    meta = inv.tensors.get(part.tensor)
    if meta is None or meta.begin is None or not readable(meta.dtype) or not meta.shape:
        return None
    begin, end = meta.begin, meta.end
    if part.fused:
        per = (end - begin) // meta.shape[0]
        begin, end = begin + expert * per, begin + (expert + 1) * per
    middle = begin + (end - begin) // 2
    try:
        with open(inv.shards[meta.shard].path, "rb") as f:
            f.seek(begin)
            head = f.read(min(_PROBE, end - begin))
            f.seek(middle)
            mid = f.read(min(_PROBE, end - middle))
    except OSError:
        return None
    return (part.part.encode() + b"\0" + head + mid) if head else None
