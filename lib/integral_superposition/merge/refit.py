"""The merged SAE and the streaming ridge refit of its decoder.

A merged SAE keeps the original encoder and aggregates its codes with a fixed
``merge_index`` (see ``SparseAutoencoder``): ``z' = merge(z)`` ``[n, K']``. Its decoder is refit
by ridge regression of the activations on the merged codes,

    min_{W, b}  sum_t ||x_t - z'_t W - b||^2 + lam ||W - W0||^2,

where ``W0`` (``[K', d]``) holds the medoids' decoder rows, so a latent that never fires on
the fit tokens keeps its medoid direction instead of collapsing to zero. The sufficient
statistics ``Z'^T Z'`` ``[K', K']``, ``Z'^T X`` ``[K', d]``, ``sum z'``, ``sum x`` and ``n`` are
accumulated over a stream of chunks (memory independent of the number of tokens) and the
system is solved once (Cholesky, float64). ``lam = ridge_lambda * mean(diag(Z'^T Z'))``
(centred), so ``ridge_lambda`` is scale-free. With sum aggregation the merged statistics are
``M^T S M`` of the original ones: one pass over the data serves every ``K'`` of a sweep.

Changing ``b_dec`` would shift the encoder input ``x - b_dec``; the refit compensates in
``b_enc`` so that ``encode`` is unchanged.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from integral_superposition.merge.medoid import (
    check_labels,
    check_medoids,
    labels_from_merge_matrix,
)
from integral_superposition.sae.encode import encode_chunks
from integral_superposition.sae.model import MERGE_MODES, SparseAutoencoder, check_merge_weight

SPARSE_DENSITY = 0.05
"""Chunks whose codes are sparser than this are accumulated with sparse products."""


@dataclass
class RidgeStats:
    """Sufficient statistics of the ridge refit over ``n`` tokens (all float64).

    ``gram`` ``[m, m]`` = ``Z^T Z``; ``cross`` ``[m, d]`` = ``Z^T X``; ``z_sum`` ``[m]``;
    ``x_sum`` ``[d]``; ``x_sq`` = ``sum ||x||^2``.
    """

    gram: np.ndarray
    cross: np.ndarray
    z_sum: np.ndarray
    x_sum: np.ndarray
    x_sq: float = 0.0
    n: int = 0

    @classmethod
    def empty(cls, m: int, d: int) -> RidgeStats:
        return cls(np.zeros((m, m)), np.zeros((m, d)), np.zeros(m), np.zeros(d))

    @property
    def n_latents(self) -> int:
        return self.gram.shape[0]

    @torch.no_grad()
    def update(self, z: torch.Tensor, x: torch.Tensor) -> None:
        """Add a chunk: codes ``z`` ``[n, m]`` and activations ``x`` ``[n, d]``."""
        if (
            z.shape[0] != x.shape[0]
            or z.shape[1] != self.n_latents
            or x.shape[1] != self.cross.shape[1]
        ):
            raise ValueError(
                f"chunk shapes z={tuple(z.shape)}, x={tuple(x.shape)} do not match the statistics "
                f"([n, {self.n_latents}], [n, {self.cross.shape[1]}])"
            )
        z, x = z.detach().cpu(), x.detach().cpu()
        xd = x.double()  # one float64 copy serves Z^T X and the sums
        n, m = z.shape
        if int(torch.count_nonzero(z)) < SPARSE_DENSITY * z.numel():
            nz = z.nonzero()  # row-major order: the CSR index arrays follow directly
            rows, cols = nz[:, 0].numpy(), nz[:, 1].numpy()
            vals = z[nz[:, 0], nz[:, 1]].double().numpy()
            indptr = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
            zs = sp.csr_array((vals, cols, indptr), shape=(n, m))
            zt = zs.T.tocsr()
            self.gram += (zt @ zs).toarray()
            with warnings.catch_warnings():  # torch flags sparse CSR as beta
                warnings.simplefilter("ignore", UserWarning)
                zt_t = torch.sparse_csr_tensor(
                    torch.from_numpy(zt.indptr).long(),
                    torch.from_numpy(zt.indices).long(),
                    torch.from_numpy(zt.data),
                    size=zt.shape,
                )
                # multithreaded, unlike scipy's sparse @ dense
                self.cross += (zt_t @ xd).numpy()
            self.z_sum += np.bincount(cols, weights=vals, minlength=m)
        else:
            zf, xf = z.float(), x.float()
            self.gram += (zf.T @ zf).double().numpy()
            self.cross += (zf.T @ xf).double().numpy()
            self.z_sum += z.sum(0, dtype=torch.float64).numpy()
        self.x_sum += xd.sum(0).numpy()
        flat = xd.reshape(-1)
        self.x_sq += float(torch.dot(flat, flat))
        self.n += int(x.shape[0])

    def merged(self, labels, weights=None) -> RidgeStats:
        """Statistics of merged codes ``z W`` ``[n, m']``: ``labels`` ``int[m]`` cluster ids,
        ``weights`` ``[m]`` (default ones: sum aggregation), ``W[i, labels[i]] = weights[i]``.

        ``W^T Z^T Z W``, ``W^T Z^T X``, ``W^T sum z``: no pass over the data.
        """
        lab = check_labels(labels, self.n_latents)
        n_c = int(lab.max()) + 1
        idx = torch.from_numpy(lab)
        g = torch.from_numpy(self.gram)
        cross = torch.from_numpy(self.cross)
        z_sum = self.z_sum
        if weights is not None:
            w = check_merge_weight(weights, self.n_latents, "weights").numpy()
            wt = torch.from_numpy(w)
            g = g * wt[:, None] * wt[None, :]
            cross = cross * wt[:, None]
            z_sum = z_sum * w
        rows = torch.zeros(n_c, g.shape[1], dtype=g.dtype).index_add_(0, idx, g)
        gram = torch.zeros(n_c, n_c, dtype=g.dtype).index_add_(1, idx, rows)
        cross = torch.zeros(n_c, self.cross.shape[1], dtype=g.dtype).index_add_(0, idx, cross)
        z_sum = np.bincount(lab, weights=z_sum, minlength=n_c)
        return RidgeStats(gram.numpy(), cross.numpy(), z_sum, self.x_sum.copy(), self.x_sq, self.n)

    def solve(
        self,
        ridge_lambda: float = 1e-4,
        prior: np.ndarray | torch.Tensor | None = None,
        fit_bias: bool = True,
        b_dec: np.ndarray | torch.Tensor | None = None,
    ) -> RefitResult:
        """Solve the ridge system once: ``W`` ``[m, d]`` and ``b`` ``[d]`` (see module docstring).

        ``prior``: ``W0`` ``[m, d]`` (default zeros). ``fit_bias=False`` keeps ``b_dec`` fixed
        (regresses ``x - b_dec`` on ``z``).
        """
        ridge_lambda = float(ridge_lambda)
        if not np.isfinite(ridge_lambda) or ridge_lambda < 0:
            raise ValueError(f"ridge_lambda={ridge_lambda}: expected a finite number >= 0")
        if self.n == 0:
            raise ValueError("the ridge statistics are empty: no token was accumulated")
        m, d = self.cross.shape
        mu_x = self.x_sum / self.n
        if fit_bias:
            mu_z = self.z_sum / self.n
            gram = self.gram - self.n * np.outer(mu_z, mu_z)
            cross = self.cross - self.n * np.outer(mu_z, mu_x)
        else:
            if b_dec is None:
                raise ValueError("fit_bias=False needs b_dec (the fixed decoder bias [d])")
            b = np.asarray(torch.as_tensor(b_dec).detach().cpu().double().numpy())
            gram = self.gram
            cross = self.cross - np.outer(self.z_sum, b)
        diag = np.diag(gram)
        scale = float(diag.mean())
        lam = ridge_lambda * scale
        a = torch.from_numpy(gram + lam * np.eye(m))
        rhs = torch.from_numpy(cross.copy())
        if prior is not None and lam > 0:
            w0 = torch.as_tensor(prior).detach().cpu().double()
            if tuple(w0.shape) != (m, d):
                raise ValueError(f"prior has shape {tuple(w0.shape)}, expected ({m}, {d})")
            rhs += lam * w0
        chol, info = torch.linalg.cholesky_ex(a)
        piv = torch.diagonal(chol).pow(2) if int(info) == 0 else None
        if (
            piv is None
            or not torch.isfinite(piv).all()
            or float(piv.min()) <= 1e-11 * max(float(diag.max()), 1e-300)
        ):
            dead = np.flatnonzero(diag <= 1e-12 * max(float(diag.max()), 1e-300))
            why = (
                f"{dead.size} merged latents never fire on the fit tokens (e.g. {dead[:5].tolist()})"
                if dead.size
                else "the merged codes are linearly dependent on the fit tokens"
            )
            raise ValueError(
                f"the ridge system Z^T Z ({m} x {m}) is singular with ridge_lambda={ridge_lambda}: {why}; "
                f"pass ridge_lambda > 0, e.g. ridge_lambda=1e-4 (relative to the mean diagonal of Z^T Z, "
                f"{scale:.3g} here)"
            )
        w = torch.cholesky_solve(rhs, chol).numpy()
        bias = mu_x - (self.z_sum / self.n) @ w if fit_bias else b
        return RefitResult(w, bias, lam, self.n, self._fvu(w, bias))

    def _fvu(self, w: np.ndarray, b: np.ndarray) -> float:
        """FVU of ``x_hat = z W + b`` on the accumulated tokens (from the statistics alone)."""
        # sum ||x - zW - b||^2 expanded in the sufficient statistics.
        sse = (
            self.x_sq
            - 2 * float(np.sum(self.cross * w))
            - 2 * float(self.x_sum @ b)
            + float(np.sum((self.gram @ w) * w))
            + 2 * float(self.z_sum @ w @ b)
            + self.n * float(b @ b)
        )
        sst = self.x_sq - float(self.x_sum @ self.x_sum) / self.n
        return sse / max(sst, 1e-300)


def projection_weights(
    w_dec: np.ndarray | torch.Tensor, stats: RidgeStats, labels
) -> tuple[np.ndarray, np.ndarray]:
    """Per-latent merge weights ``float64[K]`` and cluster directions ``u`` ``float64[K', d]``
    of the best rank-one summary of each cluster's reconstruction.

    A cluster ``C`` contributes ``y = sum_{i in C} z_i d_i`` (``d_i``: decoder rows ``w_dec``
    ``[K, d]``). Its best rank-one approximation over the fit tokens is ``(u . y) u`` with ``u``
    the top eigenvector of ``D_C^T G_CC D_C`` (``G = stats.gram`` ``= Z^T Z`` of the original
    codes), so the merged code is ``sum_i w_i z_i`` with ``w_i = d_i . u``. It is solved in the
    ``|C| x |C|`` space: with ``D_C D_C^T = L L^T``, ``u = D_C^T L^+T f`` and ``w = L f`` for the
    top eigenvector ``f`` of ``L^T G_CC L``. The sign makes the weights' sum positive; a member
    whose row points away from ``u`` has ``w_i < 0``. A cluster that never fires on the fit
    tokens takes its summed rows' direction; one whose rows are all zero gets weights 0.
    """
    d = np.asarray(torch.as_tensor(w_dec).detach().cpu().double().numpy())
    lab = check_labels(labels, stats.n_latents)
    if d.ndim != 2 or d.shape[0] != lab.size:
        raise ValueError(f"w_dec has shape {d.shape}: expected [K={lab.size}, d]")
    n_c = int(lab.max()) + 1
    weights = np.zeros(lab.size)
    dirs = np.zeros((n_c, d.shape[1]))
    order = np.argsort(lab, kind="stable")
    bounds = np.searchsorted(lab[order], np.arange(n_c + 1))
    gram = stats.gram
    for c in range(n_c):
        members = order[bounds[c] : bounds[c + 1]]
        dc = d[members]  # [|C|, d]
        g = gram[np.ix_(members, members)]
        evals, evecs = np.linalg.eigh(dc @ dc.T)
        keep = evals > 1e-12 * max(float(evals.max()), 1e-300)
        if not keep.any():  # every member's row is zero: the cluster adds nothing
            continue
        v, root = evecs[:, keep], np.sqrt(evals[keep])
        inner = (v * root).T @ g @ (v * root)  # L^T G_CC L with L = V sqrt(evals)
        vals, vecs = np.linalg.eigh(inner)
        # u^T u = f^T f = 1; a cluster that never fires takes its summed rows' direction
        u = dc.T @ (v @ (vecs[:, -1] / root)) if vals[-1] > 0 else dc.sum(0)
        u = u / max(float(np.linalg.norm(u)), 1e-300)
        w = dc @ u
        if w.sum() < 0:
            u, w = -u, -w
        weights[members] = w
        dirs[c] = u
    return weights, dirs


@dataclass
class RefitResult:
    """A solved refit: ``W_dec`` ``[m, d]``, ``b_dec`` ``[d]``, the absolute ``lam`` used,
    the number of fit tokens and the FVU on them."""

    W_dec: np.ndarray
    b_dec: np.ndarray
    lam: float
    n_tokens: int
    fit_fvu: float


@torch.no_grad()
def accumulate_stats(
    sae: SparseAutoencoder,
    data,
    *,
    on_progress: Callable[[int, int], None] | None = None,
    total: int | None = None,
) -> RidgeStats:
    """One pass: ridge statistics of ``sae.encode(x)`` (``[n, d_sae]``) against ``x`` ``[n, d]``.

    ``data``: an ``ActivationStore`` (its ``train`` split) or an iterable of activation
    chunks: ``[n, d]`` tensors, ``(rows, x)`` pairs or ``Batch`` objects
    (:func:`integral_superposition.sae.encode.encode_chunks`).
    """
    stats = RidgeStats.empty(sae.d_sae, sae.d_in)
    store = hasattr(data, "iter_chunks") and hasattr(data, "split_mask")
    chunks = encode_chunks(
        sae,
        data,
        chunk_tokens=16384 if store else None,
        mask=data.split_mask("train") if store else None,
    )
    for _rows, x, z, _ in chunks:
        stats.update(z, x)
        if on_progress is not None:
            on_progress(stats.n, total or stats.n)
    if stats.n == 0:
        raise ValueError("data yielded no activations: nothing to refit on")
    return stats


def build_merged_sae(
    sae: SparseAutoencoder,
    labels,
    medoids,
    *,
    mode: str = "sum",
    weights=None,
    rows=None,
) -> SparseAutoencoder:
    """A merged ``SparseAutoencoder``: ``sae``'s encoder followed by the merge ``labels`` ``int[K]``.

    ``weights`` ``[K]`` (>= 0, optional) multiply each original code before the aggregation
    (``merge_weight``). The decoder starts as ``rows`` ``[K', d]`` (default the medoids' rows
    ``W_dec[medoids]``), not refit (see :func:`refit_decoder`). With the identity merge and no
    weights it reproduces ``sae`` exactly.
    """
    if not isinstance(sae, SparseAutoencoder):
        raise TypeError(f"sae: expected a SparseAutoencoder, got {type(sae).__name__}")
    if sae.is_merged:
        raise ValueError("sae is already merged: merge the original SAE with the composed labels")
    if sae.W_skip is not None:
        raise ValueError(
            "sae has a skip connection (x_hat = z @ W_dec + b_dec + x @ W_skip.T): merging "
            "refits only z @ W_dec + b_dec; expected an SAE without one"
        )
    if mode not in MERGE_MODES:
        raise ValueError(f"mode={mode!r}: expected one of {MERGE_MODES}")
    lab = check_labels(labels, sae.d_sae)
    med = check_medoids(medoids, lab)
    n_c = int(lab.max()) + 1
    if weights is not None:
        weights = check_merge_weight(weights, sae.d_sae, "weights")
    if rows is not None:
        rows = torch.as_tensor(rows).detach().cpu()
        if tuple(rows.shape) != (n_c, sae.d_in):
            raise ValueError(
                f"rows has shape {tuple(rows.shape)}: expected [K'={n_c}, d={sae.d_in}]"
            )
    merged = SparseAutoencoder(
        sae.d_in,
        n_c,
        architecture=sae.architecture,
        top_k=sae.top_k,
        jumprelu_bandwidth=sae.bandwidth,
        seed=None,
        merge_index=torch.from_numpy(lab),
        merge_mode=mode,
        merge_weight=weights,
        device=sae.W_enc.device,
        dtype=sae.W_enc.dtype,
    )
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "b_dec", "threshold"):
            getattr(merged, name).copy_(getattr(sae, name))
        if rows is None:
            merged.W_dec.copy_(sae.W_dec[torch.from_numpy(med).to(sae.W_dec.device)])
        else:
            merged.W_dec.copy_(rows.to(merged.W_dec))
    merged.metadata = dict(sae.metadata)
    return merged.eval()


@torch.no_grad()
def apply_refit(merged: SparseAutoencoder, result: RefitResult) -> SparseAutoencoder:
    """Write a refit's decoder into ``merged`` in place, keeping ``encode`` unchanged."""
    w = torch.from_numpy(result.W_dec).to(merged.W_dec)
    b_new = torch.from_numpy(np.asarray(result.b_dec)).to(merged.b_dec)
    if tuple(w.shape) != tuple(merged.W_dec.shape):
        raise ValueError(
            f"refit W_dec has shape {tuple(w.shape)}, expected {tuple(merged.W_dec.shape)}"
        )
    # pre = (x - b_dec) @ W_enc + b_enc: move b_dec's change into b_enc.
    merged.b_enc.add_(
        (b_new - merged.b_dec).double() @ merged.W_enc.double().to(merged.b_enc.device)
    )
    merged.b_dec.copy_(b_new)
    merged.W_dec.copy_(w)
    return merged


def refit_decoder(
    merged: SparseAutoencoder,
    data=None,
    *,
    stats: RidgeStats | None = None,
    ridge_lambda: float = 1e-4,
    fit_bias: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
) -> RefitResult:
    """Refit ``merged``'s decoder in place by streaming ridge regression; returns the result.

    Give ``data`` (a store or activation chunks, streamed once) or precomputed ``stats`` of
    the merged codes (e.g. ``original_stats.merged(labels)`` for sum aggregation). The
    ridge prior is the current decoder (the medoid rows after :func:`build_merged_sae`).
    """
    if stats is None:
        if data is None:
            raise ValueError("refit_decoder needs data (activations to stream) or stats")
        stats = accumulate_stats(merged, data, on_progress=on_progress)
    if stats.n_latents != merged.d_sae:
        raise ValueError(f"stats cover {stats.n_latents} latents, but the SAE has {merged.d_sae}")
    result = stats.solve(
        ridge_lambda,
        prior=merged.W_dec.detach().cpu().double(),
        fit_bias=fit_bias,
        b_dec=merged.b_dec.detach().cpu(),
    )
    apply_refit(merged, result)
    return result


def merge_and_refit_decoder(
    data_iter, model: SparseAutoencoder, M, *, ridge_lambda: float = 1e-4
) -> torch.Tensor:
    """The seed's call: refit decoder ``[d_model, K']`` for the merge matrix ``M`` ``[K, K']``.

    ``data_iter`` yields activation chunks ``[n, d_model]`` (or is an ``ActivationStore``).
    Merged codes are ``model.encode(x) @ M`` (sum aggregation); ``model.b_dec`` is kept, so
    ``x_hat = (z @ M) @ W_new.T + model.b_dec``. The result has the seed's
    ``model.dec.weight`` layout (latents are columns); the ridge shrinks towards zero.
    """
    if not isinstance(model, SparseAutoencoder):
        raise TypeError(f"model: expected a SparseAutoencoder, got {type(model).__name__}")
    lab = labels_from_merge_matrix(M)
    if lab.size != model.d_sae:
        raise ValueError(f"M has {lab.size} rows, but the model has K={model.d_sae} latents")
    stats = accumulate_stats(model, data_iter).merged(lab)
    result = stats.solve(ridge_lambda, fit_bias=False, b_dec=model.b_dec.detach().cpu())
    return torch.from_numpy(result.W_dec.T.copy()).float()
