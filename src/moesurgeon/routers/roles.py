"""Role declarations: triggers, per-layer expert preferences, and automatic expert choice from a profile.

    roles:
      code:
        tag: "<|role=code|>"     # a single-token tag in the prompt: the role applies from it onward
        label: code              # and/or a data label value (data.label_field): the whole block has the role
        prefer:
          - {mode: boost, experts: auto, strength: 2.0}      # auto: the role's top-n experts per layer
          - {mode: forbid, experts: {0: [5]}}                 # per MoE layer index
          - {mode: force, experts: [3], layers: [2, 3]}       # one list for the listed layers

Modes, in logit units: `boost` adds `strength` (negative = a soft penalty); `force` guarantees
selection, lifting the expert `strength` (> 0) above the best non-forced expert; `forbid` sets the
logit to -inf. `experts: auto` takes, per layer, the `top_n` (default: top-k) experts that the
role's own data uses most in a router_usage profile (the profile group named by the role's label,
else by its name).

Everything is validated per layer against the expert count and top-k before a forward pass runs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from ..arch import MoELayer
from .errors import RouterConfigError
from .expert_mask import check_experts

log = logging.getLogger("moesurgeon")

MODES = ("boost", "force", "forbid")
DEFAULT_STRENGTH = {"boost": 2.0, "force": 1.0, "forbid": 0.0}


@dataclass(frozen=True)
class Preference:
    mode: str
    experts: str | tuple[int, ...] | Mapping[int, tuple[int, ...]]  # "auto" until resolved
    strength: float
    layers: tuple[int, ...] | None = None
    top_n: int | None = None

    def experts_at(self, layer_index: int) -> list[int]:
        if self.layers is not None and layer_index not in self.layers:
            return []
        if isinstance(self.experts, str):
            raise RouterConfigError(f"{self.mode} experts are still 'auto': resolve them from a usage profile first "
                                    "(RoleSet.resolve_auto)")
        if isinstance(self.experts, Mapping):
            return list(self.experts.get(layer_index, ()))
        return list(self.experts)


@dataclass(frozen=True)
class RoleSpec:
    name: str
    tag: str | None = None
    label: str | None = None
    prefer: tuple[Preference, ...] = ()

    @property
    def profile_group(self) -> str:
        return self.label if self.label is not None else self.name


def _int_list(value, where: str) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise RouterConfigError(f"{where}={value!r}: expected a list of integers, e.g. [3, 7]")
    if any(isinstance(v, bool) or not isinstance(v, int) for v in value):
        raise RouterConfigError(f"{where}={list(value)!r}: expected integers only, e.g. [3, 7]")
    return tuple(sorted(set(int(v) for v in value)))


def parse_preference(raw: Mapping, where: str) -> Preference:
    known = {"mode", "experts", "strength", "layers", "top_n"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise RouterConfigError(f"{where}: unknown keys {unknown}; a preference has {sorted(known)}")
    mode = raw.get("mode", "boost")
    if mode not in MODES:
        raise RouterConfigError(f"{where}.mode={mode!r}: expected one of {list(MODES)}")
    experts = raw.get("experts", "auto")
    if isinstance(experts, str):
        if experts != "auto":
            raise RouterConfigError(f"{where}.experts={experts!r}: expected 'auto', a list, or {{layer: list}}")
    elif isinstance(experts, Mapping):
        experts = {int(k): _int_list(v, f"{where}.experts[{k}]") for k, v in experts.items()}
    else:
        experts = _int_list(experts, f"{where}.experts")
    strength = raw.get("strength")
    strength = DEFAULT_STRENGTH[mode] if strength is None else strength
    if isinstance(strength, bool) or not isinstance(strength, (int, float)):
        raise RouterConfigError(f"{where}.strength={strength!r}: expected a number")
    if mode == "force" and not strength > 0:
        raise RouterConfigError(f"{where}.strength={strength}: a forced expert is lifted `strength` logits above the "
                                "best other expert, so it must be > 0, e.g. strength: 1.0")
    layers = raw.get("layers")
    layers = None if layers is None else _int_list(layers, f"{where}.layers")
    top_n = raw.get("top_n")
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1):
        raise RouterConfigError(f"{where}.top_n={top_n!r}: expected a positive integer, or null for top-k")
    return Preference(mode, experts, float(strength), layers, top_n)


@dataclass(frozen=True)
class RoleSet:
    roles: tuple[RoleSpec, ...] = field(default_factory=tuple)

    @classmethod
    def from_mapping(cls, raw: Mapping) -> "RoleSet":
        """Parse `{name: {tag, label, prefer: [...]}}` (plain containers; experiment code converts DictConfig)."""
        if not isinstance(raw, Mapping) or not raw:
            raise RouterConfigError(f"roles={raw!r}: expected at least one role, e.g. roles: {{code: {{label: code}}}}")
        roles = []
        for name, body in raw.items():
            body = dict(body or {})
            unknown = sorted(set(body) - {"tag", "label", "prefer"})
            if unknown:
                raise RouterConfigError(f"roles.{name}: unknown keys {unknown}; a role has tag, label and prefer")
            if body.get("tag") is None and body.get("label") is None:
                raise RouterConfigError(f"roles.{name} has no trigger: set roles.{name}.tag (a role tag such as "
                                        f"'<|role={name}|>') or roles.{name}.label (a value of data.label_field)")
            prefer = body.get("prefer") or []
            if isinstance(prefer, Mapping):
                prefer = [prefer]
            prefs = tuple(parse_preference(p, f"roles.{name}.prefer[{i}]") for i, p in enumerate(prefer))
            label = body.get("label")
            roles.append(RoleSpec(str(name), body.get("tag"), None if label is None else str(label), prefs))
        return cls(tuple(roles))

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.roles]

    def index(self, name: str) -> int:
        if name not in self.names:
            raise RouterConfigError(f"unknown role {name!r}: the declared roles are {self.names}; "
                                    "use one of those or declare it under `roles:`")
        return self.names.index(name)

    def get(self, name: str) -> RoleSpec:
        return self.roles[self.index(name)]

    def subset(self, names: Sequence[str] | None) -> "RoleSet":
        if names is None:
            return self
        return RoleSet(tuple(self.get(n) for n in names))

    def role_for_label(self, label: str) -> int | None:
        for i, role in enumerate(self.roles):
            if role.label == label:
                return i
        return None

    def needs_profile(self) -> bool:
        return any(isinstance(p.experts, str) for r in self.roles for p in r.prefer)

    # ------------------------------------------------------------------ automatic expert choice
    def resolve_auto(self, share: torch.Tensor, group_names: list[str], layers: list[MoELayer],
                     top_k: Mapping[int, int]) -> "RoleSet":
        """Replace `experts: auto` by each role's top-n experts per layer.

        `share` [L, G, E] is `UsageStats.usage_share()`, with rows in the order of `layers` and
        columns named by `group_names`.
        """
        if share.shape[0] != len(layers):
            raise RouterConfigError(f"usage profile has {share.shape[0]} layers but the model has {len(layers)} MoE "
                                    "layers: profile this model (experiment=router_usage) and use that file")
        resolved = []
        for role in self.roles:
            prefs = []
            for p in role.prefer:
                if not isinstance(p.experts, str):
                    prefs.append(p)
                    continue
                if role.profile_group not in group_names:
                    raise RouterConfigError(
                        f"role {role.name!r}: experts=auto needs a profile of the role's data, but the profile has no "
                        f"group {role.profile_group!r} (groups: {group_names}); set roles.{role.name}.label to one of "
                        "the data labels, or list the experts explicitly")
                g = group_names.index(role.profile_group)
                chosen = {}
                for pos, layer in enumerate(layers):
                    n = p.top_n or top_k[layer.index]
                    if n > layer.num_experts:
                        raise RouterConfigError(f"role {role.name!r}: top_n={n} exceeds the {layer.num_experts} experts")
                    chosen[layer.index] = tuple(sorted(share[pos, g].topk(n).indices.tolist()))
                prefs.append(replace(p, experts=chosen))
            resolved.append(replace(role, prefer=tuple(prefs)))
        return RoleSet(tuple(resolved))

    def role_experts(self, name: str, layer_index: int) -> list[int]:
        """The experts a role steers towards in a layer (boosted with strength > 0, or forced)."""
        out: set[int] = set()
        for p in self.get(name).prefer:
            if p.mode == "force" or (p.mode == "boost" and p.strength > 0):
                out.update(p.experts_at(layer_index))
        return sorted(out)

    # ------------------------------------------------------------------ per-layer tables
    def layer_tables(self, layer: MoELayer, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(bias [R+1, E], force [R+1, E] bool, margin [R+1, E]); row R is 'no role' (all zero).

        bias holds boosts and -inf for forbidden experts. Validated: indices in range, forced <= top-k,
        at least top-k experts left after forbidding, nothing both forced and forbidden.
        """
        R, E = len(self.roles), layer.num_experts
        bias = torch.zeros(R + 1, E)
        force = torch.zeros(R + 1, E, dtype=torch.bool)
        margin = torch.zeros(R + 1, E)
        for r, role in enumerate(self.roles):
            for p in role.prefer:
                experts = p.experts_at(layer.index)
                check_experts(experts, E, f"role {role.name!r}, {p.mode} in layer {layer.index}")
                if p.mode == "boost":
                    bias[r, experts] += p.strength
                elif p.mode == "forbid":
                    bias[r, experts] = float("-inf")
                else:
                    force[r, experts] = True
                    margin[r, experts] = torch.maximum(margin[r, experts], torch.tensor(p.strength))
            forced, forbidden = force[r].nonzero().flatten().tolist(), torch.isneginf(bias[r]).nonzero().flatten().tolist()
            if len(forced) > top_k:
                raise RouterConfigError(
                    f"role {role.name!r} forces {len(forced)} experts {forced} in layer {layer.index}, more than "
                    f"top-k={top_k}: a token can use only {top_k}. Force at most {top_k} (boost the others)")
            both = sorted(set(forced) & set(forbidden))
            if both:
                raise RouterConfigError(f"role {role.name!r} both forces and forbids experts {both} in layer "
                                        f"{layer.index}; keep one of the two")
            if E - len(forbidden) < top_k:
                raise RouterConfigError(
                    f"role {role.name!r} forbids {len(forbidden)} of {E} experts in layer {layer.index}, leaving "
                    f"{E - len(forbidden)}, fewer than top-k={top_k}; forbid at most {E - top_k}")
        return bias, force, margin

    # ------------------------------------------------------------------ triggers
    def tag_token_ids(self, tokenizer) -> dict[int, int]:
        """{token id: role index} for every role with a tag; each tag must be exactly one token."""
        out: dict[int, int] = {}
        for r, role in enumerate(self.roles):
            if role.tag is None:
                continue
            ids = tokenizer(role.tag, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise RouterConfigError(
                    f"role {role.name!r}: tag {role.tag!r} is {len(ids)} tokens {ids} for this tokenizer, not one; "
                    "add it as a special token (tokenizer.add_special_tokens and resize the embeddings) or use a "
                    f"label trigger (roles.{role.name}.label)")
            if ids[0] in out:
                raise RouterConfigError(f"roles {self.roles[out[ids[0]]].name!r} and {role.name!r} share the tag token "
                                        f"{ids[0]}; give each role its own tag")
            out[ids[0]] = r
        return out

    def check_triggers(self, tag_ids: Mapping[int, int], input_ids: torch.Tensor, labels: Sequence[str],
                       where: str = "the data") -> None:
        """Refuse a role none of whose triggers occurs in this data; warn about a declared but unused one."""
        present = set(torch.unique(input_ids).tolist())
        tag_of = {r: t for t, r in tag_ids.items()}
        unused = []
        for r, role in enumerate(self.roles):
            tag_ok = r in tag_of and tag_of[r] in present
            label_ok = role.label is not None and role.label in labels
            if tag_ok or label_ok:
                if role.tag is not None and not tag_ok:
                    unused.append(f"{role.name}: tag {role.tag!r}")
                if role.label is not None and not label_ok:
                    unused.append(f"{role.name}: label {role.label!r}")
                continue
            problems = []
            if role.tag is not None:
                problems.append(f"its tag {role.tag!r} (token {tag_of.get(r)}) never occurs in {where}")
            if role.label is not None:
                problems.append(f"its label {role.label!r} is not a label of {where} (labels: {list(labels)})")
            raise RouterConfigError(
                f"role {role.name!r} would never apply: {' and '.join(problems)}. Put the tag in the prompts, or "
                f"set roles.{role.name}.label to a value of data.label_field")
        if unused:
            log.warning("triggers absent from %s (those roles apply through their other trigger): %s", where,
                        "; ".join(unused))
