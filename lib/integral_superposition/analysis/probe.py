"""Sparse probing (as in SAEBench): per label, a one-vs-rest logistic probe on the ``k`` most
enriched latents of held-out documents, against a dense probe on the raw activations and a
probe on ``k`` random live latents.

A document's latent feature is the latent's maximum over the document's tokens; its raw
feature is the mean of its activations. Latents are ranked on the training documents only
(smoothed log odds of firing in the label's documents versus the others), so the test
documents never influence which latents a probe sees.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from scipy import sparse
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

__all__ = ["doc_latent_matrix", "doc_mean_activations", "rank_latents", "sparse_probe"]

PROBE_COLUMNS = [
    "label", "label_id", "method", "k", "accuracy", "balanced_accuracy", "f1",
    "n_train", "n_test", "n_test_pos", "latents",
]  # fmt: skip


def doc_latent_matrix(
    doc_pairs: np.ndarray, doc_max: np.ndarray, doc_ids: np.ndarray, n_latents: int
) -> sparse.csr_matrix:
    """Sparse ``[D, K]`` document features from ``(doc_id, latent)`` pairs ``[P, 2]`` and their
    maxima ``[P]``; rows follow ``doc_ids [D]`` (sorted, unique); pairs of other documents are
    dropped."""
    doc_ids = np.asarray(doc_ids, dtype=np.int64)
    pairs = np.asarray(doc_pairs, dtype=np.int64).reshape(-1, 2)
    pos = np.searchsorted(doc_ids, pairs[:, 0])
    ok = (pos < doc_ids.size) & (doc_ids[np.minimum(pos, max(doc_ids.size - 1, 0))] == pairs[:, 0])
    return sparse.csr_matrix(
        (np.asarray(doc_max, dtype=np.float32)[ok], (pos[ok], pairs[ok, 1])),
        shape=(doc_ids.size, n_latents),
    )


def doc_mean_activations(
    store, doc_ids: np.ndarray, mask: np.ndarray | None = None, chunk_tokens: int = 65536
) -> np.ndarray:
    """Mean raw activation of each document of ``doc_ids [D]`` (sorted) over the rows of
    ``mask`` (all rows when None): ``float32 [D, d_model]``."""
    doc_ids = np.asarray(doc_ids, dtype=np.int64)
    row_doc = np.asarray(store.doc_ids, dtype=np.int64)
    total = torch.zeros(doc_ids.size, store.d_model, dtype=torch.float64)
    count = torch.zeros(doc_ids.size, dtype=torch.float64)
    for rows, x in store.iter_chunks(chunk_tokens, mask=mask):
        pos = np.searchsorted(doc_ids, row_doc[rows])
        ok = (pos < doc_ids.size) & (doc_ids[np.minimum(pos, doc_ids.size - 1)] == row_doc[rows])
        idx = torch.from_numpy(pos[ok])
        total.index_add_(0, idx, x[torch.from_numpy(ok)].double())
        count.index_add_(0, idx, torch.ones(idx.numel(), dtype=torch.float64))
    return (total / count.clamp_min(1)[:, None]).float().numpy()


def rank_latents(F: sparse.csr_matrix, positive: np.ndarray) -> np.ndarray:
    """Latents ``[K]`` ordered by enrichment for ``positive [D]`` (bool) documents: smoothed log
    odds of firing in a positive versus a negative document (ties: larger mean difference)."""
    fires = (F > 0).astype(np.float64)
    pos, neg = positive, ~positive
    a = np.asarray(fires[pos].sum(0)).ravel()
    b = np.asarray(fires[neg].sum(0)).ravel()
    n1, n0 = max(int(pos.sum()), 1), max(int(neg.sum()), 1)
    lo = np.log((a + 0.5) / (n1 - a + 0.5)) - np.log((b + 0.5) / (n0 - b + 0.5))
    diff = np.asarray(F[pos].mean(0)).ravel() - np.asarray(F[neg].mean(0)).ravel()
    return np.lexsort((-diff, -lo))


def _fit_score(Xtr, ytr, Xte, yte, seed: int) -> dict[str, float]:
    clf = make_pipeline(
        StandardScaler(),
        LogisticRegression(
            class_weight="balanced", solver="liblinear", max_iter=1000, random_state=seed
        ),
    )
    clf.fit(Xtr, ytr)
    pred = clf.predict(Xte)
    return {
        "accuracy": float(accuracy_score(yte, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(yte, pred)),
        "f1": float(f1_score(yte, pred, zero_division=0.0)),
    }


def sparse_probe(
    features: sparse.spmatrix | np.ndarray,
    doc_labels: np.ndarray,
    train: np.ndarray,
    label_names: Sequence[str],
    *,
    ks: Sequence[int] = (1, 2, 5, 10, 20),
    dense: np.ndarray | None = None,
    random_baseline: bool = True,
    seed: int = 0,
) -> pd.DataFrame:
    """k-sparse one-vs-rest logistic probes per label, scored on held-out documents.

    ``features``: ``[D, K]`` document features of the SAE latents (e.g. the maximum over each
    document). ``doc_labels``: ``int [D]`` label ids into ``label_names``. ``train``:
    ``bool [D]``, True for training documents (the others are the test set). ``dense``:
    optional ``[D, d_model]`` raw features for the dense baseline. Probes are balanced
    (``class_weight="balanced"``); both accuracy and balanced accuracy are reported, with F1
    of the positive class.

    Returns one row per (label, method, k) with columns ``label, label_id, method`` (``sae``,
    ``random`` or ``dense``), ``k`` (the raw width for ``dense``), ``accuracy,
    balanced_accuracy, f1, n_train, n_test, n_test_pos, latents`` (the latents used). Labels
    without positive or negative documents in either set are left out.
    """
    F = sparse.csr_matrix(features, dtype=np.float32)
    D, K = F.shape
    y_all = np.asarray(doc_labels, dtype=np.int64)
    train = np.asarray(train, dtype=bool)
    if y_all.shape != (D,) or train.shape != (D,):
        raise ValueError(
            f"doc_labels {y_all.shape} and train {train.shape}: expected ({D},), one per "
            "document row of features"
        )
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks={ks!r}: expected positive probe sizes")
    if dense is not None and np.shape(dense)[0] != D:
        raise ValueError(f"dense has {np.shape(dense)[0]} rows: expected {D}, one per document")
    test = ~train
    Ftr, Fte = F[train], F[test]
    live = np.flatnonzero(np.asarray((Ftr > 0).sum(0)).ravel() > 0)
    rng = np.random.default_rng(seed)
    rows = []
    for c, name in enumerate(label_names):
        ytr, yte = y_all[train] == c, y_all[test] == c
        if not (ytr.any() and (~ytr).any() and yte.any() and (~yte).any()):
            continue
        base = {
            "label": str(name), "label_id": c, "n_train": int(train.sum()),
            "n_test": int(test.sum()), "n_test_pos": int(yte.sum()),
        }  # fmt: skip
        order = rank_latents(Ftr, ytr)
        for k in ks:
            if k > K:
                continue
            sel = order[:k]
            m = _fit_score(Ftr[:, sel].toarray(), ytr, Fte[:, sel].toarray(), yte, seed)
            rows.append({**base, "method": "sae", "k": k, **m, "latents": sel.tolist()})
            if random_baseline and k <= live.size:
                rs = np.sort(rng.choice(live, size=k, replace=False))
                m = _fit_score(Ftr[:, rs].toarray(), ytr, Fte[:, rs].toarray(), yte, seed)
                rows.append({**base, "method": "random", "k": k, **m, "latents": rs.tolist()})
        if dense is not None:
            X = np.asarray(dense, dtype=np.float32)
            m = _fit_score(X[train], ytr, X[test], yte, seed)
            rows.append({**base, "method": "dense", "k": X.shape[1], **m, "latents": []})
    return pd.DataFrame(rows, columns=PROBE_COLUMNS)
