"""SAE evaluation metrics (definitions in docs/sae.md).

All metrics are computed on one token set: the stored rows of an ``ActivationStore`` (real
tokens only: no BOS, pad or special tokens), usually its held-out ``test`` split.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from integral_superposition.sae.model import SparseAutoencoder

DENSE_THRESHOLD = 0.1
DENSE_THRESHOLD_LOOSE = 0.01


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """``1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` over all rows of ``x [N, d]``.

    The denominator is taken about the mean: predicting the mean gives 0, a perfect
    reconstruction gives 1.
    """
    x, x_hat = x.double(), x_hat.double()
    sse = (x - x_hat).pow(2).sum()
    sst = (x - x.mean(0)).pow(2).sum()
    return float(1.0 - sse / sst.clamp_min(1e-300))


@dataclass
class LatentStats:
    """Streaming per-latent statistics over a token set.

    ``fire_count``, ``act_sum``, ``act_max``: ``[d_sae]``; ``l0_counts[j]`` is the number of
    tokens with exactly ``j`` active latents (``[d_sae + 1]``). ``sse``/``sum_x``/``sum_xx``
    accumulate the explained-variance terms.
    """

    d_sae: int
    n_tokens: int = 0
    fire_count: np.ndarray = field(default=None)  # type: ignore[assignment]
    act_sum: np.ndarray = field(default=None)  # type: ignore[assignment]
    act_max: np.ndarray = field(default=None)  # type: ignore[assignment]
    l0_counts: np.ndarray = field(default=None)  # type: ignore[assignment]
    sse: float = 0.0
    sum_x: np.ndarray | None = None
    sum_xx: float = 0.0
    cos_sum: float = 0.0
    norm_ratio_sum: float = 0.0

    def __post_init__(self) -> None:
        if self.fire_count is None:
            self.fire_count = np.zeros(self.d_sae, dtype=np.int64)
            self.act_sum = np.zeros(self.d_sae, dtype=np.float64)
            self.act_max = np.zeros(self.d_sae, dtype=np.float64)
            self.l0_counts = np.zeros(self.d_sae + 1, dtype=np.int64)

    @torch.no_grad()
    def update(self, x: torch.Tensor, z: torch.Tensor, x_hat: torch.Tensor) -> None:
        """Add a chunk: inputs ``x [n, d]``, latents ``z [n, d_sae]``, reconstructions ``[n, d]``."""
        active = z > 0
        self.n_tokens += x.shape[0]
        self.fire_count += active.sum(0).cpu().numpy()
        self.act_sum += z.double().sum(0).cpu().numpy()
        self.act_max = np.maximum(self.act_max, z.max(0).values.double().cpu().numpy())
        self.l0_counts += np.bincount(active.sum(1).cpu().numpy(), minlength=self.d_sae + 1)
        xd, xh = x.double(), x_hat.double()
        self.sse += float((xd - xh).pow(2).sum())
        sx = xd.sum(0).cpu().numpy()
        self.sum_x = sx if self.sum_x is None else self.sum_x + sx
        self.sum_xx += float(xd.pow(2).sum())
        self.cos_sum += float(torch.nn.functional.cosine_similarity(xd, xh, dim=-1).sum())
        self.norm_ratio_sum += float((xh.norm(dim=-1) / xd.norm(dim=-1).clamp_min(1e-12)).sum())

    @property
    def density(self) -> np.ndarray:
        """Firing frequency per latent ``[d_sae]``."""
        return self.fire_count / max(1, self.n_tokens)

    @property
    def mean_act(self) -> np.ndarray:
        """Mean activation per latent over all tokens ``[d_sae]``."""
        return self.act_sum / max(1, self.n_tokens)

    @property
    def explained_variance(self) -> float:
        if self.n_tokens == 0 or self.sum_x is None:
            return float("nan")
        sst = self.sum_xx - float((self.sum_x**2).sum()) / self.n_tokens
        return 1.0 - self.sse / max(sst, 1e-300)

    @property
    def l0(self) -> float:
        return float(
            (self.l0_counts * np.arange(self.l0_counts.size)).sum() / max(1, self.n_tokens)
        )

    def summary(self) -> dict[str, float]:
        """Scalar metrics: L0, EV, FVU, dead/dense fractions, cosine and norm ratio."""
        dens = self.density
        ev = self.explained_variance
        return {
            "n_tokens": int(self.n_tokens),
            "l0": self.l0,
            "explained_variance": ev,
            "fvu": 1.0 - ev,
            "dead_frac": float((self.fire_count == 0).mean()),
            "dense_frac": float((dens > DENSE_THRESHOLD).mean()),
            "dense_frac_001": float((dens > DENSE_THRESHOLD_LOOSE).mean()),
            "cos_sim": self.cos_sum / max(1, self.n_tokens),
            "norm_ratio": self.norm_ratio_sum / max(1, self.n_tokens),
        }

    def log10_density_hist(
        self, bins: int = 50, lo: float = -10.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """Histogram of ``log10(density + 1e-10)``: ``(counts [bins], edges [bins + 1])``."""
        return np.histogram(np.log10(self.density + 1e-10), bins=bins, range=(lo, 0.0))


@torch.no_grad()
def latent_stats(
    sae: SparseAutoencoder,
    store,
    mask: np.ndarray | None = None,
    chunk_tokens: int = 16384,
    device: str | torch.device | None = None,
) -> LatentStats:
    """One streaming pass of ``sae`` over ``store`` rows (``mask``: ``bool[n_tokens]``).

    Memory is O(d_sae + chunk_tokens * d_sae), independent of the number of tokens.
    """
    if store.d_model != sae.d_in:
        raise ValueError(
            f"sae.d_in={sae.d_in} does not match the store's d_model={store.d_model} ({store.uris})"
        )
    device = torch.device(device) if device is not None else sae.W_enc.device
    stats = LatentStats(sae.d_sae)
    for _rows, x in store.iter_chunks(chunk_tokens, mask=mask):
        x = x.to(device)
        z = sae.encode(x)
        stats.update(x, z, sae.decode(z))
    if stats.n_tokens == 0:
        raise ValueError("latent_stats: the selected token set is empty")
    return stats
