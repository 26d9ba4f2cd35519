"""The sparse autoencoder: one module, four architectures.

Shapes: ``x`` is ``[B, d_in]``; latents are ``[B, d_sae]``; ``W_enc`` is ``[d_in, d_sae]``,
``W_dec`` is ``[d_sae, d_in]`` (one row per latent), as in SAELens.

Encoding (``x_in = x - b_dec``, ``pre = x_in @ W_enc + b_enc``):

- ``relu``: ``relu(pre)``; trained with an L1 penalty weighted by decoder row norms.
- ``topk``: the ``top_k`` largest ``pre`` per token, ReLU-ed; all others zero.
- ``batchtopk``: in training the ``top_k * B`` largest ``relu(pre)`` over the whole batch;
  at inference ``pre * (pre > threshold)`` with a per-latent threshold learned from training
  batches (saved as SAELens ``jumprelu``).
- ``jumprelu``: ``pre * (pre > threshold)`` with a learned threshold (straight-through
  estimator with a rectangle kernel of width ``bandwidth``).

Decoding: ``z @ W_dec + b_dec``. TopK codes can be decoded by gathering only the active
rows (``decode_sparse``), which avoids the dense ``[B, d_sae] @ [d_sae, d_in]`` product.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu")


class SAEOutput(NamedTuple):
    """What :meth:`SparseAutoencoder.forward` returns."""

    x_hat: torch.Tensor
    """Reconstruction ``[B, d_in]``."""
    latents: torch.Tensor
    """Dense latent activations ``[B, d_sae]``."""
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
    """AuxK loss (TopK family, when ``dead_mask`` is given), normalised like the FVU; scalar."""
    l0: torch.Tensor
    """Mean number of active latents per token, scalar."""


class _Rectangle(torch.autograd.Function):
    """Heaviside step of ``x - threshold`` with a rectangle pseudo-derivative for ``threshold``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return (x > threshold).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        kernel = ((x - threshold).abs() < bw / 2).to(grad.dtype) / bw
        g_thr = -(grad * kernel).sum(dim=tuple(range(grad.dim() - 1)))
        return None, g_thr, None


class _JumpReLU(torch.autograd.Function):
    """``x * (x > threshold)`` with the straight-through threshold gradient of Rajamanoharan et al."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return x * (x > threshold).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        gate = (x > threshold).to(grad.dtype)
        window = ((x - threshold).abs() < bw / 2).to(grad.dtype)
        g_thr = -(threshold / bw) * (grad * window).sum(dim=tuple(range(grad.dim() - 1)))
        return grad * gate, g_thr, None


class _LinearView:
    """``nn.Linear``-style view of a weight: ``.weight`` is ``[out, in]`` (shares storage)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight = weight
        self.bias = bias


class SparseAutoencoder(nn.Module):
    """A sparse autoencoder over ``d_model``-dimensional activations with ``k`` latents.

    ``SparseAutoencoder(d_model=640, k=2048)`` is the seed's ReLU SAE. ``architecture``
    picks ``relu``, ``topk``, ``batchtopk`` or ``jumprelu``; ``top_k`` is the number of active
    latents for the TopK family. ``model.dec.weight`` (``[d_model, k]``) and
    ``model.enc.weight`` (``[k, d_model]``) give ``nn.Linear``-style views as in the seed.
    """

    def __init__(
        self,
        d_model: int,
        k: int,
        architecture: str = "relu",
        top_k: int = 32,
        *,
        jumprelu_bandwidth: float = 0.001,
        jumprelu_init_threshold: float = 0.001,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        seed: int | None = 0,
    ):
        super().__init__()
        if not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model={d_model!r}: expected a positive int")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k={k!r}: expected a positive int (the number of latents)")
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture={architecture!r}: expected one of {ARCHITECTURES}")
        if architecture in ("topk", "batchtopk") and not 0 < top_k <= k:
            raise ValueError(f"top_k={top_k}: expected 0 < top_k <= k={k}")
        self.d_in, self.d_sae = d_model, k
        self.architecture = architecture
        self.top_k = int(top_k)
        self.bandwidth = float(jumprelu_bandwidth)
        self.metadata: dict[str, Any] = {}
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        w = torch.randn(k, d_model, generator=gen, dtype=torch.float32)
        w = w / w.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w.to(device=device, dtype=dtype))
        self.W_enc = nn.Parameter(w.T.clone().to(device=device, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(k, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_model, device=device, dtype=dtype))
        if architecture == "jumprelu":
            self.threshold = nn.Parameter(
                torch.full((k,), float(jumprelu_init_threshold), device=device, dtype=dtype)
            )
        else:
            self.register_buffer("threshold", torch.zeros(k, device=device, dtype=dtype))

    # -- seed compatibility -----------------------------------------------------------------
    @property
    def k(self) -> int:
        """Number of latents (the seed's name for d_sae)."""
        return self.d_sae

    @property
    def d_model(self) -> int:
        return self.d_in

    @property
    def dec(self) -> _LinearView:
        """``nn.Linear(k, d_model)``-style view: ``dec.weight`` is ``[d_model, k]``."""
        return _LinearView(self.W_dec.T, self.b_dec)

    @property
    def enc(self) -> _LinearView:
        """``nn.Linear(d_model, k)``-style view: ``enc.weight`` is ``[k, d_model]``."""
        return _LinearView(self.W_enc.T, self.b_enc)

    def extra_repr(self) -> str:
        extra = f", top_k={self.top_k}" if self.architecture in ("topk", "batchtopk") else ""
        return f"d_in={self.d_in}, d_sae={self.d_sae}, architecture={self.architecture!r}{extra}"

    # -- encode / decode --------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.d_in:
            raise ValueError(
                f"x has last dimension {x.shape[-1]}, but this SAE has d_in={self.d_in}"
            )

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - b_dec) @ W_enc + b_enc``: ``[..., d_in] -> [..., d_sae]``."""
        self._check_input(x)
        return (x.to(self.W_enc.dtype) - self.b_dec) @ self.W_enc + self.b_enc

    def encode_topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """TopK code: ``(values [..., top_k], indices [..., top_k])`` (values ReLU-ed)."""
        top = self.pre_activations(x).topk(self.top_k, dim=-1, sorted=False)
        return F.relu(top.values), top.indices

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Inference-time latents ``[..., d_sae]`` (BatchTopK uses its learned threshold)."""
        pre = self.pre_activations(x)
        if self.architecture == "relu":
            return F.relu(pre)
        if self.architecture == "topk":
            top = pre.topk(self.top_k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter_(-1, top.indices, F.relu(top.values))
        return pre * (pre > self.threshold).to(pre.dtype)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``z @ W_dec + b_dec``: ``[..., d_sae] -> [..., d_in]``."""
        return z.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def decode_sparse(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Decode a TopK code by gathering the active rows: ``[B, k], [B, k] -> [B, d_in]``."""
        flat_v = values.reshape(-1, values.shape[-1])
        flat_i = indices.reshape(-1, indices.shape[-1])
        out = F.embedding_bag(
            flat_i, self.W_dec, per_sample_weights=flat_v.to(self.W_dec.dtype), mode="sum"
        )
        return (out + self.b_dec).reshape(*values.shape[:-1], self.d_in)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """``decode(encode(x))`` ``[..., d_in]``."""
        if self.architecture == "topk":
            v, i = self.encode_topk(x)
            return self.decode_sparse(v, i)
        return self.decode(self.encode(x))

    # -- training forward -------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        dead_mask: torch.Tensor | None = None,
        sparse_decode: bool | None = None,
    ) -> SAEOutput:
        """Training forward on ``x [B, d_in]``: reconstruction, latents and unscaled loss terms.

        ``dead_mask`` (``bool[d_sae]``) turns on the AuxK loss for the TopK family.
        ``sparse_decode`` gathers active rows for TopK (default: when d_sae >= 4 * d_in).
        """
        pre = self.pre_activations(x)
        top_i = top_v = None
        zero = pre.new_zeros(())
        sparsity = zero
        if self.architecture == "relu":
            z = F.relu(pre)
            sparsity = (z * self.W_dec.norm(dim=1)).sum(-1).mean()
        elif self.architecture == "topk":
            top = pre.topk(self.top_k, dim=-1, sorted=False)
            top_i, top_v = top.indices, F.relu(top.values)
            z = torch.zeros_like(pre).scatter(-1, top_i, top_v)
        elif self.architecture == "batchtopk":
            acts = F.relu(pre)
            if self.training:
                flat = acts.flatten()
                n = min(flat.numel(), self.top_k * acts.shape[0])
                top = flat.topk(n, sorted=False)
                z = torch.zeros_like(flat).scatter(0, top.indices, top.values).view_as(acts)
            else:
                z = pre * (pre > self.threshold).to(pre.dtype)
        else:  # jumprelu
            z = _JumpReLU.apply(pre, self.threshold, self.bandwidth)
            sparsity = _Rectangle.apply(pre, self.threshold, self.bandwidth).sum(-1).mean()
        use_sparse = sparse_decode if sparse_decode is not None else self.d_sae >= 4 * self.d_in
        if top_i is not None and use_sparse:
            x_hat = self.decode_sparse(top_v, top_i)
        else:
            x_hat = self.decode(z)
        x = x.to(x_hat.dtype)
        err = x_hat - x
        mse = err.pow(2).sum(-1).mean()
        var = (x - x.mean(0)).pow(2).sum(-1).mean()
        fvu = mse / var.clamp_min(1e-12)
        aux = zero
        if (
            dead_mask is not None
            and self.architecture in ("topk", "batchtopk")
            and bool(dead_mask.any())
        ):
            aux = self._auxk_loss(pre, dead_mask, err, var)
        l0 = (z > 0).sum(-1).float().mean()
        return SAEOutput(x_hat, z, top_i, top_v, fvu, mse, sparsity, aux, l0)

    def _auxk_loss(
        self,
        pre: torch.Tensor,
        dead_mask: torch.Tensor,
        err: torch.Tensor,
        var: torch.Tensor,
        aux_k: int | None = None,
    ) -> torch.Tensor:
        """Reconstruct the residual ``x - x_hat`` from the top dead latents (Gao et al.)."""
        n_dead = int(dead_mask.sum())
        k_aux = min(aux_k or getattr(self, "aux_k", 512), n_dead)
        masked = torch.where(dead_mask, pre, torch.full_like(pre, float("-inf")))
        top = masked.topk(k_aux, dim=-1, sorted=False)
        vals = F.relu(top.values)
        recon = F.embedding_bag(top.indices, self.W_dec, per_sample_weights=vals, mode="sum")
        target = -err.detach()
        return (recon - target).pow(2).sum(-1).mean() / var.clamp_min(1e-12)

    # -- constraints ------------------------------------------------------------------------
    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        """Renormalise every decoder row to unit norm."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project out of ``W_dec.grad`` the component parallel to each (unit) decoder row."""
        if self.W_dec.grad is None:
            return
        w = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
        parallel = (self.W_dec.grad * w).sum(-1, keepdim=True)
        self.W_dec.grad.sub_(parallel * w)

    @torch.no_grad()
    def fold_activation_scale(self, scale: float) -> None:
        """Make an SAE trained on ``x * scale`` take raw ``x``: ``W_enc *= s``, ``W_dec, b_dec /= s``."""
        self.W_enc.mul_(scale)
        self.W_dec.div_(scale)
        self.b_dec.div_(scale)

    def config_dict(self) -> dict[str, Any]:
        """Constructor arguments that rebuild this SAE's shape."""
        return {
            "d_model": self.d_in,
            "k": self.d_sae,
            "architecture": self.architecture,
            "top_k": self.top_k,
            "jumprelu_bandwidth": self.bandwidth,
        }
