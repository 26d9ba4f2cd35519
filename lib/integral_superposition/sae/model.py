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
  estimator with a rectangle kernel of width ``bandwidth``); trained with the L0 penalty of
  Rajamanoharan et al. (the gradient reaches only the threshold) or, optionally, Anthropic's
  tanh penalty with the jump's gradient also reaching the encoder.

- ``groupmax`` (EleutherAI sparsify's): the latents form ``top_k`` contiguous groups of
  ``d_sae / top_k``; each token keeps the largest ReLU-ed pre-activation of each group.
  Loaded from sparsify folders; not trained here.

Decoding: ``z @ W_dec + b_dec``, plus ``x @ W_skip.T`` for an SAE with a linear skip
connection (``skip_connection=True``, sparsify's option; ``W_skip`` is ``[d_in, d_in]``). TopK codes can be decoded by gathering only the active
rows (``decode_sparse``), which avoids the dense ``[B, d_sae] @ [d_sae, d_in]`` product.

Merged SAEs (built by ``integral_superposition.merge``): an optional fixed ``merge_index``
(``long[d_pre]``, values in ``[0, d_sae)``) aggregates the ``d_pre`` codes of the original
encoder into ``d_sae`` merged latents, by ``merge_mode`` ``"sum"`` or ``"max"``. Then
``W_enc`` is ``[d_in, d_pre]``, ``b_enc`` and ``threshold`` are ``[d_pre]``, ``W_dec`` is
``[d_sae, d_in]``, and ``encode(x)`` is exactly the aggregation of the original codes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from integral_superposition.config import SAEArchitectureConfig, check_top_k

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu")
"""The architectures the trainer trains."""
LOADED_ARCHITECTURES = ("groupmax",)
"""Architectures ``SparseAutoencoder`` computes but the trainer does not train."""
SPARSE_MAX_DENSITY = {"cpu": 0.12}
"""A ``relu`` training batch runs on the sparse path while at most this fraction of its
entries is active, per device type (``SPARSE_MAX_DENSITY_DEFAULT`` for the others). On the CPU the sparse step
(d_in 640, d_sae 4096, batch 4096) is 3.0x the dense one at 2% active, 1.7x at 8%, 1.24x at
12% and breaks even near 16%. Other devices keep a conservative 5% (not benchmarked)."""
SPARSE_MAX_DENSITY_DEFAULT = 0.05
MERGE_MODES = ("sum", "max")


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


class _Rectangle(torch.autograd.Function):
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


class _JumpReLU(torch.autograd.Function):
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


class _GatherEncode(torch.autograd.Function):
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


class _LinearView:
    """``nn.Linear``-style view of a weight: ``.weight`` is ``[out, in]`` (shares storage)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight = weight
        self.bias = bias


def sae_parameter_count(d_model: int, k: int, d_pre: int | None = None) -> int:
    """Parameters of an SAE: ``W_enc``, ``W_dec``, ``b_enc``, ``b_dec`` and ``threshold``."""
    d_pre = k if d_pre is None else d_pre
    return (d_pre + k) * d_model + 2 * d_pre + d_model


def check_sae_memory(
    d_model: int,
    d_pre: int,
    k: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> None:
    """``MemoryError`` naming ``d_model`` and ``k`` before an SAE that cannot fit is built:
    its weights on ``device``, plus the float32 initialisation ``[d_pre, d_model]`` (twice)
    on the host."""
    from integral_superposition.compute import check_memory

    dev = torch.device(device) if device is not None else torch.device("cpu")
    weights = sae_parameter_count(d_model, k, d_pre) * torch.empty((), dtype=dtype).element_size()
    host = 2 * d_pre * d_model * 4 + (weights if dev.type == "cpu" else 0)
    what = f"SparseAutoencoder(d_model={d_model}, k={k})"
    check_memory(host, "cpu", what)
    if dev.type != "cpu":
        check_memory(weights, dev, what)


class SparseAutoencoder(nn.Module):
    """A sparse autoencoder over ``d_model``-dimensional activations with ``k`` latents.

    ``SparseAutoencoder(d_model=640, k=2048)`` is the seed's ReLU SAE. ``architecture``
    picks ``relu``, ``topk``, ``batchtopk`` or ``jumprelu``; ``top_k`` is the number of active
    latents for the TopK family. ``model.dec.weight`` (``[d_model, k]``) and
    ``model.enc.weight`` (``[k, d_model]``) give ``nn.Linear``-style views as in the seed.
    ``merge_index`` (``long[d_pre]``) and ``merge_mode`` make a merged SAE (module docstring).
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
        merge_index: torch.Tensor | None = None,
        merge_mode: str = "sum",
        skip_connection: bool = False,
    ):
        super().__init__()
        if not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model={d_model!r}: expected a positive int")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k={k!r}: expected a positive int (the number of latents)")
        if architecture not in ARCHITECTURES + LOADED_ARCHITECTURES:
            raise ValueError(
                f"architecture={architecture!r}: expected one of {ARCHITECTURES + LOADED_ARCHITECTURES}"
            )
        if merge_mode not in MERGE_MODES:
            raise ValueError(f"merge_mode={merge_mode!r}: expected one of {MERGE_MODES}")
        for name, value, low in (
            ("jumprelu_bandwidth", jumprelu_bandwidth, "> 0"),
            ("jumprelu_init_threshold", jumprelu_init_threshold, ">= 0"),
        ):
            ok = isinstance(value, int | float) and math.isfinite(value)
            if not ok or (value <= 0 if low == "> 0" else value < 0):
                raise ValueError(f"{name}={value!r}: expected a finite number {low}")
        if merge_index is not None:
            merge_index = torch.as_tensor(merge_index).detach().to(torch.long).cpu()
            if merge_index.dim() != 1 or merge_index.numel() < 1:
                raise ValueError(
                    f"merge_index has shape {tuple(merge_index.shape)}: expected a non-empty 1-D [d_pre] tensor"
                )
            lo, hi = int(merge_index.min()), int(merge_index.max())
            if lo < 0 or hi >= k or torch.bincount(merge_index, minlength=k).eq(0).any():
                raise ValueError(
                    f"merge_index: values must cover every merged latent 0..{k - 1} (k={k}); got range [{lo}, {hi}] with empty latents"
                )
        d_pre = k if merge_index is None else int(merge_index.numel())
        check_top_k(architecture, top_k, d_pre)
        if architecture == "groupmax" and d_pre % top_k:
            raise ValueError(
                f"top_k={top_k}: a groupmax SAE splits its k={d_pre} latents into top_k equal "
                f"groups; expected a divisor of {d_pre}"
            )
        self.d_in, self.d_sae = d_model, k
        self.architecture = architecture
        self.top_k = int(top_k)
        self.bandwidth = float(jumprelu_bandwidth)
        self.merge_mode = merge_mode
        self.aux_k = 512
        """Dead latents per token that the AuxK loss uses (set by the trainer)."""
        self.jumprelu_sparsity = "step"
        """JumpReLU training penalty (set by the trainer): ``step`` is the L0 through the
        threshold's straight-through estimator (Rajamanoharan et al.); ``tanh`` is
        ``sum_i tanh(jumprelu_tanh_scale * z_i * ||W_dec[i]||)`` (Anthropic's)."""
        self.jumprelu_tanh_scale = 4.0
        self.jumprelu_ste_to_input = False
        """Pass the jump's straight-through gradient to the pre-activations as well."""
        self.jumprelu_pre_act = False
        """Compute Anthropic's pre-activation loss (it pulls latents that do not fire towards
        their threshold) into ``SAEOutput.aux_loss`` (set by the trainer)."""
        self.batch_topk_select: (
            Callable[[torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor]] | None
        ) = None
        """BatchTopK's training selection over a batch split across ranks (set by the
        data-parallel trainer): ``(flat scores, rows, top_k) -> (values, indices)`` keeping
        this rank's share of the ``top_k * all rows`` largest scores of the whole batch."""
        self.metadata: dict[str, Any] = {}
        check_sae_memory(d_model, d_pre, k, dtype, device)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        w = torch.randn(d_pre, d_model, generator=gen, dtype=torch.float32)
        w = w / w.norm(dim=1, keepdim=True)
        # A merged row starts as the sum of its members' rows; merge.build_merged_sae refits it.
        w_dec = w if merge_index is None else torch.zeros(k, d_model).index_add_(0, merge_index, w)
        self.W_dec = nn.Parameter(w_dec.to(device=device, dtype=dtype))
        self.W_enc = nn.Parameter(w.T.clone().to(device=device, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(d_pre, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_model, device=device, dtype=dtype))
        if architecture == "jumprelu":
            self.threshold = nn.Parameter(
                torch.full((d_pre,), float(jumprelu_init_threshold), device=device, dtype=dtype)
            )
        else:
            self.register_buffer("threshold", torch.zeros(d_pre, device=device, dtype=dtype))
        self.W_skip: nn.Parameter | None = None
        """Linear skip connection ``[d_in, d_in]`` (``x_hat += x @ W_skip.T``), or None."""
        if skip_connection:
            self.W_skip = nn.Parameter(torch.zeros(d_model, d_model, device=device, dtype=dtype))
        self.merge_index: torch.Tensor | None
        if merge_index is not None:
            self.register_buffer("merge_index", merge_index.to(device))
        else:
            self.merge_index = None

    # -- seed compatibility -----------------------------------------------------------------
    @classmethod
    def from_config(
        cls,
        d_model: int,
        arch: SAEArchitectureConfig,
        *,
        seed: int | None = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> SparseAutoencoder:
        """A fresh SAE of the architecture ``arch`` (an ``SAEArchitectureConfig``, or an
        ``SAEConfig``, which is one) on ``[n, d_model]`` activations."""
        if not isinstance(arch, SAEArchitectureConfig):
            raise TypeError(f"arch: expected an SAEArchitectureConfig, got {type(arch).__name__}")
        return cls(
            d_model,
            arch.k,
            architecture=arch.architecture,
            top_k=arch.top_k,
            jumprelu_bandwidth=arch.jumprelu_bandwidth,
            jumprelu_init_threshold=arch.jumprelu_init_threshold,
            seed=seed,
            device=device,
            dtype=dtype,
        )

    def architecture_config(self) -> SAEArchitectureConfig:
        """This SAE's ``SAEArchitectureConfig`` (``k`` is ``d_sae``; the JumpReLU initial
        threshold is the config default, as a trained SAE has moved away from it)."""
        if self.is_merged or self.architecture not in ARCHITECTURES or self.W_skip is not None:
            raise ValueError(
                f"architecture={self.architecture!r}{' (merged)' if self.is_merged else ''}: "
                f"only an unmerged {', '.join(ARCHITECTURES)} SAE without a skip connection "
                "has an SAEArchitectureConfig"
            )
        return SAEArchitectureConfig.model_construct(
            k=self.d_sae,
            architecture=self.architecture,
            top_k=self.top_k,
            jumprelu_bandwidth=self.bandwidth,
            jumprelu_init_threshold=SAEArchitectureConfig.model_fields[
                "jumprelu_init_threshold"
            ].default,
        )

    @property
    def k(self) -> int:
        """Number of latents (the seed's name for d_sae)."""
        return self.d_sae

    @property
    def d_model(self) -> int:
        return self.d_in

    @property
    def d_pre(self) -> int:
        """Number of encoder codes before the merge (``d_sae`` when not merged)."""
        return int(self.b_enc.shape[0])

    @property
    def is_merged(self) -> bool:
        return self.merge_index is not None

    @property
    def dec(self) -> _LinearView:
        """``nn.Linear(k, d_model)``-style view: ``dec.weight`` is ``[d_model, k]``."""
        return _LinearView(self.W_dec.T, self.b_dec)

    @property
    def enc(self) -> _LinearView:
        """``nn.Linear(d_model, k)``-style view: ``enc.weight`` is ``[k, d_model]``."""
        return _LinearView(self.W_enc.T, self.b_enc)

    def extra_repr(self) -> str:
        extra = (
            f", top_k={self.top_k}"
            if self.architecture in ("topk", "batchtopk", "groupmax")
            else ""
        )
        if self.W_skip is not None:
            extra += ", skip_connection=True"
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
        """TopK code: ``(values [..., top_k], indices [..., top_k])`` (values ReLU-ed).

        For a merged SAE: the ``min(top_k, d_sae)`` largest merged codes (zeros pad the rest).
        """
        if self.merge_index is not None:
            top = self.encode(x).topk(min(self.top_k, self.d_sae), dim=-1, sorted=False)
            return top.values, top.indices
        pre = self.pre_activations(x)
        if self.architecture == "groupmax":
            return self._groupmax(pre)
        top = pre.topk(self.top_k, dim=-1, sorted=False)
        return F.relu(top.values), top.indices

    def _groupmax(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The largest ReLU-ed pre-activation of each of ``top_k`` contiguous latent groups:
        ``[..., d_pre] -> (values [..., top_k], indices [..., top_k])``."""
        top = pre.unflatten(-1, (self.top_k, -1)).max(dim=-1)
        size = pre.shape[-1] // self.top_k
        offsets = torch.arange(0, pre.shape[-1], size, device=pre.device)
        return F.relu(top.values), top.indices + offsets

    def merge_codes(self, z: torch.Tensor) -> torch.Tensor:
        """Aggregate original codes ``[..., d_pre]`` into merged latents ``[..., d_sae]``.

        ``sum`` adds the members' codes; ``max`` takes their maximum (codes are >= 0, so the
        zero start is exact). Identity when the SAE is not merged.
        """
        if self.merge_index is None:
            return z
        flat = z.reshape(-1, z.shape[-1])
        out = flat.new_zeros(flat.shape[0], self.d_sae)
        if self.merge_mode == "sum":
            out.index_add_(1, self.merge_index, flat)
        else:
            idx = self.merge_index.expand(flat.shape[0], -1)
            out.scatter_reduce_(1, idx, flat, reduce="amax", include_self=True)
        return out.reshape(*z.shape[:-1], self.d_sae)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Inference-time latents ``[..., d_sae]`` (BatchTopK uses its learned threshold)."""
        pre = self.pre_activations(x)
        if self.architecture == "relu":
            z = F.relu(pre)
        elif self.architecture == "topk":
            top = pre.topk(self.top_k, dim=-1, sorted=False)
            z = torch.zeros_like(pre).scatter_(-1, top.indices, F.relu(top.values))
        elif self.architecture == "groupmax":
            values, indices = self._groupmax(pre)
            z = torch.zeros_like(pre).scatter_(-1, indices, values)
        else:
            z = pre * (pre > self.threshold).to(pre.dtype)
        return self.merge_codes(z)

    def skip(self, x: torch.Tensor | None) -> torch.Tensor | float:
        """The skip connection's term ``x @ W_skip.T`` (``[..., d_in]``), or 0 without one."""
        if self.W_skip is None:
            return 0.0
        if x is None:
            raise ValueError(
                "x=None: this SAE has a skip connection (x_hat = z @ W_dec + b_dec + x @ "
                "W_skip.T); pass the input x [..., d_in] to decode it"
            )
        return x.to(self.W_skip.dtype) @ self.W_skip.T

    def decode(self, z: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """``z @ W_dec + b_dec`` (``+ x @ W_skip.T`` with a skip connection, which needs the
        input ``x [..., d_in]``): ``[..., d_sae] -> [..., d_in]``."""
        return z.to(self.W_dec.dtype) @ self.W_dec + self.b_dec + self.skip(x)

    def decode_sparse(
        self, values: torch.Tensor, indices: torch.Tensor, x: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Decode a TopK code by gathering the active rows: ``[B, k], [B, k] -> [B, d_in]``
        (``x`` as in :meth:`decode`)."""
        flat_v = values.reshape(-1, values.shape[-1])
        flat_i = indices.reshape(-1, indices.shape[-1])
        out = F.embedding_bag(
            flat_i, self.W_dec, per_sample_weights=flat_v.to(self.W_dec.dtype), mode="sum"
        )
        return (out + self.b_dec).reshape(*values.shape[:-1], self.d_in) + self.skip(x)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """``decode(encode(x), x)`` ``[..., d_in]``."""
        if self.architecture in ("topk", "groupmax") and self.merge_index is None:
            v, i = self.encode_topk(x)
            return self.decode_sparse(v, i, x)
        return self.decode(self.encode(x), x)

    # -- training forward -------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        dead_mask: torch.Tensor | None = None,
        sparse_decode: bool | None = None,
    ) -> SAEOutput:
        """Training forward on ``x [B, d_in]``: reconstruction, latents and unscaled loss terms.

        ``dead_mask`` (``bool[d_sae]``) turns on the AuxK loss for the TopK family.
        ``sparse_decode``: in training mode, ``relu``, ``topk`` and ``batchtopk`` run on the
        sparse path (only the active entries are decoded and back-propagated) by default -
        ``relu`` only while at most ``SPARSE_MAX_DENSITY`` of its entries are active; ``False``
        forces the dense path, ``True`` forces the sparse one where it exists.
        """
        pre = self.pre_activations(x)
        if (
            sparse_decode is not False
            and self.training
            and self.merge_index is None
            and self.W_skip is None
            and self.architecture in ("relu", "topk", "batchtopk")
        ):
            # ReLU codes start dense: check (on a few rows) that the sparse path pays off
            check = self.architecture == "relu" and sparse_decode is None
            limit = SPARSE_MAX_DENSITY.get(pre.device.type, SPARSE_MAX_DENSITY_DEFAULT)
            if not check or float((pre[:512] > 0).sum()) <= limit * pre[:512].numel():
                return self._forward_sparse(x, pre.detach(), dead_mask)
        top_i = top_v = None
        zero = pre.new_zeros(())
        sparsity = zero
        if self.architecture == "relu":
            z = F.relu(pre)
        elif self.architecture == "topk":
            top = pre.topk(self.top_k, dim=-1, sorted=False)
            top_i, top_v = top.indices, F.relu(top.values)
            z = torch.zeros_like(pre).scatter(-1, top_i, top_v)
        elif self.architecture == "groupmax":
            top_v, top_i = self._groupmax(pre)
            z = torch.zeros_like(pre).scatter(-1, top_i, top_v)
        elif self.architecture == "batchtopk":
            acts = F.relu(pre)
            if self.training:
                flat = acts.flatten()
                top_v, top_ix = self._batch_topk(flat, acts.shape[0])
                z = torch.zeros_like(flat).scatter(0, top_ix, top_v).view_as(acts)
            else:
                z = pre * (pre > self.threshold).to(pre.dtype)
        else:  # jumprelu
            to_input = self.training and self.jumprelu_ste_to_input
            z = _JumpReLU.apply(pre, self.threshold, self.bandwidth, to_input)
            if self.jumprelu_sparsity == "tanh":
                scaled = z.abs() * (self.jumprelu_tanh_scale * self.W_dec.norm(dim=1).to(z.dtype))
                sparsity = torch.tanh(scaled).sum(-1).mean()
            else:
                step = _Rectangle.apply(pre, self.threshold, self.bandwidth, to_input)
                sparsity = step.sum(-1).mean()
        if self.merge_index is not None:
            z, top_i, top_v = self.merge_codes(z), None, None
        if self.architecture == "relu":  # decoder-norm-weighted L1, as one [d_sae] product
            sparsity = z.sum(0) @ self.W_dec.norm(dim=1).to(z.dtype) / z.shape[0]
        if top_i is not None and sparse_decode is not False:
            x_hat = self.decode_sparse(top_v, top_i, x)
        else:
            x_hat = self.decode(z, x)
        x = x.to(x_hat.dtype)
        err = x_hat - x
        mse = err.pow(2).sum(-1).mean()
        var = (x - x.mean(0)).pow(2).sum(-1).mean()
        fvu = mse / var.clamp_min(1e-12)
        aux = zero
        if (
            dead_mask is not None
            and self.merge_index is None
            and self.architecture in ("topk", "batchtopk")
            and bool(dead_mask.any())
        ):
            aux = self._auxk_loss(pre, dead_mask, err)
        elif self.architecture == "jumprelu" and self.jumprelu_pre_act and self.training:
            below = F.relu(self.threshold - pre)
            aux = (below.sum(0) @ self.W_dec.norm(dim=1).to(below.dtype)) / below.shape[0]
        # codes are >= 0 here (ReLU-ed or above a non-negative threshold): count, no bool copy
        l0 = torch.count_nonzero(z).float() / max(1, z.numel() // z.shape[-1])
        return SAEOutput(x_hat, z, top_i, top_v, fvu, mse, sparsity, aux, l0)

    def _batch_topk(self, flat: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """BatchTopK's training selection: ``(values, indices)`` of the ``top_k * rows`` largest
        of ``flat [rows * d_sae]`` (or of the whole batch across ranks, ``batch_topk_select``)."""
        if self.batch_topk_select is not None:
            return self.batch_topk_select(flat, rows, self.top_k)
        top = flat.topk(min(flat.numel(), self.top_k * rows), sorted=False)
        return top.values, top.indices

    def _forward_sparse(
        self, x: torch.Tensor, pre: torch.Tensor, dead_mask: torch.Tensor | None
    ) -> SAEOutput:
        """The training forward over the active entries only (``pre``: detached ``[B, d_sae]``).

        The dense encoder product is the only ``[B, d_sae]``-sized matmul; decoding is an
        ``embedding_bag`` over the active decoder rows and the encoder's backward is one sparse
        product (:class:`_GatherEncode`).
        """
        B, dev = pre.shape[0], pre.device
        if self.architecture == "topk":
            top = pre.topk(self.top_k, dim=-1, sorted=False)
            cols = top.indices.reshape(-1)
            rows = torch.arange(B, device=dev).repeat_interleave(self.top_k)
        elif self.architecture == "batchtopk":
            flat = pre.reshape(-1)
            top_v, top_ix = self._batch_topk(flat, B)
            sel = top_ix[top_v > 0].sort().values  # row-major order for the bags
            rows, cols = sel // self.d_sae, sel % self.d_sae
        else:
            rows, cols = (pre > 0).nonzero(as_tuple=True)
        vals = F.relu(_GatherEncode.apply(x, self.b_dec, self.W_enc, self.b_enc, rows, cols, pre))
        counts = torch.bincount(rows, minlength=B)
        crow = torch.zeros(B + 1, dtype=torch.int64, device=dev)
        crow[1:] = counts.cumsum(0)
        if self.architecture == "topk":
            top_i, top_v = cols.view(B, self.top_k), vals.view(B, self.top_k)
            dec = F.embedding_bag(
                top_i, self.W_dec, per_sample_weights=top_v.to(self.W_dec.dtype), mode="sum"
            )
        else:
            top_i = top_v = None
            dec = F.embedding_bag(
                cols,
                self.W_dec,
                crow[:-1],
                per_sample_weights=vals.to(self.W_dec.dtype),
                mode="sum",
            )
        x_hat = dec + self.b_dec
        x = x.to(x_hat.dtype)
        err = x_hat - x
        mse = err.pow(2).sum(-1).mean()
        var = (x - x.mean(0)).pow(2).sum(-1).mean()
        fvu = mse / var.clamp_min(1e-12)
        zero = mse.new_zeros(())
        sparsity = zero
        if self.architecture == "relu":
            sparsity = (vals * self.W_dec.norm(dim=1)[cols].to(vals.dtype)).sum() / B
        aux = zero
        if dead_mask is not None and self.architecture != "relu" and bool(dead_mask.any()):
            k_aux = min(self.aux_k, int(dead_mask.sum()))
            masked = torch.where(dead_mask, pre, torch.full_like(pre, float("-inf")))
            atop = masked.topk(k_aux, dim=-1, sorted=False)
            arows = torch.arange(B, device=dev).repeat_interleave(k_aux)
            avals = F.relu(
                _GatherEncode.apply(
                    x, self.b_dec, self.W_enc, self.b_enc, arows, atop.indices.reshape(-1), pre
                )
            )
            recon = F.embedding_bag(
                atop.indices,
                self.W_dec,
                per_sample_weights=avals.view(B, k_aux).to(self.W_dec.dtype),
                mode="sum",
            )
            aux = (recon + err.detach()).pow(2).sum(-1).mean()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "CSR support is in beta"
            latents = torch.sparse_csr_tensor(
                crow, cols, vals.detach(), (B, self.d_sae), check_invariants=False
            )
        l0 = (vals > 0).sum().float() / B
        return SAEOutput(x_hat, latents, top_i, top_v, fvu, mse, sparsity, aux, l0)

    def _auxk_loss(
        self,
        pre: torch.Tensor,
        dead_mask: torch.Tensor,
        err: torch.Tensor,
        aux_k: int | None = None,
    ) -> torch.Tensor:
        """Reconstruct the residual ``x - x_hat`` from the top dead latents (Gao et al.).

        Returns the squared error summed over ``d_in`` and averaged over tokens (``mse`` units).
        """
        n_dead = int(dead_mask.sum())
        k_aux = min(aux_k or self.aux_k, n_dead)
        masked = torch.where(dead_mask, pre, torch.full_like(pre, float("-inf")))
        top = masked.topk(k_aux, dim=-1, sorted=False)
        vals = F.relu(top.values)
        recon = F.embedding_bag(
            top.indices, self.W_dec, per_sample_weights=vals.to(self.W_dec.dtype), mode="sum"
        )
        target = -err.detach()
        return (recon - target).pow(2).sum(-1).mean()

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
    def fold_decoder_norms(self) -> None:
        """Make every decoder row unit-norm without changing any reconstruction: latent ``i``'s
        encoder column, ``b_enc[i]`` and ``threshold[i]`` are multiplied by ``||W_dec[i]||``.

        Exact where each latent gates on its own pre-activation (``relu``, ``jumprelu``,
        ``batchtopk`` at inference); ``topk`` ranks latents against each other, so rescaling
        would change which fire: ``ValueError``.
        """
        if self.architecture not in ("relu", "jumprelu", "batchtopk") or self.is_merged:
            raise ValueError(
                f"architecture={self.architecture!r}: folding decoder norms into the encoder is "
                "exact only for relu, jumprelu and batchtopk SAEs (not merged)"
            )
        n = self.W_dec.norm(dim=1).clamp_min(1e-8)
        self.W_enc.mul_(n)
        self.b_enc.mul_(n)
        self.threshold.mul_(n.to(self.threshold))
        self.W_dec.div_(n[:, None])

    @torch.no_grad()
    def fold_activation_scale(self, scale: float) -> None:
        """Make an SAE trained on ``x * scale`` take raw ``x``.

        ``b_enc``, ``b_dec`` and ``threshold`` are divided by ``scale``; ``W_enc`` and the
        (unit-norm) decoder rows are kept, so the latents come out in raw activation units
        (divided by ``scale``) and each latent's value is its length along its decoder row.
        ``fold_activation_scale(1 / scale)`` is the inverse.
        """
        self.b_enc.div_(scale)
        self.b_dec.div_(scale)
        self.threshold.div_(scale)

    def config_dict(self) -> dict[str, Any]:
        """Constructor arguments that rebuild this SAE's shape."""
        cfg: dict[str, Any] = {
            "d_model": self.d_in,
            "k": self.d_sae,
            "architecture": self.architecture,
            "top_k": self.top_k,
            "jumprelu_bandwidth": self.bandwidth,
        }
        if self.merge_index is not None:
            cfg.update(merge_mode=self.merge_mode, d_pre=self.d_pre)
        if self.W_skip is not None:
            cfg["skip_connection"] = True
        return cfg
