"""RoleContext: which role each token of the running forward pass has, for role-aware routers.

Routers see a flat [T, H] batch and no token ids, so the role of every token is computed once per
forward, before the decoder runs, by a forward pre-hook on the model's decoder stack:

    ctx = RoleContext(roles, roles.tag_token_ids(tokenizer))
    with ctx.attach(model):                      # pre-hook registered; removed on exit, also on error
        model.generate(tagged_prompt_ids)        # tags in the prompt switch roles from the tag onward
        with ctx.data_label("code"):             # label trigger: rows without a tag get role "code"
            model(input_ids=code_block_ids)

Rule per row: a token's role is that of the last role tag at or before it; before any tag it is the
row's label role (from `data_label` / `role`), else none (-1: the family's routing, unchanged).
During generation with a KV cache only new tokens are passed; a row's role at the end of the
previous call carries over, so generated tokens keep the prompt's role.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from .errors import RouterConfigError
from .roles import RoleSet


def _decoder(model: nn.Module) -> nn.Module:
    # the decoder stack gets input_ids whether the caller runs the CausalLM or the base model
    base = getattr(model, "model", None)
    return base if isinstance(base, nn.Module) else model


# The KV cache reaches the decoder as `past_key_values=` up to transformers 5.23 and as `cache=` from
# 5.24 on (the old name is still accepted, deprecated); read whichever the caller used.
_CACHE_KWARGS = ("cache", "past_key_values")


def _is_continuation(kwargs: dict) -> bool:
    for key in _CACHE_KWARGS:
        past = kwargs.get(key)
        if past is not None and hasattr(past, "get_seq_length"):
            return int(past.get_seq_length()) > 0
    return False


class RoleContext:
    def __init__(self, roles: RoleSet, tag_ids: Mapping[int, int] | None = None):
        self.roles = roles
        self.tag_ids = dict(tag_ids or {})
        self._row_role: int = -1  # role of rows without a tag (label trigger)
        self._current: torch.Tensor | None = None  # [B, S] role ids of the running forward
        self._last: torch.Tensor | None = None  # [B] role at the end of the previous call (for generation)
        self._tag_lut: torch.Tensor | None = None
        self._attached = 0

    # ------------------------------------------------------------------ label triggers
    @contextmanager
    def role(self, name: str | None) -> Iterator[None]:
        """Rows without a tag get role `name` (None: no role) inside the block."""
        previous = self._row_role
        self._row_role = -1 if name is None else self.roles.index(name)
        try:
            yield
        finally:
            self._row_role = previous

    @contextmanager
    def data_label(self, label: str) -> Iterator[None]:
        """The role whose label trigger is `label` (no role if none has it) for rows without a tag."""
        r = self.roles.role_for_label(label)
        with self.role(None if r is None else self.roles.names[r]):
            yield

    # ------------------------------------------------------------------ the pre-hook
    @contextmanager
    def attach(self, model: nn.Module) -> Iterator["RoleContext"]:
        handle = _decoder(model).register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        self._attached += 1
        try:
            yield self
        finally:
            handle.remove()
            self._attached -= 1
            self._current = self._last = None

    def _lookup(self, device: torch.device, vocab_hint: int) -> torch.Tensor:
        size = max([vocab_hint, *(t + 1 for t in self.tag_ids)])
        if self._tag_lut is None or self._tag_lut.device != device or self._tag_lut.numel() < size:
            lut = torch.full((size,), -1, dtype=torch.long)
            for token, r in self.tag_ids.items():
                lut[token] = r
            self._tag_lut = lut.to(device)
        return self._tag_lut

    def _pre_hook(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            embeds = kwargs.get("inputs_embeds")
            if embeds is None:
                raise RouterConfigError("role-aware routing needs input_ids or inputs_embeds in the forward call")
            if self.tag_ids:
                raise RouterConfigError(
                    "role tags are detected in input_ids, but this forward got inputs_embeds only; pass input_ids, "
                    "or trigger roles by label (RoleContext.role / data_label)")
            B, S = embeds.shape[:2]
            self._current = torch.full((B, S), self._row_role, dtype=torch.long, device=embeds.device)
            return None
        B, S = input_ids.shape
        start = torch.full((B,), self._row_role, dtype=torch.long, device=input_ids.device)
        if _is_continuation(kwargs) and self._last is not None:
            if self._last.shape[0] != B:
                raise RouterConfigError(f"a cached continuation has {B} rows but the previous call had "
                                        f"{self._last.shape[0]}; role carry-over needs the same batch rows")
            start = self._last.to(input_ids.device)
        if self.tag_ids:
            tag_role = self._lookup(input_ids.device, int(input_ids.max()) + 1)[input_ids]
            pos = torch.arange(S, device=input_ids.device).expand(B, S)
            last_tag = torch.where(tag_role >= 0, pos, -1).cummax(dim=1).values
            from_tag = tag_role.gather(1, last_tag.clamp_min(0))
            roles = torch.where(last_tag >= 0, from_tag, start[:, None])
        else:
            roles = start[:, None].expand(B, S).clone()
        self._current = roles
        self._last = roles[:, -1]
        return None

    # ------------------------------------------------------------------ what routers read
    def token_roles(self, num_tokens: int, device: torch.device) -> torch.Tensor:
        """[T] role ids (-1: none) of the flattened batch the routers are processing."""
        if self._current is None:
            if not self._attached:
                raise RouterConfigError(
                    "a role-aware router ran outside `with context.attach(model):`; attach the RoleContext "
                    "to the model so that each token's role is known")
            raise RouterConfigError("no role ids for this forward: the pre-hook did not run on the decoder stack")
        flat = self._current.reshape(-1)
        if flat.numel() != num_tokens:
            raise RouterConfigError(f"the router saw {num_tokens} tokens but the forward had {flat.numel()} "
                                    "(batch x sequence); role-aware routing needs every token to reach the router")
        return flat.to(device)
