"""Which tokens a steering hook edits: prompt and generated columns under the KV cache.

Positions under the KV cache
----------------------------
A forward whose KV cache is empty starts a sequence: its columns are the *prompt*. Every
later forward that extends the cache (one new column per step of ``generate``) feeds
*generated* tokens. A forward without a cache that repeats the last prompt and extends it
(``generate(use_cache=False)``) is classified the same way, column by column. Position sets:

- ``"last_prompt"``: the last real (non-pad) prompt token of each row (the seed's "last row");
- ``"prompt"``: every prompt token;
- ``"generated"``: every generated token once it is fed back in (the first sampled token is
  produced by the prompt forward, so only ``last_prompt``/``prompt`` steer it);
- ``"all"`` (alias ``"both"``): prompt and generated tokens;
- a bool mask ``[B or 1, L]`` over the absolute columns of the padded sequence (prompt columns
  first, then one column per generated token), e.g. from :func:`column_mask`.

Combine sets with a tuple: ``positions=("last_prompt", "generated")``. Pad tokens are never
edited; BOS and other special tokens are skipped by the named sets unless
``include_special=True`` (SAEs are trained without them, and Gemma's BOS norm is huge).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "POSITION_SETS",
    "PositionTracker",
    "column_mask",
    "parse_positions",
    "special_token_ids",
    "steerable_token_mask",
]

POSITION_SETS = ("last_prompt", "prompt", "generated", "all")
_ALIASES = {
    "all": ("prompt", "generated"),
    "both": ("prompt", "generated"),
    "last_row": ("last_prompt",),
    "last": ("last_prompt",),
}


def parse_positions(positions: Any) -> tuple[frozenset[str], torch.Tensor | None]:
    if isinstance(positions, torch.Tensor | np.ndarray):
        m = torch.as_tensor(positions)
        if m.dtype != torch.bool:
            raise TypeError(f"positions: a mask must be bool, got {m.dtype}")
        if m.dim() == 1:
            m = m[None]
        if m.dim() != 2:
            raise ValueError(
                f"positions: a mask must be [B, L] or [L] over sequence columns, got shape {tuple(m.shape)}"
            )
        return frozenset(), m
    names = (positions,) if isinstance(positions, str) else tuple(positions)
    if not names:
        raise ValueError(f"positions={positions!r}: expected at least one of {POSITION_SETS}")
    out: set[str] = set()
    for n in names:
        if not isinstance(n, str):
            raise TypeError(
                f"positions: expected names from {POSITION_SETS} or a bool mask, got {n!r}"
            )
        key = n.strip().lower()
        if key in _ALIASES:
            out.update(_ALIASES[key])
        elif key in POSITION_SETS:
            out.add(key)
        else:
            raise ValueError(
                f"positions={positions!r}: {n!r} is not one of {POSITION_SETS} (or 'both'), nor a bool mask"
            )
    return frozenset(out), None


def column_mask(
    batch_size: int, prompt_len: int, max_new_tokens: int, columns: Sequence[int] | slice
) -> torch.Tensor:
    """A ``[batch_size, prompt_len + max_new_tokens]`` bool mask selecting ``columns``
    (absolute indices into the padded prompt followed by the generated tokens)."""
    m = torch.zeros(batch_size, prompt_len + max_new_tokens, dtype=torch.bool)
    m[:, columns] = True
    return m


@dataclass
class _Step:
    """What the model-level pre-hook learnt about the current forward."""

    B: int
    T: int
    select: torch.Tensor | None  # bool [B, T]; None: nothing to edit in this forward
    n_prompt: torch.Tensor | int = 0
    n_generated: torch.Tensor | int = 0
    n_prompt_cols: int = 0  # the first columns hold prompt tokens, the rest generated ones


def _cache_length(kwargs: dict[str, Any]) -> int | None:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None:
        return None
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    try:  # legacy tuple cache: ((k [B, H, T, hd], v), ...)
        return int(cache[0][0].shape[-2])
    except (TypeError, IndexError, AttributeError):
        return None


class PositionTracker:
    """Model-level forward pre-hook: decides, per forward, which columns to edit."""

    def __init__(
        self, sets: frozenset[str], mask: torch.Tensor | None, special: torch.Tensor | None
    ):
        self.sets = sets
        self.mask = mask
        self.special = special
        self.prompt_ids: torch.Tensor | None = None
        self.prompt_len = 0
        self.step: _Step | None = None

    def __call__(self, _module, args, kwargs) -> None:
        ids = kwargs.get(
            "input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None
        )
        if ids is None:
            embeds = kwargs.get("inputs_embeds")
            if embeds is None:
                self.step = None
                return
            B, T = embeds.shape[:2]
            device = embeds.device
        else:
            B, T = ids.shape[:2]
            device = ids.device
        attn = kwargs.get("attention_mask")
        past = _cache_length(kwargs)
        if past is None:
            past = (
                int(attn.shape[-1]) - T
                if attn is not None and attn.dim() == 2 and attn.shape[-1] > T
                else 0
            )
        if past == 0:
            continuing = (
                ids is not None
                and self.prompt_ids is not None
                and self.prompt_ids.shape[0] == B
                and self.prompt_len < T
                and self.prompt_ids.device == ids.device
                and torch.equal(ids[:, : self.prompt_len], self.prompt_ids)
            )
            if not continuing:
                self.prompt_len = T
                self.prompt_ids = ids.detach().clone() if ids is not None else None
        n_prompt_cols = max(0, min(T, self.prompt_len - past))
        if attn is not None and attn.dim() == 2:
            real = attn[:, -T:].to(device=device, dtype=torch.bool)
        else:
            real = torch.ones(B, T, dtype=torch.bool, device=device)
        want_prompt = n_prompt_cols > 0 and bool(self.sets & {"prompt", "last_prompt"})
        want_gen = n_prompt_cols < T and "generated" in self.sets
        if not (want_prompt or want_gen or self.mask is not None):
            self.step = _Step(B, T, None)
            return
        content = real
        if self.special is not None and ids is not None:
            if self.special.device != device:
                self.special = self.special.to(device)
            content = real & ~torch.isin(ids, self.special)
        is_prompt = torch.arange(T, device=device) < n_prompt_cols  # [T]
        sel = torch.zeros(B, T, dtype=torch.bool, device=device)
        if "prompt" in self.sets and n_prompt_cols > 0:
            sel |= content & is_prompt
        if "generated" in self.sets and n_prompt_cols < T:
            sel |= content & ~is_prompt
        if "last_prompt" in self.sets and n_prompt_cols > 0:
            rp = content & is_prompt
            last = (n_prompt_cols - 1) - rp[:, :n_prompt_cols].flip(1).int().argmax(1)
            has = rp.any(1)
            sel[torch.arange(B, device=device), last] |= has
        if want_prompt and n_prompt_cols == T and past == 0:
            empty = ~(content & is_prompt).any(1)
            if bool(empty.any()):
                rows = empty.nonzero().flatten().tolist()
                warnings.warn(
                    f"steering: prompt rows {rows} have no token to steer (empty, or only "
                    "special tokens, which are never steered): their prompt is left unedited",
                    stacklevel=2,
                )
        if self.mask is not None:
            cols = past + torch.arange(T)
            inside = cols < self.mask.shape[1]
            m = torch.zeros(self.mask.shape[0], T, dtype=torch.bool)
            m[:, inside] = self.mask[:, cols[inside]]
            if m.shape[0] != B:
                if m.shape[0] == 1:
                    m = m.expand(B, T)
                elif B % m.shape[0] == 0:  # generate repeats rows for beams / return sequences
                    m = m.repeat_interleave(B // m.shape[0], dim=0)
                else:
                    raise ValueError(
                        f"positions: the mask has {self.mask.shape[0]} rows, but the forward has batch size {B}"
                    )
            sel |= m.to(device) & real
        self.step = _Step(
            B, T, sel, (sel & is_prompt).sum(), (sel & ~is_prompt).sum(), n_prompt_cols
        )


def special_token_ids(tokenizer) -> torch.Tensor | None:
    from integral_superposition.data.tokenize import special_ids

    if tokenizer is None:
        return None
    ids = sorted(special_ids(tokenizer))
    unk = getattr(tokenizer, "unk_token_id", None)
    ids = [i for i in ids if i != unk]  # UNK stands for text
    return torch.tensor(ids, dtype=torch.long) if ids else None


def steerable_token_mask(tokenizer, ids: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool: the tokens of ``ids [B, T]`` that the named position sets may steer
    (all but special tokens; UNK stands for text and counts)."""
    special = special_token_ids(tokenizer)
    if special is None:
        return torch.ones_like(ids, dtype=torch.bool)
    return ~torch.isin(ids, special.to(ids.device))
