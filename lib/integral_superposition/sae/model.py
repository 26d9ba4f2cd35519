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
encoder into ``d_sae`` merged latents, by ``merge_mode`` ``"sum"`` or ``"max"``, each code
first multiplied by its ``merge_weight`` (``float[d_pre]``, >= 0) when the SAE has one. Then
``W_enc`` is ``[d_in, d_pre]``, ``b_enc`` and ``threshold`` are ``[d_pre]``, ``W_dec`` is
``[d_sae, d_in]``, and ``encode(x)`` is exactly the aggregation of the original codes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from integral_superposition.config import SAEArchitectureConfig, check_k, check_top_k
from integral_superposition.sae.forward import (
    SPARSE_MAX_DENSITY,
    SPARSE_MAX_DENSITY_DEFAULT,
    SAEOutput,
    train_forward,
)

__all__ = [
    "ARCHITECTURES",
    "LOADED_ARCHITECTURES",
    "MERGE_MODES",
    "SPARSE_MAX_DENSITY",
    "SPARSE_MAX_DENSITY_DEFAULT",
    "SAEOutput",
    "SparseAutoencoder",
    "check_merge_weight",
    "check_sae_memory",
    "sae_parameter_count",
]

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu")
"""The architectures the trainer trains."""
LOADED_ARCHITECTURES = ("groupmax",)
"""Architectures ``SparseAutoencoder`` computes but the trainer does not train."""
MERGE_MODES = ("sum", "max")


def check_merge_weight(weight, d_pre: int, name: str = "merge_weight") -> torch.Tensor:
    """A merged SAE's per-code weights as float64 ``[d_pre]``: finite and >= 0, so merged codes
    of non-negative codes are never negative (a member of weight 0 never counts)."""
    w = torch.as_tensor(weight).detach().cpu()
    if not w.is_floating_point():
        w = w.double()
    if tuple(w.shape) != (d_pre,):
        raise ValueError(
            f"{name} has shape {tuple(w.shape)}: expected [{d_pre}] (one weight per original latent)"
        )
    w = w.double()
    bad = ~torch.isfinite(w) | (w < 0)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(
            f"{name}[{i}]={float(w[i])!r} ({int(bad.sum())} bad of {d_pre}): expected finite weights >= 0"
        )
    return w


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
        merge_weight: torch.Tensor | None = None,
        skip_connection: bool = False,
    ):
        super().__init__()
        if not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model={d_model!r}: expected a positive int")
        k = check_k(k)
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
        if merge_weight is not None:
            if merge_index is None:
                raise ValueError(
                    "merge_weight without merge_index: weights aggregate a merged SAE's codes; "
                    "expected merge_index [d_pre] as well"
                )
            merge_weight = check_merge_weight(merge_weight, d_pre)
        top_k = check_top_k(architecture, top_k, d_pre)
        self.d_in, self.d_sae = d_model, k
        self.architecture = architecture
        self.top_k = int(top_k)
        self.bandwidth = float(jumprelu_bandwidth)
        self.merge_mode = merge_mode
        self.aux_k = 512
        """Dead latents per token that the AuxK loss uses (set by the trainer)."""
        self.rank_by_decoder_norm = False
        """TopK training with free-norm decoder rows (set by the trainer): latents are ranked
        by ``pre * ||W_dec[i]||`` (SAELens's ``rescale_acts_by_decoder_norm``); their values
        stay ``pre``, decoded by the rows as they are."""
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
        self.merge_weight: torch.Tensor | None
        if merge_weight is not None:
            self.register_buffer("merge_weight", merge_weight.to(device=device, dtype=dtype))
        else:
            self.merge_weight = None

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
        zero start is exact). With ``merge_weight`` ``[d_pre]`` each code is first multiplied
        by its weight (``sum``: ``z' = z W`` with ``W[i, merge_index[i]] = merge_weight[i]``).
        Identity when the SAE is not merged.
        """
        if self.merge_index is None:
            return z
        flat = z.reshape(-1, z.shape[-1])
        if self.merge_weight is not None:
            flat = flat * self.merge_weight.to(flat.dtype)
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
        return train_forward(self, x, dead_mask, sparse_decode)

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
    def fold_ranking_norms(self) -> None:
        """End free-norm TopK training (``rank_by_decoder_norm``): multiply latent ``i``'s
        encoder column and ``b_enc[i]`` by ``||W_dec[i]||`` and make the row unit-norm. The
        SAE then ranks by its plain pre-activations and every output stays the same."""
        if not self.rank_by_decoder_norm:
            raise ValueError("fold_ranking_norms: this SAE does not rank by decoder norms")
        n = self.W_dec.norm(dim=1).clamp_min(1e-8)
        self.W_enc.mul_(n)
        self.b_enc.mul_(n)
        self.W_dec.div_(n[:, None])
        self.rank_by_decoder_norm = False

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
