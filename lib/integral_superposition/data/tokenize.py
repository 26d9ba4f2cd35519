"""Tokenisation helpers shared by dumping, metrics and steering."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class TokenBatch:
    """A padded batch: ``input_ids``/``attention_mask`` ``[B, T]`` and per-row lengths ``[B]``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lengths: torch.Tensor
    padding_side: str


def pad_token_id(tokenizer) -> int:
    """The pad id, falling back to EOS and then 0 for tokenizers without one (GPT-2)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def tokenize_texts(
    tokenizer, texts: Sequence[str], max_len: int, prepend_bos: bool = True
) -> list[list[int]]:
    """Token ids per text, truncated to ``max_len`` (BOS included).

    The tokenizer's own special tokens are kept (BOS for Gemma/Llama, CLS/SEP for BERT);
    ``prepend_bos`` adds the BOS token for tokenizers that do not (GPT-2, GPT-NeoX), and
    ``prepend_bos=False`` removes a leading BOS the tokenizer added.
    """
    if max_len < 1:
        raise ValueError(f"max_len={max_len}: expected a positive token count")
    if not texts:  # fast tokenizers fail on an empty batch
        return []
    # Token-level truncation keeps the same prefix as tokenising everything; one spare token
    # covers a leading BOS that is removed below.
    enc = tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=max_len + 1)[
        "input_ids"
    ]
    bos = tokenizer.bos_token_id
    out: list[list[int]] = []
    for ids in enc:
        ids = list(ids)
        if bos is not None:
            if (
                prepend_bos
                and (not ids or ids[0] != bos)
                and not getattr(tokenizer, "cls_token_id", None)
            ):
                ids = [bos, *ids]
            elif not prepend_bos and ids and ids[0] == bos:
                ids = ids[1:]
        out.append(ids[:max_len])
    return out


def pad_batch(
    seqs: Sequence[Sequence[int]], pad_id: int, padding_side: str = "right"
) -> TokenBatch:
    """Pad id lists into a :class:`TokenBatch` (``left`` padding for generation)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side={padding_side!r}: expected 'left' or 'right'")
    if len(seqs) == 0:
        raise ValueError("seqs is empty: expected at least one sequence")
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    if int(lengths.min()) == 0:
        raise ValueError("a sequence has no tokens after tokenisation")
    t = int(lengths.max())
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        n = len(s)
        if padding_side == "right":
            ids[i, :n] = torch.tensor(s, dtype=torch.long)
            mask[i, :n] = 1
        else:
            ids[i, t - n :] = torch.tensor(s, dtype=torch.long)
            mask[i, t - n :] = 1
    return TokenBatch(ids, mask, lengths, padding_side)


def special_ids(tokenizer) -> set[int]:
    """Ids of all special tokens (BOS, EOS, pad, CLS, SEP, ...)."""
    ids = set(int(i) for i in getattr(tokenizer, "all_special_ids", []) if i is not None)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "cls_token_id", "sep_token_id"):
        v = getattr(tokenizer, name, None)
        if v is not None:
            ids.add(int(v))
    return ids
