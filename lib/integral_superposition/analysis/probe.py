"""Sparse probing (as in SAEBench): per label, a one-vs-rest logistic probe on ``k`` latents,
scored on held-out documents, against a dense probe on the raw activations and a probe on
``k`` random live latents.

The method follows SAEBench's sparse probing:

- features are per-document means over the document's tokens: of each SAE latent (the
  pipeline divides the scan's ``doc_sum`` by the document length) and, for the dense probe,
  of the raw activations;
- each one-vs-rest task is class-balanced: all documents of the label and as many others,
  drawn evenly from the other labels (seeded), separately in the training and the test split;
- the ``k`` latents are chosen on the balanced *training* documents only, so the test
  documents never influence which latents a probe sees. By default (``rank_by="forward"``)
  greedy forward selection: the first latent has the largest standardised difference of class
  means, and each next one the largest logistic score statistic given those already chosen,
  so a near-duplicate of a chosen latent (SAEs split one feature over several latents) is not
  taken again. ``"std_diff"`` takes the top ``k`` by the absolute *standardised* difference of
  class means (Cohen's d: the difference over the pooled within-class deviation), which puts
  near-duplicates side by side. SAEBench ranks by the raw difference (``"mean_diff"``); that
  is not scale-free, so a latent that fires on most tokens with a large activation, and
  differs between the classes by a small fraction of its spread, outranks a clean label latent
  of smaller scale, while the probe itself sees standardised features. On the AG News run
  (docs/analysis.md) the raw difference put the SAE's 34 dense latents first for every label;
- scikit-learn's L2 logistic regression (lbfgs, 1000 iterations) on features standardised
  with the training documents' mean and deviation, its inverse regularisation strength ``C``
  chosen for each probe by stratified cross-validation (log loss) on the balanced *training*
  documents from a grid (``LogisticRegressionCV``; default ``CS``, decade steps from 1e-3
  to 100)
  - the same for the SAE, random and dense probes, so no probe keeps a fixed ``C`` that suits
  one width and not another (a 640-wide dense probe on 1,800 documents wants a much stronger
  penalty than a one-latent probe); accuracy, balanced accuracy and F1 on the balanced test
  documents. SAEBench fits unscaled features; a residual stream with a few massive dimensions
  (gemma-3-270m layer 6: per-document means up to 2,700 against a typical 5-15) leaves that
  fit unconverged after 1000 iterations (75 s per label on two cores), while the standardised
  one converges in about 65.

Each accuracy comes with its 95% Wilson score interval (``scipy.stats.binomtest``): the test
sets are small (about a hundred balanced documents per label), so two probes a few points apart
are often not distinguishable. On the balanced test documents the balanced accuracy equals
the accuracy, and so does its interval.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from scipy import sparse
from scipy.special import expit
from scipy.stats import binomtest
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

__all__ = [
    "CS",
    "RANK_BY",
    "balanced_task",
    "doc_latent_matrix",
    "doc_mean_activations",
    "mean_over_labels",
    "rank_latents",
    "sparse_probe",
    "wilson_interval",
]

PROBE_COLUMNS = [
    "label", "label_id", "method", "k", "accuracy", "accuracy_low", "accuracy_high",
    "balanced_accuracy", "f1", "n_train", "n_test", "n_test_pos", "n_correct", "C", "latents",
]  # fmt: skip

CS = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)
"""The inverse regularisation strengths a probe's ``C`` is chosen from (decade steps)."""


def doc_latent_matrix(
    doc_pairs: np.ndarray, doc_max: np.ndarray, doc_ids: np.ndarray, n_latents: int
) -> sparse.csr_matrix:
    """Sparse ``[D, K]`` document features from ``(doc_id, latent)`` pairs ``[P, 2]`` and their
    values ``[P]`` (e.g. the scan's ``doc_max``, or ``doc_sum`` over the document lengths);
    rows follow ``doc_ids [D]`` (sorted, unique); pairs of other documents are dropped."""
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


RANK_BY = ("std_diff", "mean_diff", "forward")
"""Latent orders of a probe: standardised (Cohen's d) or raw difference of class means, or
greedy forward selection by the logistic score test (each latent judged given those before it)."""

FORWARD_C = 1.0
"""Inverse L2 regularisation strength of the logistic fits inside forward selection (on
standardised features; the probe itself then chooses its own ``C``)."""


def _class_mean_diff(F: sparse.csr_matrix, positive: np.ndarray, by: str) -> np.ndarray:
    """``[K]`` absolute difference of class means, over the pooled within-class deviation when
    ``by="std_diff"`` (0 for a latent constant in both classes)."""
    parts = (F[positive], F[~positive])
    mean = [np.asarray(A.mean(0)).ravel() for A in parts]
    diff = np.abs(mean[0] - mean[1])
    if by == "std_diff":
        var = [
            np.maximum(np.asarray(A.multiply(A).mean(0)).ravel() - mu * mu, 0.0)
            for A, mu in zip(parts, mean, strict=True)
        ]
        sd = np.sqrt((var[0] + var[1]) / 2)
        diff = np.divide(diff, sd, out=np.zeros_like(diff), where=sd > 0)
    return diff


def _forward_order(F: sparse.csr_matrix, positive: np.ndarray, steps: int) -> list[int]:
    """The first ``steps`` latents of greedy forward selection (grafting) on ``F [n, K]``.

    Features are standardised (column mean and deviation over the ``n`` documents, never
    densified). At each step a logistic regression (L2, ``FORWARD_C``) is fitted on the latents
    chosen so far and the next latent is the one with the largest score statistic
    ``|z_j . (y - p)| / sqrt(z_j^2 . p (1 - p))``: the Rao score test of adding it to that fit.
    The first step (``p`` the base rate) ranks by the standardised difference of class means;
    later ones judge a latent by what the chosen ones leave unexplained, so a near-duplicate of
    a chosen latent scores near 0."""
    n = F.shape[0]
    y = positive.astype(np.float64)
    mu = np.asarray(F.mean(0)).ravel()
    sq = F.multiply(F).tocsr()
    sd = np.sqrt(np.maximum(np.asarray(sq.mean(0)).ravel() - mu * mu, 0.0))
    live = sd > 1e-12 * np.maximum(np.abs(mu), 1.0)
    inv_sd = np.divide(1.0, sd, out=np.zeros_like(sd), where=live)
    Ft, sqt = F.T.tocsr(), sq.T.tocsr()
    chosen: list[int] = []
    p = np.full(n, y.mean())
    for _ in range(min(int(steps), int(live.sum()))):
        r, w = y - p, p * (1.0 - p)
        grad = (Ft @ r - mu * r.sum()) * inv_sd
        info = (sqt @ w - 2.0 * mu * (Ft @ w) + mu * mu * w.sum()) * inv_sd * inv_sd
        stat = np.divide(np.abs(grad), np.sqrt(np.maximum(info, 0.0)), out=np.zeros(mu.size),
                         where=live & (info > 0))  # fmt: skip
        stat[chosen] = -1.0
        stat[~live] = -1.0
        j = int(np.argmax(stat))  # ties: lower id
        if stat[j] < 0:
            break
        chosen.append(j)
        Z = (F[:, chosen].toarray() - mu[chosen]) * inv_sd[chosen]
        lr = LogisticRegression(C=FORWARD_C, max_iter=1000).fit(Z, positive)
        p = np.clip(lr.predict_proba(Z)[:, 1], 1e-12, 1.0 - 1e-12)
    return chosen


def rank_latents(
    F: sparse.spmatrix | np.ndarray,
    positive: np.ndarray,
    by: str = "std_diff",
    forward_steps: int = 20,
) -> np.ndarray:
    """Latents ``[K]`` ordered for a probe of the ``positive [D]`` (bool) documents against
    the others, best first (ties: lower id).

    ``by="std_diff"``: the absolute difference of class means over the pooled within-class
    standard deviation ``sqrt((var_pos + var_neg) / 2)`` (Cohen's d; a latent constant in both
    classes scores 0). ``by="mean_diff"``: the absolute difference itself (SAEBench).
    ``by="forward"``: the first ``forward_steps`` latents by greedy forward selection
    (:func:`_forward_order`), the rest after them by ``std_diff``."""
    if by not in RANK_BY:
        raise ValueError(f"by={by!r}: expected one of {RANK_BY}")
    if isinstance(forward_steps, bool) or int(forward_steps) != forward_steps or forward_steps < 1:
        raise ValueError(f"forward_steps={forward_steps!r}: expected a positive whole number")
    F = sparse.csr_matrix(F, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    if positive.shape != (F.shape[0],):
        raise ValueError(
            f"positive has shape {positive.shape}: expected ({F.shape[0]},), one per row of F"
        )
    if not (positive.any() and (~positive).any()):
        raise ValueError("positive: expected both positive and negative documents to rank on")
    stat = "mean_diff" if by == "mean_diff" else "std_diff"
    order = np.argsort(-_class_mean_diff(F, positive, stat), kind="stable")
    if by != "forward":
        return order
    first = _forward_order(F, positive, int(forward_steps))
    rest = order[~np.isin(order, first)]
    return np.concatenate([np.asarray(first, dtype=np.int64), rest])


def balanced_task(
    docs: np.ndarray, y: np.ndarray, label: int, rng: np.random.Generator
) -> np.ndarray:
    """A class-balanced one-vs-rest subset of ``docs`` (indices ``[n]``, labels ``y`` per
    index): every document of ``label`` and as many others, an equal share from each other
    label (as many as it has when fewer), topped up from the rest; fewer positives are drawn
    when the others are fewer. Returns sorted indices."""
    docs = np.asarray(docs, dtype=np.int64)
    lab = np.asarray(y)[docs]
    pos, neg = docs[lab == label], docs[lab != label]
    n = min(pos.size, neg.size)
    pos = np.sort(rng.choice(pos, n, replace=False)) if n < pos.size else pos
    others = np.unique(lab[lab != label])
    share = -(-n // max(others.size, 1))
    picked = [rng.permutation(neg[lab[lab != label] == c])[:share] for c in others]
    chosen = np.concatenate(picked) if picked else np.zeros(0, np.int64)
    if chosen.size > n:
        chosen = rng.choice(chosen, n, replace=False)
    elif chosen.size < n:
        rest = np.setdiff1d(neg, chosen)
        chosen = np.concatenate([chosen, rng.choice(rest, n - chosen.size, replace=False)])
    return np.sort(np.concatenate([pos, chosen]))


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval ``(low, high)`` of the proportion ``successes / n``."""
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"n={n!r}: expected a positive number of trials")
    if isinstance(successes, bool) or int(successes) != successes or not 0 <= successes <= n:
        raise ValueError(f"successes={successes!r}: expected a whole number in [0, n={n}]")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence!r}: expected a level in (0, 1)")
    ci = binomtest(int(successes), int(n)).proportion_ci(confidence, method="wilson")
    return float(ci.low), float(ci.high)


# scikit-learn 1.8 asks for the L2 penalty as ``l1_ratios=(0,)`` and for the simplified
# fitted attributes; earlier versions have neither parameter (L2 is their default)
_CV_L2 = (
    {"l1_ratios": (0.0,), "use_legacy_attributes": False}
    if "use_legacy_attributes" in LogisticRegressionCV().get_params()
    else {}
)


def _neg_log_loss(estimator, X, y) -> float:
    """scikit-learn's ``neg_log_loss`` of a fitted binary logistic ``estimator`` on ``X [n, w]``
    / ``y [n]`` (probabilities clipped to ``[eps, 1 - eps]`` of their dtype, as it does),
    without the per-call input checks that made scoring cost more than fitting: the
    cross-validation scores each of its folds at every ``C``."""
    p = expit(np.asarray(X) @ estimator.coef_.T + estimator.intercept_).ravel()
    p_true = np.where(np.asarray(y) == estimator.classes_[1], p, 1.0 - p)
    eps = np.finfo(p.dtype).eps
    return float(np.mean(np.log(np.clip(p_true, eps, 1.0 - eps))))


def _fit_score(
    Xtr, ytr, Xte, yte, seed: int, cs: Sequence[float], folds: int
) -> dict[str, float | int]:
    """Fit a standardised L2 logistic probe on ``Xtr [n, w]`` / ``ytr [n]``, its ``C`` chosen
    by ``folds``-fold stratified cross-validation on these training rows from ``cs`` (one value,
    or too few rows of a class for two folds: ``cs[0]`` as it is); score it on ``Xte``/``yte``."""
    n_fold = min(int(folds), int(np.bincount(np.asarray(ytr, dtype=np.int64)).min()))
    if len(cs) > 1 and n_fold >= 2:
        lr = LogisticRegressionCV(
            Cs=list(cs), cv=StratifiedKFold(n_fold, shuffle=True, random_state=seed),
            scoring=_neg_log_loss, max_iter=1000, **_CV_L2,
        )  # fmt: skip
    else:
        lr = LogisticRegression(C=float(cs[0]), max_iter=1000)
    clf = make_pipeline(StandardScaler(), lr).fit(Xtr, ytr)
    C = float(np.ravel(lr.C_)[0]) if isinstance(lr, LogisticRegressionCV) else float(lr.C)
    pred = clf.predict(Xte)
    correct = int((pred == yte).sum())
    low, high = wilson_interval(correct, len(yte))
    return {
        "accuracy": float(accuracy_score(yte, pred)),
        "accuracy_low": low,
        "accuracy_high": high,
        "n_correct": correct,
        "balanced_accuracy": float(balanced_accuracy_score(yte, pred)),
        "f1": float(f1_score(yte, pred, zero_division=0.0)),
        "C": C,
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
    rank_by: str = "forward",
    cs: Sequence[float] = CS,
    cv_folds: int = 5,
    seed: int = 0,
) -> pd.DataFrame:
    """k-sparse one-vs-rest logistic probes per label, scored on held-out documents (see the
    module docstring for the method).

    ``features``: ``[D, K]`` document features of the SAE latents (each latent's mean over the
    document, as SAEBench). ``doc_labels``: ``int [D]`` label ids into ``label_names``.
    ``train``: ``bool [D]``, True for training documents (the others are the test set).
    ``dense``: optional ``[D, d_model]`` raw features (the mean activation) for the dense
    baseline. ``rank_by``: the order the ``k`` latents are taken in (:func:`rank_latents`'s
    ``by``). Each label's task is class-balanced in both sets (:func:`balanced_task`, seeded
    by ``seed`` and the label); the same documents serve every method and ``k``.

    Returns one row per (label, method, k) with columns ``label, label_id, method`` (``sae``,
    ``random`` or ``dense``), ``k`` (the raw width for ``dense``), ``accuracy,
    accuracy_low, accuracy_high`` (its 95% Wilson interval), ``balanced_accuracy, f1`` (of
    the label, on the balanced test documents), ``n_train, n_test, n_test_pos`` (balanced set
    sizes), ``n_correct`` (test documents classified right), ``C`` (the probe's inverse
    regularisation strength), ``latents`` (the latents used). Labels without positive or
    negative documents in either set are left out.
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
    if rank_by not in RANK_BY:
        raise ValueError(f"rank_by={rank_by!r}: expected one of {RANK_BY}")
    cs = [float(c) for c in cs]
    if not cs or not all(np.isfinite(c) and c > 0 for c in cs):
        raise ValueError(f"cs={cs!r}: expected positive, finite inverse regularisation strengths")
    if isinstance(cv_folds, bool) or int(cv_folds) != cv_folds or cv_folds < 2:
        raise ValueError(f"cv_folds={cv_folds!r}: expected a whole number of folds, at least 2")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks={ks!r}: expected positive probe sizes")
    if dense is not None and np.shape(dense)[0] != D:
        raise ValueError(f"dense has {np.shape(dense)[0]} rows: expected {D}, one per document")
    live = np.flatnonzero(np.asarray((F[train] > 0).sum(0)).ravel() > 0)
    rng = np.random.default_rng(seed)
    X = None if dense is None else np.asarray(dense, dtype=np.float32)
    rows = []
    for c, name in enumerate(label_names):
        ytr, yte = y_all[train] == c, y_all[~train] == c
        if not (ytr.any() and (~ytr).any() and yte.any() and (~yte).any()):
            continue
        task_rng = np.random.default_rng([seed, c])
        tr = balanced_task(np.flatnonzero(train), y_all, c, task_rng)
        te = balanced_task(np.flatnonzero(~train), y_all, c, task_rng)
        ytr, yte = y_all[tr] == c, y_all[te] == c
        Ftr, Fte = F[tr], F[te]
        base = {
            "label": str(name), "label_id": c, "n_train": int(tr.size),
            "n_test": int(te.size), "n_test_pos": int(yte.sum()),
        }  # fmt: skip
        order = rank_latents(Ftr, ytr, rank_by, forward_steps=min(max(ks), K))  # training docs
        for k in ks:
            if k > K:
                continue
            sel = order[:k]
            m = _fit_score(
                Ftr[:, sel].toarray(), ytr, Fte[:, sel].toarray(), yte, seed, cs, cv_folds
            )
            rows.append({**base, "method": "sae", "k": k, **m, "latents": sel.tolist()})
            if random_baseline and k <= live.size:
                rs = np.sort(rng.choice(live, size=k, replace=False))
                m = _fit_score(
                    Ftr[:, rs].toarray(), ytr, Fte[:, rs].toarray(), yte, seed, cs, cv_folds
                )
                rows.append({**base, "method": "random", "k": k, **m, "latents": rs.tolist()})
        if X is not None:
            m = _fit_score(X[tr], ytr, X[te], yte, seed, cs, cv_folds)
            rows.append({**base, "method": "dense", "k": X.shape[1], **m, "latents": []})
    return pd.DataFrame(rows, columns=PROBE_COLUMNS)


def mean_over_labels(table: pd.DataFrame) -> pd.DataFrame:
    """Per ``(method, k)`` of a :func:`sparse_probe` table: the mean ``accuracy,
    balanced_accuracy, f1`` over labels, ``n_test`` summed and the 95% Wilson interval of the
    mean accuracy over those ``n_test`` documents (``accuracy_low, accuracy_high``).

    The interval counts every label's test documents as separate trials; the labels' tasks
    share documents, so it is somewhat narrower than the mean's true uncertainty."""
    missing = {"method", "k", "accuracy", "balanced_accuracy", "f1", "n_test"} - set(table)
    if missing:
        raise ValueError(f"table lacks the columns {sorted(missing)}: expected a probe table")
    g = table.groupby(["method", "k"], sort=True)
    out = g[["accuracy", "balanced_accuracy", "f1"]].mean()
    out["n_test"] = g["n_test"].sum()
    ci = [
        wilson_interval(round(acc * n), int(n))
        for acc, n in zip(out["accuracy"], out["n_test"], strict=True)
    ]
    out["accuracy_low"] = [lo for lo, _ in ci]
    out["accuracy_high"] = [hi for _, hi in ci]
    return out.reset_index()
