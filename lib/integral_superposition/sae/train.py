"""Training sparse autoencoders from stored activations.

:func:`train_saes` trains several SAEs (widths, ``top_k``, coefficients, architectures or
hook points) on one stream of batches, read once, and publishes each with
:func:`~integral_superposition.sae.save_sae`. :func:`train_sae` is the seed's call: it trains
one given model in place.

The recipe (docs/sae.md): inputs scaled to mean norm ``sqrt(d)`` and extreme-norm tokens
dropped; ``b_dec`` at the geometric median of a sample, ``W_enc = W_dec^T``; unit-norm decoder
rows (the gradient's parallel component removed before each step, rows renormalised after);
Adam with linear LR warmup and a linear decay to zero over the last ``lr_decay_frac`` of the
steps; the sparsity coefficient warmed up; gradient-norm clipping; AuxK for dead latents of
the TopK family; the scale folded back into the weights when saved.

The loss is ``(mse + auxk_coef * aux) / d_in + coef * sparsity`` where ``mse`` is the squared
error summed over ``d_in`` and averaged over tokens (of the scaled inputs).

Checkpoints (``checkpoint_uri``) are written atomically every ``checkpoint_every`` steps:
``step-NNNNNNNNN/`` holds one safetensors file per SAE (weights, Adam moments, dead-latent
counters) plus ``state.json`` (step, schedule, scales, training curve, config fingerprint),
and ``latest.json`` is replaced last. A run resumes from ``latest.json`` and, on CPU with the
same seed, ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from integral_superposition import storage
from integral_superposition.config import SAEConfig, dead_window
from integral_superposition.dump.store import NonFiniteActivationsError, first_non_finite
from integral_superposition.progress import ProgressFn, Reporter
from integral_superposition.sae.load import save_sae
from integral_superposition.sae.model import SparseAutoencoder, sae_parameter_count

log = logging.getLogger(__name__)

LogFn = Callable[[int, dict[str, float]], None]

CHECKPOINT_FORMAT = 1
_STREAM_FIELDS = ("batch_size", "seed", "epochs", "train_tokens", "test_fraction")
_STREAM_FIELDS_STORE = (*_STREAM_FIELDS, "shuffle_buffer_tokens")
_INIT_TOKENS = 16384
_BLOCK_TOKENS = 4096


@dataclass
class TrainResult:
    """What training one SAE produced: where it is saved and how good it is."""

    uri: str | None
    """The published SAE folder (None for :func:`train_sae`, which trains in place)."""
    content_hash: str | None
    """``manifest["content_hash"]`` of the published SAE."""
    metrics: dict[str, Any]
    """Held-out metrics (``evaluate_sae``) or, without a held-out split, the last training log."""
    steps: int
    """Optimiser steps taken in total (including those before a resume)."""
    tokens: int
    """Training tokens consumed (batch rows, before outlier filtering)."""
    resumed_from_step: int = 0
    """The checkpoint step this run resumed from (0 for a fresh run)."""
    config: SAEConfig | None = None


# -- schedules ---------------------------------------------------------------------------------
def lr_at(cfg: SAEConfig, step: int, total: int | None) -> float:
    """Learning rate of step ``step`` (0-based): linear warmup, then a linear decay to zero over
    the last ``lr_decay_frac`` of ``total`` steps (no decay when ``total`` is unknown)."""
    warm = min(1.0, (step + 1) / cfg.lr_warmup_steps) if cfg.lr_warmup_steps else 1.0
    decay = 1.0
    if total and cfg.lr_decay_frac > 0:
        n_decay = max(1, round(cfg.lr_decay_frac * total))
        start = total - n_decay
        if step >= start:
            decay = max(0.0, (total - step) / n_decay)
    return cfg.lr * warm * decay


def sparsity_coef_at(cfg: SAEConfig, step: int, total: int | None) -> float:
    """The sparsity coefficient of step ``step``: ``l1`` ramped up over ``l1_warmup_frac``."""
    if not total or cfg.l1_warmup_frac <= 0:
        return cfg.l1
    n = max(1, round(cfg.l1_warmup_frac * total))
    return cfg.l1 * min(1.0, (step + 1) / n)


# -- initialisation ----------------------------------------------------------------------------
@torch.no_grad()
def geometric_median(x: torch.Tensor, max_iter: int = 200, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's geometric median of the rows of ``x [n, d]`` -> ``[d]`` (float64 inside)."""
    pts = x.double()
    y = pts.mean(0)
    for _ in range(max_iter):
        w = 1.0 / (pts - y).norm(dim=1).clamp_min(1e-12)
        y_new = (w[:, None] * pts).sum(0) / w.sum()
        moved = float((y_new - y).norm())
        y = y_new
        if moved <= tol * max(1e-12, float(y.norm())):
            break
    return y.to(x.dtype)


# -- data sources ------------------------------------------------------------------------------
class _StoreSource:
    """Batches from an :class:`ActivationStore`: deterministic, resumable at any step."""

    resumable = True

    def __init__(self, store, hooks: list[str], cfg: SAEConfig):
        self.store = store
        self.hooks = hooks
        self.cfg = cfg
        self.d_model = int(store.d_model)
        if store.n_tokens == 0:
            raise ValueError(f"the activation store {store.uris} is empty (0 tokens)")
        n_train = int(store.split_mask("train", cfg.test_fraction, 0).sum())
        if n_train < cfg.batch_size:
            raise ValueError(
                f"batch_size={cfg.batch_size}: the store's train split has only {n_train} tokens "
                f"({store.n_tokens} in all, test_fraction={cfg.test_fraction}); use a smaller batch"
            )
        self.per_epoch = store.batches_per_epoch(
            cfg.batch_size, "train", cfg.test_fraction, 0, self._buffer(), _BLOCK_TOKENS
        )
        if self.per_epoch == 0:
            raise ValueError(
                f"batch_size={cfg.batch_size}: no shuffle buffer of the train split holds a whole "
                f"batch; raise shuffle_buffer_tokens ({cfg.shuffle_buffer_tokens}) or lower batch_size"
            )
        if cfg.train_tokens is not None:
            self.total = max(1, cfg.train_tokens // cfg.batch_size)
        else:
            self.total = max(1, int(cfg.epochs * self.per_epoch))

    def _buffer(self) -> int:
        return max(self.cfg.shuffle_buffer_tokens, self.cfg.batch_size)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "store",
            "content_hash": self.store.content_hash,
            "uris": list(self.store.uris),
            "hooks": self.hooks,
            "n_tokens": int(self.store.n_tokens),
        }

    def locate(self, row: int) -> str:
        """``shard file, row`` of a global store row, for error messages."""
        return self.store.locate(row)

    def check_finite(self) -> None:
        """Fail before training when a hook point's norm statistics show NaN/inf values."""
        for h in self.hooks:
            ns = self.store.norm_stats(h)
            vals = [ns.get(k) for k in ("mean", "max", "min")]
            if all(v is not None and math.isfinite(v) for v in vals):
                continue
            for _ in self.store.iter_chunks(1 << 16, hook_point=h, dtype=None):
                pass  # the store raises NonFiniteActivationsError at the first bad row

    def sample(self, n: int) -> dict[str, torch.Tensor]:
        """Up to ``n`` evenly spaced training rows per hook point, float32 ``[n, d]``."""
        rows = np.flatnonzero(self.store.split_mask("train", self.cfg.test_fraction, 0))
        if rows.size > n:
            rows = rows[np.linspace(0, rows.size - 1, n).round().astype(np.int64)]
        return {h: self.store.gather(rows, h).float() for h in self.hooks}

    def batches(self, start: int) -> Iterator[tuple[dict[str, torch.Tensor], Any]]:
        it = self.store.iter_batches(
            self.cfg.batch_size,
            hook_points=self.hooks,
            split="train",
            test_fraction=self.cfg.test_fraction,
            split_seed=0,
            seed=self.cfg.seed,
            n_batches=self.total,
            start_batch=start,
            buffer_tokens=self._buffer(),
            block_tokens=_BLOCK_TOKENS,
        )
        for b in it:
            acts = b.acts if isinstance(b.acts, dict) else {self.hooks[0]: b.acts}
            yield acts, b.index


class _IterableSource:
    """Batches re-cut to ``batch_size`` rows from tensors: a ``[N, d]`` tensor, a sequence or
    re-iterable of ``[n, d]`` (or ``[B, T, d]``) tensors, a callable returning such an
    iterator, or a one-shot iterator (one pass; no LR decay unless ``train_tokens`` is set)."""

    def __init__(self, obj: Any, hook: str, cfg: SAEConfig):
        self.hooks = [hook]
        self.cfg = cfg
        if isinstance(obj, torch.Tensor | np.ndarray):
            obj = [obj]
        if callable(obj) and not hasattr(obj, "__iter__"):
            self._factory: Callable[[], Iterator[Any]] = obj
            self.reiterable = True
        elif isinstance(obj, Iterable) and iter(obj) is not obj:
            self._factory = lambda: iter(obj)
            self.reiterable = True
        elif isinstance(obj, Iterator):
            self._factory = lambda: obj
            self.reiterable = False
        else:
            raise TypeError(
                f"shard_iterator: expected an ActivationStore, a dump URI, tensors or an iterable of "
                f"[n, d] tensors, got {type(obj).__name__}"
            )
        self._peek: list[torch.Tensor] = []
        self._peek_iter: Iterator[Any] | None = None
        self.resumable = self.reiterable
        first = self._first_tensor()
        self.d_model = int(first.shape[-1])
        bs = cfg.batch_size
        if self.reiterable:
            n_rows = sum(int(_as_rows(t).shape[0]) for t in self._factory())
            if n_rows == 0:
                raise ValueError("shard_iterator yields no activation rows (it is empty)")
            self.per_epoch = -(-n_rows // bs)
            self.n_rows = n_rows
        else:
            self.per_epoch = None
            self.n_rows = None
        if cfg.train_tokens is not None:
            self.total: int | None = max(1, cfg.train_tokens // bs)
        elif self.per_epoch is not None:
            self.total = max(1, int(cfg.epochs * self.per_epoch))
        else:
            self.total = None

    def _first_tensor(self) -> torch.Tensor:
        it = self._factory()
        for item in it:
            t = _as_rows(item)
            if t.shape[0]:
                if not self.reiterable:  # keep what we consumed of a one-shot iterator
                    self._peek = [t]
                    self._peek_iter = it
                return t
        raise ValueError("shard_iterator yields no activation rows (it is empty)")

    def describe(self) -> dict[str, Any]:
        return {"kind": "iterable", "n_rows": self.n_rows, "d_model": self.d_model}

    def check_finite(self) -> None:  # checked batch by batch
        return None

    def locate(self, row: int) -> str:
        return f"input row {row} (counting rows from the start of the stream)"

    def _rows(self) -> Iterator[torch.Tensor]:
        epoch = 0
        while True:
            if self._peek_iter is not None:
                yield from self._peek
                it, self._peek, self._peek_iter = self._peek_iter, [], None
            else:
                if epoch > 0 and not self.reiterable:
                    return
                it = self._factory()
            for item in it:
                t = _as_rows(item)
                if t.shape[-1] != self.d_model:
                    raise ValueError(
                        f"shard_iterator: a tensor has last dimension {t.shape[-1]}, expected d_model={self.d_model}"
                    )
                yield t
            epoch += 1
            yield None  # epoch boundary: the last partial batch is emitted

    def batches(self, start: int) -> Iterator[tuple[dict[str, torch.Tensor], Any]]:
        bs = self.cfg.batch_size
        pending: list[torch.Tensor] = []
        n_pending = 0
        step = 0
        row0 = 0
        for t in self._rows():
            if self.total is not None and step >= self.total:
                return
            if t is not None:
                pending.append(t)
                n_pending += t.shape[0]
            while n_pending >= bs or (t is None and n_pending > 0):
                cat = torch.cat(pending) if len(pending) > 1 else pending[0]
                take = min(bs, n_pending)
                batch, rest = cat[:take], cat[take:]
                pending, n_pending = ([rest] if rest.shape[0] else []), rest.shape[0]
                if step >= start:
                    yield {self.hooks[0]: batch.float()}, np.arange(row0, row0 + take)
                row0 += take
                step += 1
                if self.total is not None and step >= self.total:
                    return

    def sample(self, n: int) -> dict[str, torch.Tensor]:
        """Up to ``n`` rows from the start of the stream (a one-shot iterator: what was peeked)."""
        parts, got = [], 0
        items = self._factory() if self.reiterable else iter(self._peek)
        for item in items:
            t = _as_rows(item)[: n - got]
            parts.append(t)
            got += t.shape[0]
            if got >= n:
                break
        x = torch.cat(parts).float() if parts else torch.empty(0, self.d_model)
        return {self.hooks[0]: x}


def _active(out, d_sae: int, values: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(fires per latent [d_sae], active values [n] if values)`` of a training forward."""
    lat = out.latents
    if lat.layout == torch.sparse_csr:
        v = lat.values()
        on = v > 0
        return torch.bincount(lat.col_indices()[on], minlength=d_sae), (v[on] if values else None)
    if out.top_indices is not None:
        on = out.top_values > 0
        fires = torch.bincount(out.top_indices[on], minlength=d_sae)
        return fires, (out.top_values[on].detach() if values else None)
    # dense training codes are >= 0, so counting non-zeros counts firings (no bool copy)
    return torch.count_nonzero(lat, dim=0), (lat[lat > 0] if values else None)


def _as_rows(item: Any) -> torch.Tensor:
    """``[n, d]`` rows of one item of an iterable (tensor, array or ``Batch``)."""
    if hasattr(item, "acts") and hasattr(item, "index"):
        item = item.acts
    if isinstance(item, tuple | list) and item and isinstance(item[0], torch.Tensor):
        item = item[0]
    if isinstance(item, np.ndarray):
        item = torch.from_numpy(item)
    if not isinstance(item, torch.Tensor):
        raise TypeError(f"shard_iterator yielded {type(item).__name__}: expected [n, d] tensors")
    if item.dim() < 2:
        raise ValueError(
            f"shard_iterator yielded a tensor of shape {tuple(item.shape)}: expected [n, d]"
        )
    return item.reshape(-1, item.shape[-1])


def _open_source(obj: Any, cfgs: list[SAEConfig], storage_options=None):
    """A data source over a store, dump URI(s) or tensors, for the hook points of ``cfgs``."""
    from integral_superposition.dump.store import ActivationStore

    store = None
    if isinstance(obj, ActivationStore):
        store = obj
    elif isinstance(obj, str | os.PathLike) or (
        isinstance(obj, Sequence) and obj and all(isinstance(u, str | os.PathLike) for u in obj)
    ):
        from integral_superposition.analysis.scan import as_activation_source

        # dump URIs, or the seed's .npy / .safetensors shard files
        src = as_activation_source(obj, storage_options)
        if isinstance(src, ActivationStore):
            store = src
        else:
            if any(c.hook_point for c in cfgs if c.hook_point not in (None, "input")):
                raise ValueError(
                    "cfg.hook_point: activation files carry no hook points; leave hook_point unset"
                )
            chunk = max(cfgs[0].batch_size, 1 << 14)
            return _IterableSource(lambda: (x for _, x in src.iter_chunks(chunk)), "input", cfgs[0])
    elif isinstance(obj, Sequence) and obj and all(isinstance(s, ActivationStore) for s in obj):
        uris = [u for s in obj for u in s.uris]
        store = ActivationStore(uris, obj[0].storage_options)
    if store is not None:
        hooks: list[str] = []
        for c in cfgs:
            h = store._check_hook(c.hook_point) if c.hook_point else store.hook_point
            if h not in hooks:
                hooks.append(h)
        return _StoreSource(store, hooks, cfgs[0])
    if any(c.hook_point for c in cfgs if c.hook_point not in (None, "input")):
        raise ValueError("cfg.hook_point: tensors carry no hook points; leave hook_point unset")
    return _IterableSource(obj, "input", cfgs[0])


# -- one SAE in training -----------------------------------------------------------------------
def autocast_enabled(cfg: SAEConfig, device: torch.device) -> bool:
    """Whether training runs under bf16 autocast: ``cfg.autocast_bf16``, or when it is None
    (auto), on a CUDA device whose dtype ``auto`` is bf16. CPU training stays float32 unless
    asked: its small matmuls gain little there and would cost precision."""
    if cfg.autocast_bf16 is not None:
        return cfg.autocast_bf16
    if device.type != "cuda":
        return False
    from integral_superposition.compute import resolve_dtype

    return resolve_dtype("auto", device) == torch.bfloat16


@dataclass
class _Trainee:
    cfg: SAEConfig
    sae: SparseAutoencoder
    hook: str
    device: torch.device
    scale: float = 1.0
    max_norm: float | None = None
    curve: list[dict[str, float]] = field(default_factory=list)
    opt: torch.optim.Optimizer = None  # type: ignore[assignment]
    since_fired: torch.Tensor = None  # type: ignore[assignment]
    fire_count: torch.Tensor = None  # type: ignore[assignment]
    tokens_seen: int = 0
    acc: torch.Tensor = None  # type: ignore[assignment]
    acc_steps: int = 0
    autocast: bool = False
    dead_tokens: int = 0  # the dead-latent window in tokens (``config.dead_window``)

    # accumulated log terms: loss, mse, fvu, l0, aux, sparsity, kept tokens
    _N_ACC = 7

    def __post_init__(self) -> None:
        d_sae = self.sae.d_sae
        self.sae.aux_k = self.cfg.aux_k
        self.sae.jumprelu_sparsity = self.cfg.jumprelu_sparsity
        self.sae.jumprelu_tanh_scale = self.cfg.jumprelu_tanh_scale
        self.sae.jumprelu_ste_to_input = self.cfg.jumprelu_ste_to_input
        self.sae.jumprelu_pre_act = self.cfg.jumprelu_pre_act_coef > 0
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=self.cfg.lr, betas=(0.9, 0.999))
        self.since_fired = torch.zeros(d_sae, dtype=torch.int64, device=self.device)
        self.fire_count = torch.zeros(d_sae, dtype=torch.int64, device=self.device)
        self.acc = torch.zeros(self._N_ACC, dtype=torch.float64, device=self.device)
        self.autocast = autocast_enabled(self.cfg, self.device)

    @property
    def uses_auxk(self) -> bool:
        return self.sae.architecture in ("topk", "batchtopk") and self.cfg.auxk_coef > 0

    def dead_mask(self) -> torch.Tensor:
        return self.since_fired >= self.dead_tokens

    def step(self, x_raw: torch.Tensor, step: int, total: int | None) -> None:
        """One optimiser step on raw activations ``x_raw [B, d]``."""
        cfg, sae = self.cfg, self.sae
        x = x_raw.to(self.device, torch.float32, non_blocking=True)
        n_in = x.shape[0]
        if self.max_norm is not None:
            keep = x.norm(dim=1) <= self.max_norm
            if not bool(keep.all()):
                x = x[keep]
        if x.shape[0] == 0:
            return
        x = x * self.scale
        lr = lr_at(cfg, step, total)
        for g in self.opt.param_groups:
            g["lr"] = lr
        coef = sparsity_coef_at(cfg, step, total)
        dead = self.dead_mask() if self.uses_auxk else None
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
            out = sae(x, dead_mask=dead, sparse_decode=cfg.sparse_decode)
        d = sae.d_in
        loss = out.mse / d + coef * out.sparsity_loss
        if dead is not None:
            loss = loss + cfg.auxk_coef * out.aux_loss / d
        elif sae.architecture == "jumprelu" and cfg.jumprelu_pre_act_coef > 0:
            loss = loss + cfg.jumprelu_pre_act_coef * out.aux_loss
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        self.opt.step()
        with torch.no_grad():
            sae.set_decoder_norm_to_unit_norm()
            if sae.architecture == "jumprelu":
                sae.threshold.clamp_(min=0.0)
            fires, pos = _active(out, sae.d_sae, values=sae.architecture == "batchtopk")
            if pos is not None and pos.numel():
                # inference threshold: EMA of the smallest activation the batch kept
                thr = sae.threshold
                m = pos.min().to(thr.dtype)
                thr.copy_(torch.where(thr > 0, 0.99 * thr + 0.01 * m, m))
            self.since_fired += x.shape[0]
            self.since_fired[fires > 0] = 0
            self.fire_count += fires
            self.tokens_seen += n_in
            self.acc += torch.stack(
                [
                    loss.detach().double(),
                    out.mse.detach().double(),
                    out.fvu.detach().double(),
                    out.l0.detach().double(),
                    out.aux_loss.detach().double(),
                    out.sparsity_loss.detach().double(),
                    torch.tensor(float(x.shape[0]), dtype=torch.float64, device=self.device),
                ]
            )
            self.acc_steps += 1

    def flush_log(self, step: int, total: int | None) -> dict[str, float]:
        """Average the accumulated terms since the last log into one curve entry."""
        n = max(1, self.acc_steps)
        a = (self.acc / n).tolist()
        entry = {
            "step": step,
            "tokens": self.tokens_seen,
            "loss": a[0],
            "mse": a[1] / self.scale**2,
            "fvu": a[2],
            "l0": a[3],
            # AuxK is a squared error; the pre-activation loss is linear in the activations
            "aux_loss": a[4]
            / (self.scale if self.sae.architecture == "jumprelu" else self.scale**2),
            "sparsity_loss": a[5],
            # latents that did not fire on the last ``dead_tokens`` training tokens
            "dead_frac": float(self.dead_mask().float().mean()),
            "dead_tokens": float(self.dead_tokens),
            "tokens_per_step": a[6],  # after the outlier filter
            "lr": lr_at(self.cfg, max(0, step - 1), total),
            "sparsity_coef": sparsity_coef_at(self.cfg, max(0, step - 1), total),
        }
        self.curve.append(entry)
        self.acc.zero_()
        self.acc_steps = 0
        return entry

    # -- checkpoint state ------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        t: dict[str, torch.Tensor] = {}
        for name, p in self.sae.named_parameters():
            t[f"param.{name}"] = p.detach()
        t["buffer.threshold"] = self.sae.threshold.detach()
        names = [n for n, _ in self.sae.named_parameters()]
        params = list(self.sae.parameters())
        for name, p in zip(names, params, strict=True):
            st = self.opt.state.get(p)
            if st:
                for k, v in st.items():
                    t[f"adam.{name}.{k}"] = torch.as_tensor(v).detach()
        t["since_fired"] = self.since_fired
        t["fire_count"] = self.fire_count
        t["acc"] = self.acc
        return {k: v.detach().to("cpu").contiguous().clone() for k, v in t.items()}

    def state_json(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "max_norm": self.max_norm,
            "curve": self.curve,
            "tokens_seen": self.tokens_seen,
            "acc_steps": self.acc_steps,
        }

    def load_state(self, tensors: Mapping[str, torch.Tensor], js: Mapping[str, Any]) -> None:
        with torch.no_grad():
            for name, p in self.sae.named_parameters():
                p.copy_(tensors[f"param.{name}"])
            self.sae.threshold.copy_(tensors["buffer.threshold"])
        state = self.opt.state_dict()
        names = [n for n, _ in self.sae.named_parameters()]
        new_state = {}
        for i, name in enumerate(names):
            keys = [k for k in tensors if k.startswith(f"adam.{name}.")]
            if keys:
                new_state[i] = {
                    k.rsplit(".", 1)[1]: tensors[k].to(self.device)
                    if k.rsplit(".", 1)[1] != "step"
                    else tensors[k].clone()
                    for k in keys
                }
        self.opt.load_state_dict({"state": new_state, "param_groups": state["param_groups"]})
        self.since_fired.copy_(tensors["since_fired"])
        self.fire_count.copy_(tensors["fire_count"])
        self.acc.copy_(tensors["acc"])
        self.scale = float(js["scale"])
        self.max_norm = js["max_norm"]
        self.curve = list(js["curve"])
        self.tokens_seen = int(js["tokens_seen"])
        self.acc_steps = int(js["acc_steps"])


# -- checkpoints -------------------------------------------------------------------------------
_STEP_DIR_RE = re.compile(r"^step-\d{9}$")
_STEP_FILE_RE = re.compile(r"^(\.tmp-)?(state\.json|rng\.safetensors|sae-\d{2}\.safetensors)")


class _Checkpoints:
    """Atomic step directories under ``uri`` with ``latest.json`` published last.

    Only files a checkpoint writes are ever removed, by name: a step directory's files
    (``step-NNNNNNNNN/{state.json, rng.safetensors, sae-NN.safetensors}``) and ``latest.json``;
    folders (step directories and ``uri``) are removed only when nothing else is left in them.
    """

    def __init__(self, uri: str, storage_options=None):
        self.uri = str(uri).rstrip("/")
        self.so = storage_options

    def _remove_step(self, name: str) -> None:
        if not _STEP_DIR_RE.match(str(name)):
            return  # not a name we write (e.g. a tampered latest.json): leave it alone
        d = storage.join(self.uri, name)
        for f in storage.listdir(d, self.so):
            if _STEP_FILE_RE.match(f):
                storage.remove(storage.join(d, f), self.so)
        storage.remove_empty_dir(d, self.so)

    def latest(self) -> dict[str, Any] | None:
        p = storage.join(self.uri, "latest.json")
        return storage.read_json(p, self.so) if storage.exists(p, self.so) else None

    def write(
        self, step: int, fingerprint: dict, trainees: list[_Trainee], extra: dict[str, Any]
    ) -> None:
        name = f"step-{step:09d}"
        d = storage.join(self.uri, name)
        files = {}
        for i, t in enumerate(trainees):
            data = st_save(t.state_tensors())
            storage.write_bytes(storage.join(d, f"sae-{i:02d}.safetensors"), data, self.so)
            files[f"sae-{i:02d}.safetensors"] = storage.file_entry("", data)
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng.update({f"torch_cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        data = st_save(rng)
        storage.write_bytes(storage.join(d, "rng.safetensors"), data, self.so)
        files["rng.safetensors"] = storage.file_entry("", data)
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "fingerprint": fingerprint,
            "trainees": [t.state_json() for t in trainees],
            "files": files,
            **extra,
        }
        storage.write_json(storage.join(d, "state.json"), state, self.so)
        previous = self.latest()
        storage.write_json(
            storage.join(self.uri, "latest.json"), {"step": step, "dir": name}, self.so
        )
        if previous and previous.get("dir") != name:
            self._remove_step(str(previous.get("dir")))

    def read(
        self,
    ) -> tuple[dict[str, Any], list[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None:
        latest = self.latest()
        if latest is None:
            return None
        d = storage.join(self.uri, latest["dir"])
        state = storage.read_json(storage.join(d, "state.json"), self.so)
        tensors = [
            st_load(storage.read_bytes(storage.join(d, f"sae-{i:02d}.safetensors"), self.so))
            for i in range(len(state["trainees"]))
        ]
        rng = st_load(storage.read_bytes(storage.join(d, "rng.safetensors"), self.so))
        return state, tensors, rng

    def remove(self) -> None:
        # latest.json first: a crash half-way leaves no pointer to a half-removed step
        storage.remove(storage.join(self.uri, "latest.json"), self.so)
        for name in storage.listdir(self.uri, self.so):
            self._remove_step(name)
        storage.remove_empty_dir(self.uri, self.so)  # only when nothing else is left in it


def _fingerprint(cfgs: list[SAEConfig], source_desc: dict[str, Any], extra: dict[str, Any]) -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "cfgs": [
            c.model_dump(mode="json", exclude={"checkpoint_every", "log_every", "device"})
            for c in cfgs
        ],
        "source": source_desc,
        **extra,
    }


def _diff(a: Any, b: Any, path: str = "") -> str | None:
    """First differing path between two JSON-like values."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            r = _diff(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
            if r:
                return r
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            r = _diff(x, y, f"{path}[{i}]")
            if r:
                return r
        return None
    return None if a == b else f"{path}: checkpoint has {a!r}, this run has {b!r}"


# -- checks ------------------------------------------------------------------------------------
def _check_cfgs(cfgs: Any, store_like: bool) -> list[SAEConfig]:
    if isinstance(cfgs, SAEConfig):
        cfgs = [cfgs]
    if not isinstance(cfgs, Sequence) or not cfgs:
        raise ValueError(f"cfgs={cfgs!r}: expected a non-empty list of SAEConfig")
    out = []
    for i, c in enumerate(cfgs):
        if not isinstance(c, SAEConfig):
            raise TypeError(f"cfgs[{i}]: expected an SAEConfig, got {type(c).__name__}")
        # re-validate: model_construct or assignment tricks must not bypass the checks
        out.append(SAEConfig.model_validate(c.model_dump()))
    fields = _STREAM_FIELDS_STORE if store_like else _STREAM_FIELDS
    for f in fields:
        vals = {getattr(c, f) for c in out}
        if len(vals) > 1:
            raise ValueError(
                f"cfgs: {f} differs between configs ({sorted(map(str, vals))}); SAEs trained in one "
                f"pass share one stream of batches, so {', '.join(fields)} must be equal"
            )
    return out


def _resolve_device(device: Any, cfg: SAEConfig) -> torch.device:
    from integral_superposition.compute import resolve_device

    return resolve_device(device if device is not None else cfg.device)


def _init_trainee(t: _Trainee, sample: torch.Tensor, init_b_dec: bool) -> None:
    """Data-dependent setup: outlier threshold, activation scale, ``b_dec``, unit decoder rows."""
    cfg, sae = t.cfg, t.sae
    norms = sample.norm(dim=1)
    if cfg.max_norm_factor is not None and norms.numel():
        t.max_norm = float(cfg.max_norm_factor * norms.median())
        sample = sample[norms <= t.max_norm]
        norms = sample.norm(dim=1)
    mean_norm = float(norms.mean()) if norms.numel() else 1.0
    t.scale = (
        math.sqrt(sae.d_in) / mean_norm if cfg.normalize_activations and mean_norm > 0 else 1.0
    )
    with torch.no_grad():
        sae.fold_activation_scale(1.0 / t.scale)  # raw units -> scaled units
        if init_b_dec and sample.shape[0]:
            sae.b_dec.copy_(geometric_median(sample * t.scale).to(sae.b_dec))
        sae.set_decoder_norm_to_unit_norm()


# -- the training loop -------------------------------------------------------------------------
@torch.enable_grad()  # training works even when the caller sits inside no_grad/inference code
def _run(
    source,
    trainees: list[_Trainee],
    cfgs: list[SAEConfig],
    *,
    ckpt: _Checkpoints | None,
    fingerprint: dict[str, Any],
    resume: bool,
    init_b_dec: bool,
    on_progress: ProgressFn | None,
    on_log: LogFn | None,
    progress: bool,
) -> tuple[int, int]:
    """Train every trainee on one pass of ``source``; returns ``(steps, resumed_from)``."""
    total = source.total
    for t in trainees:
        t.dead_tokens = dead_window(t.cfg, total)
        log.info(
            "dead-latent window: %d tokens (%s)",
            t.dead_tokens,
            "set by dead_tokens"
            if t.cfg.dead_tokens is not None
            else "automatic: scaled to the run",
        )
    start = 0
    wrote_ckpt = False
    state = ckpt.read() if (ckpt is not None and resume) else None
    if state is not None:
        js, tensors, rng = state
        diff = _diff(js["fingerprint"], fingerprint)
        if diff:
            raise ValueError(
                f"checkpoint_uri={ckpt.uri!r} holds a checkpoint of a different run ({diff}); "
                "use another checkpoint_uri or resume=False to start over"
            )
        for t, tt, tj in zip(trainees, tensors, js["trainees"], strict=True):
            t.load_state(tt, tj)
        torch.set_rng_state(rng["torch_cpu"])
        start = int(js["step"])
        log.info("resuming training from checkpoint step %d (%s)", start, ckpt.uri)
    else:
        sample = source.sample(_INIT_TOKENS)
        for t in trainees:
            _init_trainee(t, sample[t.hook], init_b_dec)
    every_ckpt = min(c.checkpoint_every for c in cfgs)
    every_log = min(c.log_every for c in cfgs)
    bar = Reporter(
        f"train {len(trainees)} SAE{'s' if len(trainees) > 1 else ''}",
        on_progress,
        unit="steps",
        total=total or 0,
        initial=start,
        show=progress,
    ).__enter__()  # left in the finally below
    step = start
    try:
        for sae_t in trainees:
            sae_t.sae.train()
        for acts, index in source.batches(start):
            for h, x in acts.items():
                bad = first_non_finite(x)  # one aminmax per batch
                if bad is not None:
                    r = bad[0]
                    row = int(index[r]) if index is not None else r
                    raise NonFiniteActivationsError(
                        f"activations at hook point {h!r} contain NaN or inf values: {source.locate(row)}"
                    )
            for t in trainees:
                t.step(acts[t.hook], step, total)
            step += 1
            if step % every_log == 0 or step == total:
                entries = [t.flush_log(step, total) for t in trainees]
                bar.postfix(
                    loss=f"{entries[0]['loss']:.4g}",
                    l0=f"{entries[0]['l0']:.1f}",
                    fvu=f"{entries[0]['fvu']:.3f}",
                    dead=f"{entries[0]['dead_frac']:.3f}",
                )
                for i, e in enumerate(entries):
                    log.info("step %d sae %d: %s", step, i, e)
                    if on_log is not None:
                        on_log(step, e if len(entries) == 1 else {**e, "sae": i})
            if ckpt is not None and (step % every_ckpt == 0 or step == total):
                ckpt.write(step, fingerprint, trainees, {"total": total})
                wrote_ckpt = True
            # after the checkpoint: a reported step is durable
            bar.update(step, total if total is not None else step)
    except NonFiniteActivationsError:
        # bad data found mid-run: a fresh run leaves no checkpoint behind
        if ckpt is not None and wrote_ckpt and start == 0:
            ckpt.remove()
        raise
    finally:
        bar.__exit__(*sys.exc_info())
    if step == start and start == 0:
        raise ValueError("the data source yielded no batch: nothing to train on")
    if trainees[0].acc_steps:
        for t in trainees:
            t.flush_log(step, total)
    if any(t.sae.architecture == "batchtopk" for t in trainees):
        sample = source.sample(_INIT_TOKENS)
        for t in trainees:
            if t.sae.architecture == "batchtopk":
                _calibrate_threshold(t, sample[t.hook])
    return step, start


@torch.no_grad()
def _calibrate_threshold(t: _Trainee, x_raw: torch.Tensor) -> None:
    """BatchTopK's inference threshold: the mean over ``batch_size`` chunks of ``x_raw`` of the
    smallest activation a training batch keeps (the EMA of training lags a moving target)."""
    sae, cfg = t.sae, t.cfg
    x = x_raw.to(t.device, torch.float32)
    if t.max_norm is not None:
        x = x[x.norm(dim=1) <= t.max_norm]
    x = x * t.scale
    bs = min(cfg.batch_size, x.shape[0])
    mins = []
    for a in range(0, x.shape[0] - bs + 1, bs):
        acts = F.relu(sae.pre_activations(x[a : a + bs])).flatten()
        kept = acts.topk(min(acts.numel(), sae.top_k * bs), sorted=False).values
        kept = kept[kept > 0]
        if kept.numel():
            mins.append(kept.min())
    if mins:
        sae.threshold.fill_(float(torch.stack(mins).mean()))


def _finish(t: _Trainee) -> SparseAutoencoder:
    """Fold the training scale into the weights; the SAE then takes raw activations."""
    sae = t.sae
    sae.eval()
    with torch.no_grad():
        sae.fold_activation_scale(t.scale)
    t.scale = 1.0
    return sae


def _check_training_memory(
    cfgs: Sequence[SAEConfig], d_model: int, dev: torch.device, allocated: int = 0
) -> None:
    """``MemoryError`` before training SAEs that cannot fit on ``dev``: float32 weights,
    gradients and two Adam moments per SAE, plus a batch of dense latents and their gradient
    (``allocated``: bytes of weights already on ``dev``)."""
    from integral_superposition.compute import check_memory

    need = -allocated
    for c in cfgs:
        need += 4 * 4 * sae_parameter_count(d_model, c.k) + 2 * 4 * c.batch_size * c.k
    widths = ", ".join(f"k={c.k}" for c in cfgs)
    check_memory(
        need,
        dev,
        f"training {len(cfgs)} SAE(s) ({widths}, d_model={d_model}, "
        f"batch_size={cfgs[0].batch_size}: weights, gradients, Adam moments and a batch of latents)",
    )


def train_saes(
    stores: Any,
    cfgs: Sequence[SAEConfig],
    out_uris: Sequence[str],
    *,
    checkpoint_uri: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    on_progress: ProgressFn | None = None,
    on_log: LogFn | None = None,
    resume: bool = True,
    device: str | torch.device | None = None,
    progress: bool = True,
    metadata: Mapping[str, Any] | None = None,
    evaluate: bool = True,
) -> list[TrainResult]:
    """Train one SAE per config on one pass over ``stores`` and publish each to ``out_uris``.

    ``stores``: an ``ActivationStore``, a dump URI or a list of them (concatenated), or tensors.
    The configs may differ in width, architecture, ``top_k``, coefficients and hook point, but
    share the stream: ``batch_size``, ``seed``, the budget and ``test_fraction``.
    ``checkpoint_uri``: directory for atomic checkpoints (resumed when ``resume``; removed after
    the SAEs are published). ``on_progress(step, total)`` after each step and
    ``on_log(step, metrics)`` every ``log_every`` steps. Returns one :class:`TrainResult` each.
    """
    from integral_superposition.dump.store import ActivationStore

    store_like = isinstance(stores, ActivationStore | str) or (
        isinstance(stores, Sequence)
        and bool(stores)
        and all(isinstance(s, ActivationStore | str) for s in stores)
    )
    cfg_list = _check_cfgs(cfgs, store_like)
    if isinstance(out_uris, str):
        out_uris = [out_uris]
    out_uris = [str(u) for u in out_uris]
    if len(out_uris) != len(cfg_list):
        raise ValueError(
            f"out_uris has {len(out_uris)} entries for {len(cfg_list)} configs: expected one URI per config"
        )
    if len(set(out_uris)) != len(out_uris):
        raise ValueError(f"out_uris={out_uris!r}: every SAE needs its own output URI")
    dev = _resolve_device(device, cfg_list[0])
    source = _open_source(stores, cfg_list, storage_options)
    _check_training_memory(cfg_list, source.d_model, dev)
    source.check_finite()
    if checkpoint_uri is not None and not source.resumable:
        raise ValueError(
            "checkpoint_uri: a one-shot iterator cannot be resumed; pass an ActivationStore, "
            "a dump URI or a re-iterable of tensors"
        )
    trainees = []
    for c in cfg_list:
        hook = c.hook_point if c.hook_point and c.hook_point != "input" else source.hooks[0]
        sae = SparseAutoencoder(
            source.d_model,
            c.k,
            architecture=c.architecture,
            top_k=c.top_k,
            jumprelu_bandwidth=c.jumprelu_bandwidth,
            jumprelu_init_threshold=c.jumprelu_init_threshold,
            seed=c.seed,
        ).to(dev)
        trainees.append(_Trainee(c, sae, hook, dev))
    ckpt = _Checkpoints(checkpoint_uri, storage_options) if checkpoint_uri else None
    fingerprint = _fingerprint(cfg_list, source.describe(), {"total": source.total})
    t0 = time.perf_counter()
    steps, resumed = _run(
        source,
        trainees,
        cfg_list,
        ckpt=ckpt,
        fingerprint=fingerprint,
        resume=resume,
        init_b_dec=True,
        on_progress=on_progress,
        on_log=on_log,
        progress=progress,
    )
    elapsed = time.perf_counter() - t0
    results = []
    for t, uri in zip(trainees, out_uris, strict=True):
        results.append(
            _publish(t, uri, source, steps, resumed, elapsed, storage_options, metadata, evaluate)
        )
    if ckpt is not None:
        ckpt.remove()
    return results


def _store_metadata(store, hook: str) -> dict[str, Any]:
    """SAELens ``metadata`` fields describing where an SAE's activations came from."""
    from integral_superposition.backends.sources import weights_source

    info = store.hook_info(hook)
    mcfg = store.manifest.get("config") or {}
    meta = {
        "model_name": store.model_info.get("model_id"),
        "hook_name": info.get("saelens_name") or hook,
        "context_size": mcfg.get("max_len"),
        "prepend_bos": mcfg.get("prepend_bos", True),
        "dataset_path": store.uris[0] if len(store.uris) == 1 else list(store.uris),
        "isup_hook_point": hook,
    }
    # model_name stays the hub id SAELens expects; the weights' real source sits beside it
    source = weights_source(store.model_info)
    if source is not None:
        meta["model_source"] = source
    return meta


def _publish(
    t: _Trainee,
    uri: str,
    source,
    steps: int,
    resumed: int,
    elapsed: float,
    storage_options,
    metadata: Mapping[str, Any] | None,
    evaluate: bool,
) -> TrainResult:
    sae = _finish(t)
    cfg = t.cfg
    metrics: dict[str, Any]
    sparsity = None
    meta: dict[str, Any] = {}
    act_hash = None
    if isinstance(source, _StoreSource):
        from integral_superposition.sae.metrics import evaluate_sae

        store = source.store
        act_hash = store.content_hash
        meta = _store_metadata(store, t.hook)
        if evaluate:
            ev = evaluate_sae(
                sae, store, split="test", test_fraction=cfg.test_fraction, hook_point=t.hook
            )
            metrics = {k: v for k, v in ev.items() if not isinstance(v, list | dict)}
            metrics["density_hist"] = ev.get("density_hist")
            sparsity = torch.log10(torch.as_tensor(ev["density"], dtype=torch.float32) + 1e-10)
        else:
            metrics = {}
    else:
        metrics = {}
    if not metrics or not evaluate:
        last = t.curve[-1] if t.curve else {}
        metrics.update({f"train_{k}": v for k, v in last.items() if k not in ("step", "tokens")})
    if sparsity is None and t.tokens_seen:
        sparsity = torch.log10(t.fire_count.double().cpu() / max(1, t.tokens_seen) + 1e-10).float()
    metrics["train_tokens"] = t.tokens_seen
    metrics["train_steps"] = steps
    metrics["train_seconds"] = elapsed
    meta.update(metadata or {})
    folder = save_sae(
        sae,
        uri,
        metadata=meta,
        sparsity=sparsity,
        training_config=cfg,
        metrics={k: v for k, v in metrics.items() if k != "density_hist"},
        activation_manifest_hash=act_hash,
        storage_options=storage_options,
        training_curve=t.curve,
        density_hist=metrics.get("density_hist"),
        activation_scale=None,
        hook_point=t.hook,
        source=source.describe(),
    )
    manifest = storage.read_manifest(folder, storage_options)
    small = {k: v for k, v in metrics.items() if k != "density_hist"}
    return TrainResult(folder, manifest["content_hash"], small, steps, t.tokens_seen, resumed, cfg)


def train_sae(
    model: SparseAutoencoder,
    shard_iterator: Any,
    cfg: SAEConfig | None = None,
    device: str | torch.device | None = None,
    *,
    checkpoint_uri: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    on_progress: ProgressFn | None = None,
    on_log: LogFn | None = None,
    resume: bool = True,
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` in place on ``shard_iterator`` (the seed's call); returns a summary.

    ``shard_iterator``: an ``ActivationStore``, a dump URI or list of URIs, a ``[N, d]`` tensor,
    or an iterable of ``[n, d]`` tensors. The model fixes the architecture and widths; ``cfg``
    gives the schedule (``cfg.k``/``cfg.architecture`` must agree with the model). A model whose
    ``b_dec`` is all zeros (freshly built) gets the data-dependent initialisation. The trained
    model takes raw activations (the training scale is folded into its weights).
    """
    if not isinstance(model, SparseAutoencoder):
        raise TypeError(f"model: expected a SparseAutoencoder, got {type(model).__name__}")
    if model.is_merged:
        raise ValueError("model: a merged SAE cannot be trained (its latents are fixed aggregates)")
    cfg = cfg if cfg is not None else SAEConfig(k=model.d_sae, architecture=model.architecture)
    if cfg.k != model.d_sae:
        raise ValueError(f"cfg.k={cfg.k} but the model has k={model.d_sae} latents")
    if cfg.architecture != model.architecture:
        raise ValueError(
            f"cfg.architecture={cfg.architecture!r} but the model is {model.architecture!r}"
        )
    if model.architecture in ("topk", "batchtopk") and cfg.top_k != model.top_k:
        cfg = cfg.model_copy(update={"top_k": model.top_k})
    from integral_superposition.dump.store import ActivationStore

    store_like = isinstance(shard_iterator, ActivationStore | str) or (
        isinstance(shard_iterator, Sequence)
        and bool(shard_iterator)
        and all(isinstance(s, ActivationStore | str) for s in shard_iterator)
    )
    (cfg,) = _check_cfgs([cfg], store_like)
    source = _open_source(shard_iterator, [cfg], storage_options)
    if source.d_model != model.d_in:
        raise ValueError(
            f"model.d_model={model.d_in} does not match the activations' d_model={source.d_model}"
        )
    dev = _resolve_device(device, cfg)
    on_dev = model.W_enc.device == dev
    _check_training_memory(
        [cfg], model.d_in, dev, sum(p.numel() * 4 for p in model.parameters()) if on_dev else 0
    )
    source.check_finite()
    if checkpoint_uri is not None and not source.resumable:
        raise ValueError("checkpoint_uri: a one-shot iterator cannot be resumed")
    model.to(dev)
    hook = cfg.hook_point if cfg.hook_point and cfg.hook_point != "input" else source.hooks[0]
    t = _Trainee(cfg, model, hook, dev)
    ckpt = _Checkpoints(checkpoint_uri, storage_options) if checkpoint_uri else None
    fingerprint = _fingerprint(
        [cfg], source.describe(), {"total": source.total, "d_model": model.d_in}
    )
    init_b_dec = bool((model.b_dec == 0).all())
    t0 = time.perf_counter()
    steps, resumed = _run(
        source,
        [t],
        [cfg],
        ckpt=ckpt,
        fingerprint=fingerprint,
        resume=resume,
        init_b_dec=init_b_dec,
        on_progress=on_progress,
        on_log=on_log,
        progress=progress,
    )
    _finish(t)
    if isinstance(source, _StoreSource):
        model.metadata.update(_store_metadata(source.store, hook))
    if ckpt is not None:
        ckpt.remove()
    metrics = {k: v for k, v in (t.curve[-1] if t.curve else {}).items()}
    metrics["train_seconds"] = time.perf_counter() - t0
    return TrainResult(None, None, metrics, steps, t.tokens_seen, resumed, cfg)
