"""Distances between SAE latents: decoder cosine, encoder cosine, co-activation, and mixes.

A :class:`LatentSimilarity` turns an SAE (and, for co-activation, a sparse firing matrix
``[n_tokens, K]``) into distances between its ``K`` latents, computed block by block so
that neither mode needs more than ``block_rows x K`` values at once:

- ``decoder``: ``1 - cos(W_dec[i], W_dec[j])`` (decoder rows, ``W_dec`` is ``[K, d]``);
- ``encoder``: ``1 - cos(W_enc[:, i], W_enc[:, j])`` (encoder columns, ``W_enc`` is ``[d, K]``);
- ``coactivation``: ``1 - Jaccard(F_i, F_j)`` where ``F_i`` is the set of tokens (or
  documents, see :func:`latent_firing`) on which latent ``i`` fires, or ``1 - phi(F_i, F_j)``
  (the Pearson correlation of the firing indicators) with ``coactivation="correlation"``;
- ``reconstruction``: what merging the pair costs. With the original codes' Gram matrix
  ``G = Z^T Z`` and decoder rows ``w``, replacing ``z_i w_i + z_j w_j`` by ``(z_i + z_j) w`` with
  the best shared row ``w`` loses ``Q - |c|^2 / S`` of squared error, where
  ``Q = G_ii |w_i|^2 + 2 G_ij w_i.w_j + G_jj |w_j|^2``, ``c = (G_ii + G_ij) w_i + (G_ij + G_jj) w_j``
  and ``S = G_ii + 2 G_ij + G_jj``. The distance is that loss times ``K / SST`` (the total
  variance of the fit tokens): about 1 for merging two latents of average weight, 0 for
  latents that never fire. It keeps heavily used latents apart and merges cheap ones.
- ``labels``: the total variation distance between two latents' label distributions over the
  documents they fire in (:func:`label_profiles`, on labelled training documents), each shrunk
  towards the base rates by a prior worth ``LABEL_PRIOR_DOCS`` documents. Two latents of the
  same topic are close, a topical latent and one that fires alike in every label are far
  apart (up to 0.75 for a pure latent of one of four balanced labels): it keeps label-specific
  latents out of clusters whose heavier members would dilute them. It needs a labelled store.

A mix ``{"decoder": 0.5, "coactivation": 0.5}`` is the weighted mean of the distances.
``distance_matrix()`` gives the dense ``[K, K]`` matrix; ``knn_edges(n)`` the ``n`` nearest
neighbours of every latent as an edge list (memory ``O(K n)``), for the k-NN graph mode.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from integral_superposition.analysis import jaccard_sparse
from integral_superposition.sae.encode import encode_chunks
from integral_superposition.sae.model import SparseAutoencoder

SIMILARITIES = ("decoder", "encoder", "coactivation", "reconstruction", "labels")
LABEL_PRIOR_DOCS = 10.0
"""Weight of the base rates in a latent's label profile, in documents (:func:`label_profiles`)."""
COACTIVATION_KINDS = ("jaccard", "correlation")
COACTIVATION_LEVELS = ("token", "document")


def check_similarity_weights(weights: Mapping[str, float] | str) -> dict[str, float]:
    """Normalise ``"decoder"`` or ``{"decoder": 1, "coactivation": 0.5}`` to weights summing to 1."""
    if isinstance(weights, str):
        weights = {weights: 1.0}
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError(
            f"similarity={weights!r}: expected a name in {SIMILARITIES} or a non-empty mapping of them to weights"
        )
    out: dict[str, float] = {}
    for name, w in weights.items():
        if name not in SIMILARITIES:
            raise ValueError(
                f"similarity={dict(weights)!r}: unknown name {name!r}; expected {SIMILARITIES}"
            )
        w = float(w)
        if not np.isfinite(w) or w < 0:
            raise ValueError(
                f"similarity weight for {name!r} is {w}: expected a finite number >= 0"
            )
        if w > 0:
            out[name] = w
    total = sum(out.values())
    if total <= 0:
        raise ValueError(f"similarity={dict(weights)!r}: at least one weight must be > 0")
    return {k: v / total for k, v in out.items()}


def _unit_rows(w: torch.Tensor) -> torch.Tensor:
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def latent_firing(
    sae: SparseAutoencoder,
    store,
    mask: np.ndarray | None = None,
    chunk_tokens: int = 16384,
    on_progress: Callable[[int, int], None] | None = None,
    level: str = "token",
) -> sp.csr_matrix:
    """Which latents fire where: 0/1 CSR ``[n_rows, d_sae]`` over the ``store`` rows in ``mask``.

    ``level="token"``: one row per token; ``"document"``: one row per document, a latent
    firing in a document when it fires on any of its tokens. Memory is ``O(nnz)``; the
    latents are those of ``sae.encode`` (:func:`integral_superposition.sae.encode.encode_chunks`).
    """
    if level not in COACTIVATION_LEVELS:
        raise ValueError(f"level={level!r}: expected one of {COACTIVATION_LEVELS}")
    rows, cols = [], []
    n = 0
    total = int(mask.sum()) if mask is not None else store.n_tokens
    for ids, _x, codes, _ in encode_chunks(
        sae, store, chunk_tokens=chunk_tokens, mask=mask, sparse=True
    ):
        rows.append(ids[codes.t.cpu().numpy()])
        cols.append(codes.j.cpu().numpy().astype(np.int32))
        n += codes.n_rows
        if on_progress is not None:
            on_progress(n, total)
    if n == 0:
        raise ValueError("latent_firing: the selected token set is empty")
    r = np.concatenate(rows)
    selected = np.flatnonzero(mask) if mask is not None else np.arange(store.n_tokens)
    if level == "document":
        if getattr(store, "doc_ids", None) is None:
            raise ValueError("level='document' needs a store with doc_ids (an ActivationStore)")
        docs, doc_of = np.unique(store.doc_ids[selected], return_inverse=True)
        row_of = np.empty(store.n_tokens, dtype=np.int64)
        row_of[selected] = doc_of
        return jaccard_sparse.firing_matrix(row_of[r], np.concatenate(cols), sae.d_sae, docs.size)
    row_of = np.empty(store.n_tokens, dtype=np.int64)
    row_of[selected] = np.arange(selected.size)
    return jaccard_sparse.firing_matrix(row_of[r], np.concatenate(cols), sae.d_sae, n)


def label_profiles(
    firing: sp.sparray | sp.spmatrix,
    doc_labels: np.ndarray,
    n_labels: int,
    prior_docs: float = LABEL_PRIOR_DOCS,
) -> np.ndarray:
    """``[K, n_labels]`` label distribution of each latent over the documents it fires in.

    ``firing`` is the document-level firing matrix ``[D, K]`` (:func:`latent_firing` with
    ``level="document"``) and ``doc_labels`` ``[D]`` the label id of each of its rows (negative:
    unlabelled, left out). Row ``i`` is ``(n_i + prior_docs * base) / (N_i + prior_docs)``, where
    ``n_i`` counts the labelled documents of each label in which latent ``i`` fires, ``N_i``
    their total and ``base`` the labels' shares of all labelled documents: a latent that fires
    in few documents stays near the base rates, one that never fires is at them."""
    f = sp.csr_array(firing)
    doc_labels = np.asarray(doc_labels)
    if doc_labels.shape != (f.shape[0],):
        raise ValueError(
            f"doc_labels has shape {doc_labels.shape}: expected [{f.shape[0]}], one per firing row"
        )
    if n_labels < 2:
        raise ValueError(f"n_labels={n_labels}: expected at least 2 labels")
    if not np.isfinite(prior_docs) or prior_docs <= 0:
        raise ValueError(f"prior_docs={prior_docs!r}: expected a finite number > 0")
    ok = doc_labels >= 0
    if (doc_labels[ok] >= n_labels).any():
        raise ValueError(f"doc_labels: values up to {int(doc_labels.max())}, expected < {n_labels}")
    if not ok.any():
        raise ValueError("doc_labels: no labelled document to build label profiles from")
    y = sp.csr_array(
        (np.ones(int(ok.sum())), (np.flatnonzero(ok), doc_labels[ok].astype(np.int64))),
        shape=(f.shape[0], n_labels),
    )
    counts = np.asarray((f.T.astype(np.float64) @ y).toarray())  # [K, L]
    base = np.bincount(doc_labels[ok].astype(np.int64), minlength=n_labels) / ok.sum()
    return (counts + prior_docs * base) / (counts.sum(1, keepdims=True) + prior_docs)


@dataclass
class KnnEdges:
    """A symmetric k-NN distance graph as an edge list: both directions, no self loops."""

    n: int
    rows: np.ndarray  # int64 [E]
    cols: np.ndarray  # int64 [E]
    dist: np.ndarray  # float64 [E]

    def to_sparse(self) -> sp.csr_array:
        """``[n, n]`` CSR of the distances (a stored zero distance stays stored)."""
        return sp.csr_array((self.dist, (self.rows, self.cols)), shape=(self.n, self.n))


class LatentSimilarity:
    """Blockwise distances between the ``K`` latents of ``sae``.

    ``weights``: a similarity name or a mapping name -> weight (see module docstring).
    ``firing``: boolean ``[n_tokens, K]`` (scipy sparse) firing matrix, required when
    ``coactivation`` has a weight (build it with :func:`latent_firing`).
    ``stats``: ridge statistics of the original codes (``merge.refit.RidgeStats``, its dense
    ``gram`` ``[K, K]``), required when ``reconstruction`` has a weight.
    ``profiles``: ``[K, n_labels]`` label distributions (:func:`label_profiles`), required when
    ``labels`` has a weight.
    ``dtype``: float dtype of the cosine computations (float64 for exact small problems).
    """

    def __init__(
        self,
        sae: SparseAutoencoder | None = None,
        weights: Mapping[str, float] | str = "decoder",
        *,
        firing: sp.sparray | sp.spmatrix | None = None,
        coactivation: str = "jaccard",
        stats=None,
        profiles: np.ndarray | None = None,
        decoder: torch.Tensor | np.ndarray | None = None,
        encoder: torch.Tensor | np.ndarray | None = None,
        dtype: torch.dtype = torch.float32,
        block_rows: int = 512,
    ):
        self.weights = check_similarity_weights(weights)
        if coactivation not in COACTIVATION_KINDS:
            raise ValueError(f"coactivation={coactivation!r}: expected one of {COACTIVATION_KINDS}")
        self.coactivation = coactivation
        self.block_rows = int(block_rows)
        self.dtype = dtype
        if "decoder" in self.weights and decoder is None:
            if sae is None:
                raise ValueError("decoder similarity needs an SAE or decoder rows [K, d]")
            decoder = sae.W_dec.detach()
        if "encoder" in self.weights and encoder is None:
            if sae is None:
                raise ValueError("encoder similarity needs an SAE or encoder rows [K, d]")
            encoder = sae.W_enc.detach().T
        self._dec = (
            _unit_rows(torch.as_tensor(decoder).to("cpu", dtype)) if decoder is not None else None
        )
        self._enc = (
            _unit_rows(torch.as_tensor(encoder).to("cpu", dtype)) if encoder is not None else None
        )
        sizes = {t.shape[0] for t in (self._dec, self._enc) if t is not None}
        self._gram: np.ndarray | None = None
        if "reconstruction" in self.weights:
            if stats is None or sae is None:
                raise ValueError(
                    "reconstruction similarity needs the SAE and stats= (merge.refit.RidgeStats of its codes)"
                )
            w = sae.W_dec.detach().cpu().double().numpy()
            if stats.gram.shape != (w.shape[0], w.shape[0]):
                raise ValueError(
                    f"stats.gram has shape {stats.gram.shape}, expected {(w.shape[0],) * 2}"
                )
            self._gram, self._w = stats.gram, w
            self._w_sq = np.einsum("kd,kd->k", w, w)
            sst = stats.x_sq - float(stats.x_sum @ stats.x_sum) / max(stats.n, 1)
            self._recon_scale = w.shape[0] / max(sst, 1e-300)
            sizes.add(w.shape[0])
        self._fire_t: sp.csr_array | None = None
        if "coactivation" in self.weights:
            if firing is None:
                raise ValueError(
                    "coactivation similarity needs firing= (a [n_tokens, K] sparse matrix from merge.similarity.latent_firing)"
                )
            f = sp.csr_array(firing).astype(np.float32)
            self.n_tokens = int(f.shape[0])
            self._fire_t = sp.csr_array(f.T)  # [K, n_tokens]
            self._count = np.asarray(self._fire_t.sum(axis=1)).ravel().astype(np.float64)
            sizes.add(int(f.shape[1]))
        self._profiles: np.ndarray | None = None
        if "labels" in self.weights:
            if profiles is None:
                raise ValueError(
                    "labels similarity needs profiles= (a [K, n_labels] matrix from merge.similarity.label_profiles)"
                )
            prof = np.asarray(profiles, dtype=np.float64)
            if prof.ndim != 2 or not np.isfinite(prof).all():
                raise ValueError(
                    f"profiles has shape {prof.shape}: expected a finite [K, n_labels] matrix"
                )
            self._profiles = prof
            sizes.add(prof.shape[0])
        if len(sizes) != 1:
            raise ValueError(
                f"the similarity inputs disagree on the number of latents: {sorted(sizes)}"
            )
        self.n_latents = sizes.pop()

    def __repr__(self) -> str:
        return f"LatentSimilarity(K={self.n_latents}, weights={self.weights}, coactivation={self.coactivation!r})"

    @property
    def is_cosine_only(self) -> bool:
        """True when every part is a cosine of vectors (medoids need no pairwise pass)."""
        return set(self.weights) <= {"decoder", "encoder"}

    def cosine_features(self) -> torch.Tensor:
        """``[K, f]`` rows whose dot products are the weighted cosine similarity (cosine parts only)."""
        parts = []
        for name, t in (("decoder", self._dec), ("encoder", self._enc)):
            if name in self.weights:
                parts.append(t * self.weights[name] ** 0.5)
        return torch.cat(parts, dim=1)

    def _coact_block(self, rows: np.ndarray, cols: np.ndarray | None) -> np.ndarray:
        ft = self._fire_t
        right = ft if cols is None else ft[cols]
        inter = (ft[rows] @ right.T).toarray().astype(np.float64)  # co-firing counts
        nr = self._count[rows][:, None]
        nc = (self._count if cols is None else self._count[cols])[None, :]
        if self.coactivation == "jaccard":
            union = nr + nc - inter
            sim = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        else:
            n = float(self.n_tokens)
            den = np.sqrt(nr * (n - nr) * nc * (n - nc))
            sim = np.divide(n * inter - nr * nc, den, out=np.zeros_like(inter), where=den > 0)
        return 1.0 - sim

    def _reconstruction_block(self, rows: np.ndarray, cols: np.ndarray | None) -> np.ndarray:
        g, w, nw = self._gram, self._w, self._w_sq
        cols = np.arange(g.shape[0]) if cols is None else cols
        g_ab = g[np.ix_(rows, cols)]
        g_aa, g_bb = np.diag(g)[rows][:, None], np.diag(g)[cols][None, :]
        n_a, n_b = nw[rows][:, None], nw[cols][None, :]
        dot = w[rows] @ w[cols].T
        q = g_aa * n_a + 2 * g_ab * dot + g_bb * n_b
        ca, cb = g_aa + g_ab, g_ab + g_bb
        c_sq = ca * ca * n_a + 2 * ca * cb * dot + cb * cb * n_b
        s = g_aa + 2 * g_ab + g_bb
        loss = np.where(s > 0, q - c_sq / np.where(s > 0, s, 1.0), 0.0)
        return np.maximum(loss, 0.0) * self._recon_scale

    def _labels_block(self, rows: np.ndarray, cols: np.ndarray | None) -> np.ndarray:
        p = self._profiles
        right = p if cols is None else p[cols]
        # total variation distance, label by label (few labels: [rows, K] per label)
        out = np.zeros((len(rows), right.shape[0]))
        for c in range(p.shape[1]):
            out += np.abs(p[rows, c][:, None] - right[:, c][None, :])
        return 0.5 * out

    def _block(self, rows: np.ndarray, cols: np.ndarray | None) -> torch.Tensor:
        """Distances ``[len(rows), len(cols)]`` as a torch tensor in the similarity's dtype."""
        rows_t = torch.from_numpy(rows)
        cols_t = None if cols is None else torch.from_numpy(cols)
        out = None
        for name, t in (("decoder", self._dec), ("encoder", self._enc)):
            if name in self.weights:
                right = t if cols_t is None else t[cols_t]
                part = t[rows_t] @ right.T
                part.mul_(-self.weights[name]).add_(self.weights[name])
                out = part if out is None else out.add_(part)
        for name, fn in (
            ("coactivation", self._coact_block),
            ("reconstruction", self._reconstruction_block),
            ("labels", self._labels_block),
        ):
            if name in self.weights:
                part = torch.from_numpy(fn(rows, cols)).to(self.dtype).mul_(self.weights[name])
                out = part if out is None else out.add_(part)
        return out.clamp_min_(0.0)  # rounding can dip a cosine distance below zero

    def distance_block(self, rows: np.ndarray, cols: np.ndarray | None = None) -> np.ndarray:
        """Distances ``[len(rows), len(cols)]`` (``cols=None``: all ``K`` latents), float64."""
        rows = np.asarray(rows, dtype=np.int64)
        cols = None if cols is None else np.asarray(cols, dtype=np.int64)
        return self._block(rows, cols).double().numpy()

    def distance_matrix(self) -> np.ndarray:
        """The dense, exactly symmetric ``[K, K]`` distance matrix (float64, zero diagonal)."""
        k = self.n_latents
        d = np.empty((k, k), dtype=np.float64)
        for a in range(0, k, self.block_rows):
            b = min(k, a + self.block_rows)
            d[a:b] = self.distance_block(np.arange(a, b))
        d += d.T
        d *= 0.5
        np.fill_diagonal(d, 0.0)
        np.maximum(d, 0.0, out=d)
        return d

    def knn_edges(self, n_neighbors: int) -> KnnEdges:
        """The symmetrised ``n_neighbors``-nearest-neighbour graph (memory ``O(K n_neighbors)``)."""
        k = self.n_latents
        if not 1 <= n_neighbors < k:
            raise ValueError(f"n_neighbors={n_neighbors}: expected 1 <= n_neighbors < K={k}")
        rows, cols, dists = [], [], []
        for a in range(0, k, self.block_rows):
            b = min(k, a + self.block_rows)
            block = self._block(np.arange(a, b), None)
            block[torch.arange(b - a), torch.arange(a, b)] = float("inf")
            top = block.topk(n_neighbors, dim=1, largest=False)
            rows.append(np.repeat(np.arange(a, b), n_neighbors))
            cols.append(top.indices.numpy().ravel())
            dists.append(top.values.double().numpy().ravel())
        r, c, d = np.concatenate(rows), np.concatenate(cols), np.concatenate(dists)
        d = np.maximum(d, 0.0)
        # Union of both directions; an edge found from both ends keeps one distance.
        r2, c2, d2 = np.concatenate([r, c]), np.concatenate([c, r]), np.concatenate([d, d])
        key = r2.astype(np.int64) * k + c2
        key, first = np.unique(key, return_index=True)
        return KnnEdges(k, key // k, key % k, d2[first])
