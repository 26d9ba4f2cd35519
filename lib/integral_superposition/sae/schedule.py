"""Learning-rate and sparsity-coefficient schedules of SAE training.

The learning rate of step ``s`` (0-based) of a ``total``-step run is ``lr * f(s)`` with
``f(s) = warmup(s) * decay(s)``: a linear warmup ``min(1, (s + 1) / lr_warmup_steps)`` and a
linear decay to zero over the last ``lr_decay_frac`` of the steps (no decay when ``total`` is
unknown, e.g. a one-shot iterator without ``train_tokens``). Both factors multiply, so a run
shorter than its warmup still decays to zero at its end. The optimiser follows it through
:func:`lr_scheduler`, a ``torch.optim.lr_scheduler.LambdaLR``; :func:`lr_at` gives the same
number for logs. The sparsity coefficient ramps linearly from 0 to ``l1`` over the first
``l1_warmup_frac`` of the steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

from integral_superposition.config import SAEConfig


def decay_start(cfg: SAEConfig, total: int | None) -> int | None:
    """The first step of the LR decay of a ``total``-step run (None: no decay)."""
    if not total or cfg.lr_decay_frac <= 0:
        return None
    return total - max(1, round(cfg.lr_decay_frac * total))


def lr_factor(cfg: SAEConfig, total: int | None) -> Callable[[int], float]:
    """``f(step)``: the multiple of ``cfg.lr`` used at 0-based ``step`` of a ``total``-step run."""
    warmup = cfg.lr_warmup_steps
    start = decay_start(cfg, total)
    n_decay = 0 if start is None else total - start  # type: ignore[operator]

    def f(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup) if warmup else 1.0
        decay = 1.0
        if start is not None and step >= start:
            decay = max(0.0, (total - step) / n_decay)  # type: ignore[operator]
        return warm * decay

    return f


def lr_scheduler(
    opt: torch.optim.Optimizer, cfg: SAEConfig, total: int | None, start: int = 0
) -> LambdaLR:
    """A ``LambdaLR`` over ``opt`` following :func:`lr_factor`, positioned so that the next
    optimiser step is step ``start`` (a resumed run); call its ``step()`` after each step."""
    for g in opt.param_groups:
        g["lr"] = cfg.lr
        g["initial_lr"] = cfg.lr
    return LambdaLR(opt, lr_factor(cfg, total), last_epoch=start - 1)


def lr_at(cfg: SAEConfig, step: int, total: int | None) -> float:
    """Learning rate of step ``step`` (0-based): ``cfg.lr * lr_factor(cfg, total)(step)``."""
    return cfg.lr * lr_factor(cfg, total)(step)


def sparsity_coef_at(cfg: SAEConfig, step: int, total: int | None) -> float:
    """The sparsity coefficient of step ``step``: ``l1`` ramped up over ``l1_warmup_frac``."""
    if not total or cfg.l1_warmup_frac <= 0:
        return cfg.l1
    n = max(1, round(cfg.l1_warmup_frac * total))
    return cfg.l1 * min(1.0, (step + 1) / n)


def total_steps(cfg: SAEConfig, per_epoch: int) -> int:
    """Optimiser steps of a run: ``train_tokens // batch_size`` when set, else ``epochs`` x
    ``per_epoch`` (at least 1). Raises when no shuffle buffer of the train split holds a batch."""
    if per_epoch == 0:
        raise ValueError(
            f"batch_size={cfg.batch_size}: no shuffle buffer of the train split holds a whole "
            f"batch; raise shuffle_buffer_tokens ({cfg.shuffle_buffer_tokens}) or lower batch_size"
        )
    if cfg.train_tokens is not None:
        return max(1, cfg.train_tokens // cfg.batch_size)
    return max(1, int(cfg.epochs * per_epoch))
