"""The SAE's training forward: ``SAEOutput``, its loss terms and the kernels behind them.

``train_forward(sae, x)`` is :meth:`SparseAutoencoder.forward`: the dense path of every
architecture and, in training, the sparse path of ``relu``/``topk``/``batchtopk``
(``forward_sparse``: only the active entries are decoded and back-propagated). The
straight-through functions of JumpReLU (``JumpReLUFunction``, ``RectangleStep``) and the
sparse encoder backward (``GatherEncode``) are ``torch.autograd.Function`` s.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from integral_superposition.sae.model import SparseAutoencoder

SPARSE_MAX_DENSITY = {"cpu": 0.12}
"""A ``relu`` training batch runs on the sparse path while at most this fraction of its
entries is active, per device type (``SPARSE_MAX_DENSITY_DEFAULT`` for the others). On the CPU the sparse step
(d_in 640, d_sae 4096, batch 4096) is 3.0x the dense one at 2% active, 1.7x at 8%, 1.24x at
12% and breaks even near 16%. Other devices keep a conservative 5% (not benchmarked)."""
SPARSE_MAX_DENSITY_DEFAULT = 0.05


class SAEOutput(NamedTuple):
    """What :meth:`SparseAutoencoder.forward` returns."""

    x_hat: torch.Tensor
    """Reconstruction ``[B, d_in]``."""
    latents: torch.Tensor
    """Latent activations ``[B, d_sae]``: dense, or (sparse training path) a detached sparse
    CSR tensor holding only the active entries."""
    top_indices: torch.Tensor | None
    """For ``topk``: indices of the active latents ``[B, top_k]``; else None."""
    top_values: torch.Tensor | None
    """For ``topk``: their values ``[B, top_k]``; else None."""
    fvu: torch.Tensor
    """Fraction of variance unexplained on this batch (about the batch mean), scalar."""
    mse: torch.Tensor
    """Mean over tokens of the squared reconstruction error summed over d_in, scalar."""
    sparsity_loss: torch.Tensor
    """Decoder-norm-weighted L1 (``relu``), L0 (``jumprelu``), else 0; scalar, not yet scaled."""
    aux_loss: torch.Tensor
    """AuxK loss (TopK family, when ``dead_mask`` is given), in the units of ``mse``; for
    ``jumprelu`` with ``jumprelu_pre_act`` on, the pre-activation loss
    ``mean_tokens sum_i relu(threshold_i - pre_i) * ||W_dec[i]||``; else 0. Scalar."""
    l0: torch.Tensor
    """Mean number of active latents per token, scalar."""


class RectangleStep(torch.autograd.Function):
    """Heaviside step of ``x - threshold`` with a rectangle pseudo-derivative for ``threshold``
    (and, with ``to_input``, the opposite one for ``x``)."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, threshold: torch.Tensor, bandwidth: float, to_input: bool = False
    ) -> torch.Tensor:
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth, ctx.to_input = bandwidth, to_input
        return (x > threshold).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        g = grad * (((x - threshold).abs() < bw / 2).to(grad.dtype) / bw)
        g_thr = -g.sum(dim=tuple(range(grad.dim() - 1)))
        return (g if ctx.to_input else None), g_thr, None, None


class JumpReLUFunction(torch.autograd.Function):
    """``x * (x > threshold)`` with the straight-through threshold gradient of Rajamanoharan et
    al.; with ``to_input`` the jump's pseudo-derivative also reaches ``x`` (Anthropic's variant)."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, threshold: torch.Tensor, bandwidth: float, to_input: bool = False
    ) -> torch.Tensor:
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth, ctx.to_input = bandwidth, to_input
        return x * (x > threshold).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        gate = (x > threshold).to(grad.dtype)
        jump = grad * ((x - threshold).abs() < bw / 2).to(grad.dtype) * (threshold / bw)
        g_thr = -jump.sum(dim=tuple(range(grad.dim() - 1)))
        g_x = grad * gate + jump if ctx.to_input else grad * gate
        return g_x, g_thr, None, None


class GatherEncode(torch.autograd.Function):
    """Pre-activations at chosen entries, with a backward that touches only those entries.

    ``vals[e] = (x[rows[e]] - b_dec) @ W_enc[:, cols[e]] + b_enc[cols[e]]`` for entries
    sorted by row. ``pre`` (``[B, d_sae]``, already computed without grad) supplies the
    forward values; the backward builds ``W_enc``'s gradient as one sparse ``[d_sae, B]`` by
    ``[B, d_in]`` product instead of two dense ``[B, d_sae]`` products. ``x`` gets no gradient.
    """

    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, rows, cols, pre):
        ctx.save_for_backward(x, b_dec, W_enc, rows, cols)
        return pre[rows, cols]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, b_dec, W_enc, rows, cols = ctx.saved_tensors
        d_sae = W_enc.shape[1]
        g = grad.to(W_enc.dtype)
        g_benc = torch.zeros(d_sae, dtype=W_enc.dtype, device=g.device).index_add_(0, cols, g)
        g_wenc = None
        if ctx.needs_input_grad[2]:
            order = torch.sort(cols).indices  # any order inside a latent's row is fine
            counts = torch.bincount(cols, minlength=d_sae)
            crow = torch.zeros(d_sae + 1, dtype=torch.int64, device=g.device)
            crow[1:] = counts.cumsum(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "CSR support is in beta"
                gt = torch.sparse_csr_tensor(
                    crow,
                    rows[order],
                    g[order],
                    (d_sae, x.shape[0]),
                    check_invariants=False,
                )
                g_wenc = (gt @ (x.to(W_enc.dtype) - b_dec)).T
        g_bdec = -(W_enc @ g_benc) if ctx.needs_input_grad[1] else None
        return None, g_bdec, g_wenc, g_benc, None, None, None


def train_forward(
    sae: SparseAutoencoder,
    x: torch.Tensor,
    dead_mask: torch.Tensor | None = None,
    sparse_decode: bool | None = None,
) -> SAEOutput:
    """Training forward of ``sae`` on ``x [B, d_in]`` (see :meth:`SparseAutoencoder.forward`)."""
    pre = sae.pre_activations(x)
    if (
        sparse_decode is not False
        and sae.training
        and sae.merge_index is None
        and sae.W_skip is None
        and sae.architecture in ("relu", "topk", "batchtopk")
    ):
        # ReLU codes start dense: check (on a few rows) that the sparse path pays off
        check = sae.architecture == "relu" and sparse_decode is None
        limit = SPARSE_MAX_DENSITY.get(pre.device.type, SPARSE_MAX_DENSITY_DEFAULT)
        if not check or float((pre[:512] > 0).sum()) <= limit * pre[:512].numel():
            return forward_sparse(sae, x, pre.detach(), dead_mask)
    top_i = top_v = None
    zero = pre.new_zeros(())
    sparsity = zero
    if sae.architecture == "relu":
        z = F.relu(pre)
    elif sae.architecture == "topk":
        top_i = ranking(sae, pre).topk(sae.top_k, dim=-1, sorted=False).indices
        top_v = F.relu(pre.gather(-1, top_i))
        z = torch.zeros_like(pre).scatter(-1, top_i, top_v)
    elif sae.architecture == "groupmax":
        top_v, top_i = sae._groupmax(pre)
        z = torch.zeros_like(pre).scatter(-1, top_i, top_v)
    elif sae.architecture == "batchtopk":
        acts = F.relu(pre)
        if sae.training:
            flat = acts.flatten()
            top_v, top_ix = batch_topk(sae, flat, acts.shape[0])
            z = torch.zeros_like(flat).scatter(0, top_ix, top_v).view_as(acts)
        else:
            z = pre * (pre > sae.threshold).to(pre.dtype)
    else:  # jumprelu
        to_input = sae.training and sae.jumprelu_ste_to_input
        z = JumpReLUFunction.apply(pre, sae.threshold, sae.bandwidth, to_input)
        if sae.jumprelu_sparsity == "tanh":
            scaled = z.abs() * (sae.jumprelu_tanh_scale * sae.W_dec.norm(dim=1).to(z.dtype))
            sparsity = torch.tanh(scaled).sum(-1).mean()
        else:
            step = RectangleStep.apply(pre, sae.threshold, sae.bandwidth, to_input)
            sparsity = step.sum(-1).mean()
    if sae.merge_index is not None:
        z, top_i, top_v = sae.merge_codes(z), None, None
    if sae.architecture == "relu":  # decoder-norm-weighted L1, as one [d_sae] product
        sparsity = z.sum(0) @ sae.W_dec.norm(dim=1).to(z.dtype) / z.shape[0]
    if top_i is not None and sparse_decode is not False:
        x_hat = sae.decode_sparse(top_v, top_i, x)
    else:
        x_hat = sae.decode(z, x)
    x = x.to(x_hat.dtype)
    err = x_hat - x
    mse = err.pow(2).sum(-1).mean()
    var = (x - x.mean(0)).pow(2).sum(-1).mean()
    fvu = mse / var.clamp_min(1e-12)
    aux = zero
    if (
        dead_mask is not None
        and sae.merge_index is None
        and sae.architecture in ("topk", "batchtopk")
        and bool(dead_mask.any())
    ):
        aux = auxk_loss(sae, pre, dead_mask, err)
    elif sae.architecture == "jumprelu" and sae.jumprelu_pre_act and sae.training:
        below = F.relu(sae.threshold - pre)
        aux = (below.sum(0) @ sae.W_dec.norm(dim=1).to(below.dtype)) / below.shape[0]
    # codes are >= 0 here (ReLU-ed or above a non-negative threshold): count, no bool copy
    l0 = torch.count_nonzero(z).float() / max(1, z.numel() // z.shape[-1])
    return SAEOutput(x_hat, z, top_i, top_v, fvu, mse, sparsity, aux, l0)


def ranking(sae: SparseAutoencoder, pre: torch.Tensor) -> torch.Tensor:
    """The scores TopK ranks ``pre [B, d_sae]`` by: ``pre`` itself, or in free-norm decoder
    training (``rank_by_decoder_norm``) ``pre * ||W_dec[i]||`` (no gradient)."""
    if not sae.rank_by_decoder_norm:
        return pre
    return pre.detach() * sae.W_dec.detach().norm(dim=1).to(pre.dtype)


def batch_topk(
    sae: SparseAutoencoder, flat: torch.Tensor, rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchTopK's training selection: ``(values, indices)`` of the ``top_k * rows`` largest
    of ``flat [rows * d_sae]`` (or of the whole batch across ranks, ``batch_topk_select``)."""
    if sae.batch_topk_select is not None:
        return sae.batch_topk_select(flat, rows, sae.top_k)
    top = flat.topk(min(flat.numel(), sae.top_k * rows), sorted=False)
    return top.values, top.indices


def forward_sparse(
    sae: SparseAutoencoder, x: torch.Tensor, pre: torch.Tensor, dead_mask: torch.Tensor | None
) -> SAEOutput:
    """The training forward over the active entries only (``pre``: detached ``[B, d_sae]``).

    The dense encoder product is the only ``[B, d_sae]``-sized matmul; decoding is an
    ``embedding_bag`` over the active decoder rows and the encoder's backward is one sparse
    product (:class:`GatherEncode`).
    """
    B, dev = pre.shape[0], pre.device
    if sae.architecture == "topk":
        top = ranking(sae, pre).topk(sae.top_k, dim=-1, sorted=False)
        cols = top.indices.reshape(-1)
        rows = torch.arange(B, device=dev).repeat_interleave(sae.top_k)
    elif sae.architecture == "batchtopk":
        flat = pre.reshape(-1)
        top_v, top_ix = batch_topk(sae, flat, B)
        sel = top_ix[top_v > 0].sort().values  # row-major order for the bags
        rows, cols = sel // sae.d_sae, sel % sae.d_sae
    else:
        rows, cols = (pre > 0).nonzero(as_tuple=True)
    vals = F.relu(GatherEncode.apply(x, sae.b_dec, sae.W_enc, sae.b_enc, rows, cols, pre))
    counts = torch.bincount(rows, minlength=B)
    crow = torch.zeros(B + 1, dtype=torch.int64, device=dev)
    crow[1:] = counts.cumsum(0)
    if sae.architecture == "topk":
        top_i, top_v = cols.view(B, sae.top_k), vals.view(B, sae.top_k)
        dec = F.embedding_bag(
            top_i, sae.W_dec, per_sample_weights=top_v.to(sae.W_dec.dtype), mode="sum"
        )
    else:
        top_i = top_v = None
        dec = F.embedding_bag(
            cols,
            sae.W_dec,
            crow[:-1],
            per_sample_weights=vals.to(sae.W_dec.dtype),
            mode="sum",
        )
    x_hat = dec + sae.b_dec
    x = x.to(x_hat.dtype)
    err = x_hat - x
    mse = err.pow(2).sum(-1).mean()
    var = (x - x.mean(0)).pow(2).sum(-1).mean()
    fvu = mse / var.clamp_min(1e-12)
    zero = mse.new_zeros(())
    sparsity = zero
    if sae.architecture == "relu":
        sparsity = (vals * sae.W_dec.norm(dim=1)[cols].to(vals.dtype)).sum() / B
    aux = zero
    if dead_mask is not None and sae.architecture != "relu" and bool(dead_mask.any()):
        k_aux = min(sae.aux_k, int(dead_mask.sum()))
        masked = torch.where(dead_mask, ranking(sae, pre), torch.full_like(pre, float("-inf")))
        atop = masked.topk(k_aux, dim=-1, sorted=False)
        arows = torch.arange(B, device=dev).repeat_interleave(k_aux)
        avals = F.relu(
            GatherEncode.apply(
                x, sae.b_dec, sae.W_enc, sae.b_enc, arows, atop.indices.reshape(-1), pre
            )
        )
        recon = F.embedding_bag(
            atop.indices,
            sae.W_dec,
            per_sample_weights=avals.view(B, k_aux).to(sae.W_dec.dtype),
            mode="sum",
        )
        aux = (recon + err.detach()).pow(2).sum(-1).mean()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "CSR support is in beta"
        latents = torch.sparse_csr_tensor(
            crow, cols, vals.detach(), (B, sae.d_sae), check_invariants=False
        )
    l0 = (vals > 0).sum().float() / B
    return SAEOutput(x_hat, latents, top_i, top_v, fvu, mse, sparsity, aux, l0)


def auxk_loss(
    sae: SparseAutoencoder,
    pre: torch.Tensor,
    dead_mask: torch.Tensor,
    err: torch.Tensor,
    aux_k: int | None = None,
) -> torch.Tensor:
    """Reconstruct the residual ``x - x_hat`` from the top dead latents (Gao et al.).

    Returns the squared error summed over ``d_in`` and averaged over tokens (``mse`` units).
    """
    n_dead = int(dead_mask.sum())
    k_aux = min(aux_k or sae.aux_k, n_dead)
    masked = torch.where(dead_mask, ranking(sae, pre), torch.full_like(pre, float("-inf")))
    top = masked.topk(k_aux, dim=-1, sorted=False)
    vals = F.relu(pre.gather(-1, top.indices))
    recon = F.embedding_bag(
        top.indices, sae.W_dec, per_sample_weights=vals.to(sae.W_dec.dtype), mode="sum"
    )
    target = -err.detach()
    return (recon - target).pow(2).sum(-1).mean()
