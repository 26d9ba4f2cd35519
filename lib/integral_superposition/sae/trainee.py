"""One SAE in training: its optimiser, schedule, dead-latent counters and training curve.

:class:`Trainee` takes one optimiser step at a time (:meth:`Trainee.step`), averages its log
terms into curve entries (:meth:`Trainee.flush_log`) and saves and restores its whole state
for checkpoints. :func:`init_trainee` is the data-dependent initialisation (outlier threshold,
activation scale, ``b_dec`` at the geometric median), :func:`calibrate_threshold` BatchTopK's
inference threshold after training, and :func:`finish` folds the training scale back into the
weights so that the SAE takes raw activations.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LRScheduler

from integral_superposition.config import SAEConfig
from integral_superposition.sae.model import SparseAutoencoder
from integral_superposition.sae.schedule import lr_at, lr_scheduler, sparsity_coef_at


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
class Trainee:
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
    sched: LRScheduler | None = None  # set by ``start`` once the run's length is known

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

    def start(self, total: int | None, step: int) -> None:
        """Attach the LR schedule of a ``total``-step run whose next step is ``step``."""
        self.sched = lr_scheduler(self.opt, self.cfg, total, step)

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
            self.sched.step()  # type: ignore[union-attr]  # the schedule follows the step index
            return
        x = x * self.scale
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
        self.sched.step()  # type: ignore[union-attr]
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


def init_trainee(t: Trainee, sample: torch.Tensor, init_b_dec: bool) -> None:
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


@torch.no_grad()
def calibrate_threshold(t: Trainee, x_raw: torch.Tensor) -> None:
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


def finish(t: Trainee) -> SparseAutoencoder:
    """Fold the training scale into the weights; the SAE then takes raw activations."""
    sae = t.sae
    sae.eval()
    with torch.no_grad():
        sae.fold_activation_scale(t.scale)
    t.scale = 1.0
    return sae
