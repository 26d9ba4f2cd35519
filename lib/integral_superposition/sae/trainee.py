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

from integral_superposition import distributed
from integral_superposition.config import SAEConfig, grad_clip_norm
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


def _all_reduce_grads(sae: SparseAutoencoder, n: int) -> int:
    """Turn every rank's gradients of its mean loss over ``n`` kept tokens into the gradient of
    the mean loss over all ranks' tokens (``sum_r n_r g_r / N``), identical on every rank.
    Returns ``N``. A parameter no rank computed a gradient for keeps ``grad = None`` (Adam
    then leaves it alone, as in a single process)."""
    params = list(sae.parameters())
    dev = params[0].device
    parts = []
    for p in params:
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        parts.append(g.reshape(-1) * float(n))
    has = [1.0 if p.grad is not None else 0.0 for p in params]
    flat = torch.cat([*parts, torch.tensor([*has, float(n)], dtype=parts[0].dtype, device=dev)])
    distributed.all_reduce_(flat)
    total = round(float(flat[-1]))
    if total == 0:
        return 0
    flags = flat[flat.numel() - 1 - len(params) : -1]
    offset = 0
    for p, flag in zip(params, flags.tolist(), strict=True):
        k = p.numel()
        p.grad = (flat[offset : offset + k].view_as(p) / total).to(p.dtype) if flag > 0 else None
        offset += k
    return total


_PROBES = 15  # thresholds tried per round of the distributed search (4 bits per round)


@torch.no_grad()
def global_batch_topk(
    flat: torch.Tensor, rows: int, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchTopK over a batch split across ranks: ``(values, indices)`` of this rank's entries
    of ``flat [rows * d_sae]`` among the ``top_k * N`` largest of all ranks (``N``: all rows).

    Each rank takes its local top ``top_k * N`` candidates (the global winners can all sit on
    one rank), then the ranks search the float32 bit pattern of the ``top_k * N``-th largest
    non-negative candidate together: 15 thresholds per all-reduce of counts, 8 rounds for 31
    bits. Only non-negative scores matter (BatchTopK keeps positive activations). With ties at
    the threshold every tied entry is kept, where a single process keeps an arbitrary subset.
    """
    dev = flat.device
    sizes = torch.tensor([rows, flat.numel()], dtype=torch.int64, device=dev)
    distributed.all_reduce_(sizes)
    n_rows, n_all = int(sizes[0]), int(sizes[1])
    want = top_k * n_rows
    top = flat.topk(min(flat.numel(), want), sorted=False)
    if n_all <= want:  # every entry is kept
        return top.values, top.indices
    keys = top.values.detach().float().clamp_min(0.0).view(torch.int32)
    lo, hi = 0, 0x7F800000  # 0.0 and +inf: non-negative float32 bits order like the floats
    while lo < hi:
        step = max(1, (hi - lo) // (_PROBES + 1))
        probes = torch.arange(lo + step, hi + 1, step, dtype=torch.int64, device=dev)[:_PROBES]
        counts = (keys.to(torch.int64)[None, :] >= probes[:, None]).sum(1)
        distributed.all_reduce_(counts)
        ok = (counts >= want).nonzero()
        if ok.numel() == 0:
            hi = int(probes[0]) - 1
        else:
            i = int(ok[-1])
            lo = int(probes[i])
            if i + 1 < probes.numel():
                hi = int(probes[i + 1]) - 1
    keep = keys >= lo
    return top.values[keep], top.indices[keep]


def _reduce_stats(
    x: torch.Tensor,
    fires: torch.Tensor,
    pos: torch.Tensor | None,
    terms: torch.Tensor,
    n_in: int,
    want_min: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, int, int]:
    """One step's statistics over all ranks: firings per latent ``[d_sae]``, the smallest kept
    activation (BatchTopK), the log terms as a single process would compute them on the whole
    batch (means weighted by kept tokens; FVU from the global variance), kept and input
    token counts."""
    n = x.shape[0]
    d_sae = fires.shape[0]
    xd = x.double()
    head = torch.cat(
        [
            terms * n,  # loss, mse, fvu (replaced below), l0, aux, sparsity
            torch.tensor([float(n), float(n_in)], dtype=torch.float64, device=x.device),
            xd.pow(2).sum().reshape(1),
            xd.sum(0),
            fires.double(),
        ]
    )
    distributed.all_reduce_(head)
    total_n = float(head[6])
    out = head[:6] / max(total_n, 1.0)
    sum_sq, sum_x = float(head[8]), head[9 : 9 + x.shape[1]]
    var = (sum_sq - float(sum_x.pow(2).sum()) / max(total_n, 1.0)) / max(total_n, 1.0)
    out[2] = out[1] / max(var, 1e-12)  # fvu = mse / var of the whole batch
    fires_all = head[9 + x.shape[1] : 9 + x.shape[1] + d_sae].round().to(torch.int64)
    pos_min = None
    if want_min:  # every rank joins, whether or not its part kept a value
        m = (
            pos.min().float().reshape(1)
            if pos is not None and pos.numel()
            else torch.full((1,), float("inf"), device=x.device)
        )
        distributed.all_reduce_(m, "min")
        pos_min = m[0] if torch.isfinite(m[0]) else None
    return fires_all, pos_min, out, int(total_n), round(float(head[7]))


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
    grad_clip: float = 0.0  # the resolved gradient-norm clip (``config.grad_clip_norm``)
    sched: LRScheduler | None = None  # set by ``start`` once the run's length is known
    data_parallel: bool = False
    """Each rank steps on its part of the batch; gradients and statistics are summed over ranks."""

    # accumulated log terms: loss, mse, fvu, l0, aux, sparsity, kept tokens
    _N_ACC = 7

    def __post_init__(self) -> None:
        d_sae = self.sae.d_sae
        self.sae.aux_k = self.cfg.aux_k
        self.grad_clip = grad_clip_norm(self.cfg, self.sae.d_in)
        self.sae.rank_by_decoder_norm = self.cfg.decoder_norm == "free"
        self.sae.jumprelu_sparsity = self.cfg.jumprelu_sparsity
        self.sae.jumprelu_tanh_scale = self.cfg.jumprelu_tanh_scale
        self.sae.jumprelu_ste_to_input = self.cfg.jumprelu_ste_to_input
        self.sae.jumprelu_pre_act = self.cfg.jumprelu_pre_act_coef > 0
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=self.cfg.lr, betas=(0.9, 0.999))
        self.since_fired = torch.zeros(d_sae, dtype=torch.int64, device=self.device)
        self.fire_count = torch.zeros(d_sae, dtype=torch.int64, device=self.device)
        self.acc = torch.zeros(self._N_ACC, dtype=torch.float64, device=self.device)
        self.autocast = autocast_enabled(self.cfg, self.device)
        if self.data_parallel and self.sae.architecture == "batchtopk":
            self.sae.batch_topk_select = global_batch_topk

    def start(self, total: int | None, step: int) -> None:
        """Attach the LR schedule of a ``total``-step run whose next step is ``step``."""
        self.sched = lr_scheduler(self.opt, self.cfg, total, step)

    @property
    def uses_auxk(self) -> bool:
        return self.sae.architecture in ("topk", "batchtopk") and self.cfg.auxk_coef > 0

    def dead_mask(self) -> torch.Tensor:
        return self.since_fired >= self.dead_tokens

    def step(self, x_raw: torch.Tensor, step: int, total: int | None) -> None:
        """One optimiser step on raw activations ``x_raw [B, d]`` (with ``data_parallel``: this
        rank's part of the global batch; the step then equals one on the whole batch)."""
        cfg, sae = self.cfg, self.sae
        x = x_raw.to(self.device, torch.float32, non_blocking=True)
        n_in = x.shape[0]
        if self.max_norm is not None:
            keep = x.norm(dim=1) <= self.max_norm
            if not bool(keep.all()):
                x = x[keep]
        if x.shape[0] == 0 and not self.data_parallel:
            self.sched.step()  # type: ignore[union-attr]  # the schedule follows the step index
            return
        x = x * self.scale
        coef = sparsity_coef_at(cfg, step, total)
        dead = self.dead_mask() if self.uses_auxk else None
        self.opt.zero_grad(set_to_none=True)
        out = loss = None
        if x.shape[0]:  # a data-parallel rank whose part was all outliers only joins the sums
            with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
                out = sae(x, dead_mask=dead, sparse_decode=cfg.sparse_decode)
            d = sae.d_in
            loss = out.mse / d + coef * out.sparsity_loss
            if dead is not None:
                loss = loss + cfg.auxk_coef * out.aux_loss / d
            elif sae.architecture == "jumprelu" and cfg.jumprelu_pre_act_coef > 0:
                loss = loss + cfg.jumprelu_pre_act_coef * out.aux_loss
            loss.backward()
        elif sae.batch_topk_select is not None:  # join the batch-wide selection of the others
            sae.batch_topk_select(x.new_empty(0), 0, sae.top_k)
        if self.data_parallel and _all_reduce_grads(sae, x.shape[0]) == 0:
            self.sched.step()  # type: ignore[union-attr]  # no rank kept a token
            return
        if cfg.decoder_norm == "unit":
            sae.remove_gradient_parallel_to_decoder_directions()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), self.grad_clip)
        self.opt.step()
        self.sched.step()  # type: ignore[union-attr]
        with torch.no_grad():
            if cfg.decoder_norm == "unit":
                sae.set_decoder_norm_to_unit_norm()
            if sae.architecture == "jumprelu":
                sae.threshold.clamp_(min=0.0)
            if out is not None:
                fires, pos = _active(out, sae.d_sae, values=sae.architecture == "batchtopk")
                terms = [
                    loss.detach().double(),
                    out.mse.detach().double(),
                    out.fvu.detach().double(),
                    out.l0.detach().double(),
                    out.aux_loss.detach().double(),
                    out.sparsity_loss.detach().double(),
                ]
                terms = torch.stack(terms)
            else:
                fires = torch.zeros(sae.d_sae, dtype=torch.int64, device=self.device)
                pos = None
                terms = torch.zeros(6, dtype=torch.float64, device=self.device)
            n_kept = x.shape[0]
            if self.data_parallel:
                fires, pos_min, terms, n_kept, n_in = _reduce_stats(
                    x, fires, pos, terms, n_in, sae.architecture == "batchtopk"
                )
            else:
                pos_min = pos.min() if pos is not None and pos.numel() else None
            if pos_min is not None:
                # inference threshold: EMA of the smallest activation the batch kept
                thr = sae.threshold
                m = pos_min.to(thr.dtype)
                thr.copy_(torch.where(thr > 0, 0.99 * thr + 0.01 * m, m))
            self.since_fired += n_kept
            self.since_fired[fires > 0] = 0
            self.fire_count += fires
            self.tokens_seen += n_in
            n_t = torch.tensor([float(n_kept)], dtype=torch.float64, device=self.device)
            self.acc += torch.cat([terms, n_t])
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
    """Data-dependent setup: outlier threshold, activation scale, ``b_dec``, unit decoder rows
    (with ``decoder_norm: free``, rows and encoder columns scaled to ``decoder_init_norm``)."""
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
        if cfg.decoder_norm == "free":
            sae.W_dec.mul_(cfg.decoder_init_norm)
            sae.W_enc.mul_(cfg.decoder_init_norm)


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
    """Fold the training scale (and free decoder norms) into the weights; the SAE then takes
    raw activations and has unit decoder rows."""
    sae = t.sae
    sae.eval()
    sae.batch_topk_select = None
    with torch.no_grad():
        if sae.rank_by_decoder_norm:
            sae.fold_ranking_norms()
        sae.fold_activation_scale(t.scale)
    t.scale = 1.0
    return sae
