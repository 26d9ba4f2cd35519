"""The label classifier that judges steered generations, and the labels' target vocabularies.

- :func:`label_vocabulary`: each label's most enriched token ids in an activation store (a
  one-sided Fisher test per token and label);
- :class:`LabelClassifier`: scikit-learn logistic regression on mean-pooled activations at the
  store's hook point, its regularisation chosen by cross-validation (:func:`cross_validated_c`),
  fitted on the store's labelled training documents and (with
  :meth:`LabelClassifier.with_generations`) on the model's own continuations of their
  openings, classes balanced; it reads any text through a backend the same way the store was
  dumped. With a ``none`` class fitted on continuations of topic-neutral openings it can
  abstain: text of no label is not forced onto one (:func:`predicted_labels`);
- :class:`TextJudge`: a second judge that reads words, not the model (TF-IDF over words and
  word pairs, logistic regression), fitted on the same texts, labels and weights, so that a
  share can be read under two judges that see text in unrelated ways.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from integral_superposition.data.tokenize import pad_batch, pad_token_id, special_ids

__all__ = [
    "ABSTAIN",
    "CLASSIFIER_CS",
    "EMPTY",
    "NONE_LABEL",
    "TEXT_JUDGE_CS",
    "LabelClassifier",
    "TextJudge",
    "balanced_weights",
    "cross_validated_c",
    "fit_weights",
    "label_prompts",
    "label_vocabulary",
    "mean_pooled_documents",
    "predicted_labels",
]

NONE_LABEL = "none"
"""The name of the abstaining classifier's extra class: text of no label."""
ABSTAIN = -2
"""Predicted code of a continuation the classifier assigns to no label (``none``)."""
EMPTY = -1
"""Predicted code of a continuation with nothing to classify."""
CLASSIFIER_CS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
"""The grid :class:`LabelClassifier`'s ``C="cv"`` chooses from (decade steps): standardised
activations, a few thousand rows, hundreds of dimensions."""
TEXT_JUDGE_CS = (1e-2, 1e-1, 1.0, 10.0, 100.0)
"""The grid :class:`TextJudge`'s ``C="cv"`` chooses from: sparse unit-norm TF-IDF rows want
a far weaker penalty than standardised activations."""
CV_FOLDS = 3
"""Stratified folds of the cross-validation (fewer where the rarest class has fewer rows)."""


def predicted_labels(proba: np.ndarray, valid: np.ndarray, n_labels: int) -> np.ndarray:
    """``[n]`` the label of each row from ``proba [n, n_labels (+1)]``: ``0..n_labels-1``,
    :data:`ABSTAIN` where the ``none`` column (index ``n_labels``) wins, :data:`EMPTY` where
    ``valid [n]`` is False (nothing to classify)."""
    arg = np.asarray(proba).argmax(1) if len(proba) else np.zeros(0, dtype=np.int64)
    arg = np.where(arg >= n_labels, ABSTAIN, arg)
    return np.where(np.asarray(valid, dtype=bool), arg, EMPTY).astype(np.int64)


# -- target vocabularies --------------------------------------------------------------------------
def label_vocabulary(
    store,
    per_label: int = 50,
    q_max: float = 1e-3,
    min_count: int = 5,
    tokenizer=None,
    words_only: bool = True,
) -> pd.DataFrame:
    """The most label-enriched token ids of ``store`` (one-sided Fisher test per token and
    label, BH q-values over all pairs).

    Returns one row per selected (label, token): ``label, label_id, token_id, token, count,
    in_label, frac_in_label, log_odds, q``, at most ``per_label`` per label, by log odds.
    With a ``tokenizer`` and ``words_only``, only tokens that read as words (three or more
    letters once stripped) are kept, which drops markup and URL debris from the vocabulary.
    """
    from integral_superposition.analysis.enrichment import fisher_table

    token_ids = np.asarray(store.token_ids, dtype=np.int64)
    labels = np.asarray(store.labels, dtype=np.int64)
    names = list(store.label_names)
    C = len(names)
    vocab, inv = np.unique(token_ids, return_inverse=True)
    in_set = np.bincount(inv * C + labels, minlength=vocab.size * C).reshape(vocab.size, C)
    table = fisher_table(in_set, in_set.sum(1), np.bincount(labels, minlength=C), names)
    keep = (table["q"] < q_max) & (table["set_size"] >= min_count) & (table["log_odds"] > 0)
    t = table[keep].sort_values(["label_id", "log_odds"], ascending=[True, False])
    text = None
    if tokenizer is not None:
        text = np.array([tokenizer.decode([int(vocab[i])]) for i in t["latent"]], dtype=object)
        if words_only:
            word = np.array([len(w.strip()) >= 3 and w.strip().isalpha() for w in text], bool)
            t, text = t[word], text[word]
    head = t.groupby("label_id", observed=True).cumcount().to_numpy() < per_label
    t = t[head]
    out = pd.DataFrame(
        {
            "label": t["label"].astype(str).to_numpy(),
            "label_id": t["label_id"].to_numpy(),
            "token_id": vocab[t["latent"].to_numpy()],
            "count": t["set_size"].to_numpy(),
            "in_label": t["in_set"].to_numpy(),
            "frac_in_label": t["frac_in_set"].to_numpy(),
            "log_odds": t["log_odds"].to_numpy(),
            "q": t["q"].to_numpy(),
        }
    )
    if text is not None:
        out.insert(3, "token", text[head])
    return out.reset_index(drop=True)


# -- the label classifier ---------------------------------------------------------------------------
def _doc_index(doc_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    uniq, inv = np.unique(doc_ids, return_inverse=True)
    return uniq, inv


def mean_pooled_documents(store, chunk_tokens: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Mean activation of every document of ``store``: ``(doc_ids [n_docs], X [n_docs, d])``."""
    docs, inv = _doc_index(np.asarray(store.doc_ids))
    sums = torch.zeros(docs.size, store.d_model, dtype=torch.float64)
    counts = np.bincount(inv, minlength=docs.size)
    for rows, x in store.iter_chunks(chunk_tokens):
        sums.index_add_(0, torch.from_numpy(inv[rows]), x.double())
    return docs, (sums / torch.from_numpy(np.maximum(counts, 1))[:, None]).float().numpy()


def balanced_weights(sources: Sequence[np.ndarray]) -> np.ndarray:
    """Sample weights ``[sum n_s]`` for training rows from several sources (each ``y_s [n_s]``
    of labels): every source carries the same total weight, and within a source every label
    present does (scikit-learn's ``"balanced"`` rule), so neither the larger source nor the
    commoner label sets the classifier's prior. Normalised to mean 1."""
    from sklearn.utils.class_weight import compute_sample_weight

    parts = [compute_sample_weight("balanced", y) / y.size for y in sources if y.size]
    w = np.concatenate(parts) if parts else np.zeros(0)
    return w * (w.size / w.sum()) if w.size else w


def fit_weights(sources: Sequence[np.ndarray], n_none: int, n_labels: int, balanced: bool):
    """Sample weights ``[sum n_s + n_none]`` of a fit on several labelled sources (each
    ``y_s [n_s]``, :func:`balanced_weights` when ``balanced``, else 1) followed by ``n_none``
    rows of the ``none`` class, which carries the total weight of one label (``n_labels``
    labels share the sources' weight). Normalised to mean 1."""
    ys = [np.asarray(y) for y in sources]
    w = balanced_weights(ys) if balanced else np.ones(sum(y.size for y in ys))
    if n_none:
        wn = np.full(n_none, w.sum() / n_labels / n_none if balanced else 1.0)
        w = np.concatenate([w, wn])
        w = w * (w.size / w.sum())
    return w


def _activation_model(C: float):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))


def cross_validated_c(
    make_model: Callable[[float], Any],
    X: Any,
    y: np.ndarray,
    w: np.ndarray,
    cs: Sequence[float] = CLASSIFIER_CS,
    folds: int = CV_FOLDS,
    seed: int = 0,
) -> tuple[float, dict[str, Any]]:
    """The ``C`` of ``cs`` whose model (``make_model(C)``: a scikit-learn pipeline of
    transforms ending in a logistic regression) has the lowest weighted log loss over stratified ``folds``-fold
    cross-validation on rows ``X [n, ...]`` (an array, or texts) with labels ``y [n]`` and
    sample weights ``w [n]``: each fold is fitted and scored with its rows' weights, and ties
    go to the smaller ``C``. The folds are as many as the rarest class has rows (at most
    ``folds``); a class with a single row is fitted in every fold and scored in none. Returns
    ``(C, {"cs", "log_loss", "folds"})``."""
    from sklearn.metrics import log_loss
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray(y, dtype=np.int64)
    w = np.asarray(w, dtype=np.float64)
    cs = sorted(float(c) for c in cs)
    if not cs or any(not np.isfinite(c) or c <= 0 for c in cs):
        raise ValueError(f"cs={cs}: expected one or more finite positive values")
    if y.ndim != 1 or y.size != w.size or len(X) != y.size:
        raise ValueError(
            f"X ({len(X)} rows), y {y.shape}, w {w.shape}: expected one label and weight per row"
        )
    classes, counts = np.unique(y, return_counts=True)
    scored = np.isin(y, classes[counts >= 2])
    if np.unique(y[scored]).size < 2:
        raise ValueError(
            f"C='cv' needs two or more rows in each of at least two classes to cross-validate; "
            f"the rows per class are {dict(zip(classes.tolist(), counts.tolist(), strict=True))}: expected "
            "more rows, or a number for C (classifier_c)"
        )
    n_fold = min(int(folds), int(counts[counts >= 2].min()))
    rows = np.asarray(X, dtype=object) if isinstance(X, list | tuple) else X
    kept, idx = np.flatnonzero(~scored), np.flatnonzero(scored)
    loss = np.zeros(len(cs))
    split = StratifiedKFold(n_fold, shuffle=True, random_state=seed).split(idx, y[idx])
    for tr, va in split:
        tr, va = np.concatenate([idx[tr], kept]), idx[va]
        # the fold's transforms (scaler, vocabulary) once; the regression along the grid,
        # each C started from the previous one's solution
        model = make_model(cs[0])
        head = model[:-1]
        Xtr = head.fit_transform(rows[tr], y[tr])
        Xva = head.transform(rows[va])
        lr = model[-1].set_params(warm_start=True)
        for i, c in enumerate(cs):
            lr.set_params(C=c).fit(Xtr, y[tr], sample_weight=w[tr])
            proba = np.zeros((va.size, classes.size))
            proba[:, np.searchsorted(classes, lr.classes_)] = lr.predict_proba(Xva)
            proba /= proba.sum(1, keepdims=True)  # float32 rows off one by rounding
            ll = log_loss(y[va], proba, sample_weight=w[va], labels=classes)
            loss[i] += ll * w[va].sum()
    loss /= w[idx].sum()
    best = int(np.argmin(loss))
    return cs[best], {"cs": cs, "log_loss": [float(v) for v in loss], "folds": n_fold}


def _check_c(C: Any) -> None:
    ok = C == "cv" or (
        isinstance(C, int | float) and not isinstance(C, bool) and np.isfinite(C) and C > 0
    )
    if not ok:
        raise ValueError(f"C={C!r}: expected a positive number or 'cv' (cross-validated)")


def _fit_model(
    X: np.ndarray, y: np.ndarray, w: np.ndarray, C: float | str, seed: int = 0
) -> tuple[Any, float, dict[str, Any] | None]:
    """``(pipeline, C, search)``: standardise + logistic regression fitted on ``X [n, d]``,
    ``C`` as given or (``"cv"``) chosen by :func:`cross_validated_c` (``search``: its scores)."""
    search = None
    _check_c(C)
    if C == "cv":
        C, search = cross_validated_c(_activation_model, X, y, w, CLASSIFIER_CS, seed=seed)
    model = _activation_model(float(C))
    model.fit(X, y, logisticregression__sample_weight=w)
    return model, float(C), search


@dataclass
class LabelClassifier:
    """Logistic regression on mean-pooled activations at ``hook_point``, fitted on a store's
    labelled training documents (and, after :meth:`with_generations`, on the model's own
    continuations of their openings), every label carrying the same weight; scores texts read
    by a backend the same way the store was dumped."""

    model: Any
    """The fitted scikit-learn pipeline (standardise, then logistic regression)."""
    label_names: list[str]
    hook_point: str
    max_len: int
    prepend_bos: bool
    accuracy: float
    """Accuracy on the held-out documents."""
    n_train: int
    n_test: int
    test_doc_ids: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, np.int64))
    """The held-out documents: those of the store's ``split_mask("test", test_fraction, seed)``."""
    test_fraction: float = 0.05
    split_seed: int = 0
    test_recall: list[float] = field(default_factory=list)
    """Per label: the fraction of its held-out documents predicted as it (nan: none held out)."""
    test_docs: list[int] = field(default_factory=list)
    """Per label: held-out documents."""
    C: float | str = "cv"
    """Inverse regularisation strength of the logistic regression as asked: a number, or
    ``"cv"``, chosen for each fit by :func:`cross_validated_c` from :data:`CLASSIFIER_CS`."""
    fitted_C: float = float("nan")
    """The ``C`` of the current model."""
    c_search: dict[str, Any] | None = None
    """With ``C="cv"``: the grid, each value's cross-validated log loss and the folds."""
    balanced: bool = True
    """Every label (and, with generations, each source) carries the same total weight."""
    fitted_on: str = "documents"
    """``documents``, ``generations`` or ``documents+generations``."""
    n_train_generations: int = 0
    """Generated continuations the classifier was fitted on."""
    train_doc_ids: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, np.int64))
    """The training documents (the prompts of fitted continuations come from these only)."""
    abstain: bool = False
    """It has a ``none`` class (column ``len(label_names)`` of :meth:`predict_proba`), fitted
    on continuations of topic-neutral openings: it may assign text to no label."""
    n_none_generations: int = 0
    """Continuations of topic-neutral openings fitted as ``none``."""
    test_abstain: float = 0.0
    """Share of the held-out documents assigned to ``none``."""
    _train: tuple[np.ndarray, np.ndarray] | None = field(repr=False, default=None)
    _test: tuple[np.ndarray, np.ndarray] | None = field(repr=False, default=None)

    @classmethod
    def fit(
        cls,
        store,
        *,
        test_fraction: float = 0.05,
        seed: int = 0,
        C: float | str = "cv",
        chunk_tokens: int = 65536,
        balanced: bool = True,
    ) -> LabelClassifier:
        """Fit on the training documents of the store's own document-level split
        (``store.split_mask("train", test_fraction, seed)``, the split SAE training and
        evaluation use) and measure accuracy on its held-out documents. ``balanced``: weight
        each label's documents by ``1 / its count`` (a label that is common in the store is
        not therefore the default answer). ``C``: a number, or ``"cv"`` (chosen by stratified
        cross-validation on the training documents, see :func:`cross_validated_c`)."""
        docs_table = store.docs.set_index("doc_id")
        doc_ids, X = mean_pooled_documents(store, chunk_tokens)
        y = docs_table.loc[doc_ids, "label"].to_numpy(dtype=np.int64)
        if np.unique(y).size < 2:
            raise ValueError(
                f"the store's documents have a single label ({store.label_names}): a label classifier needs two or more"
            )
        rows = store.split_mask("test", test_fraction=test_fraction, seed=seed)
        test = np.isin(doc_ids, np.asarray(store.doc_ids)[rows])
        if not test.any() or test.all():
            raise ValueError(
                f"test_fraction={test_fraction} (seed {seed}) holds out {int(test.sum())} of the "
                f"store's {doc_ids.size} documents: expected a split with documents on both sides"
            )
        if np.unique(y[~test]).size < 2:
            raise ValueError(
                f"test_fraction={test_fraction} (seed {seed}) leaves training documents of a single "
                "label: expected two or more labels to fit the classifier on"
            )
        w = balanced_weights([y[~test]]) if balanced else np.ones(int((~test).sum()))
        model, fitted_C, search = _fit_model(X[~test], y[~test], w, C, seed)
        cfg = store.manifest.get("config", {})
        clf = cls(
            model=model,
            label_names=list(store.label_names),
            hook_point=store.hook_point,
            max_len=int(cfg.get("max_len", 64)),
            prepend_bos=bool(cfg.get("prepend_bos", True)),
            accuracy=float("nan"),
            n_train=int((~test).sum()),
            n_test=int(test.sum()),
            test_doc_ids=doc_ids[test],
            test_fraction=float(test_fraction),
            split_seed=int(seed),
            C=C if C == "cv" else float(C),
            fitted_C=fitted_C,
            c_search=search,
            balanced=bool(balanced),
            train_doc_ids=doc_ids[~test],
            _train=(X[~test], y[~test]),
            _test=(X[test], y[test]),
        )
        clf._score_documents()
        return clf

    def _score_documents(self) -> None:
        """Held-out document accuracy and per-label recall of the current model."""
        X, y = self._test
        n_labels = len(self.label_names)
        pred = predicted_labels(self.predict_proba(X), np.ones(len(y), bool), n_labels)
        self.test_abstain = float((pred == ABSTAIN).mean()) if len(y) else 0.0
        docs = np.bincount(y, minlength=n_labels)
        hits = np.bincount(y[pred == y], minlength=n_labels)
        self.accuracy = float((pred == y).mean())
        self.test_recall = [
            float(r) for r in np.where(docs > 0, hits / np.maximum(docs, 1), np.nan)
        ]
        self.test_docs = [int(d) for d in docs]

    def with_generations(
        self,
        X: np.ndarray,
        y: np.ndarray,
        *,
        documents: bool = True,
        X_none: np.ndarray | None = None,
        C: float | str | None = None,
    ) -> LabelClassifier:
        """A copy refitted on generated continuations ``X [n, d]`` (mean-pooled as
        :meth:`features` reads them) labelled ``y [n]`` by the document whose opening
        prompted them - openings of *training* documents only, so that held-out documents
        stay held out - plus, with ``documents``, the training documents. With both sources
        each carries half the weight, and within each every label the same share (when
        ``balanced``). Held-out document accuracy is measured again for the new model.

        ``X_none [m, d]``: continuations of topic-neutral openings, fitted as an extra class
        ``none`` (the classifier can then abstain); with ``balanced``, the class carries the
        total weight of one label. The openings must not be the prompts it will judge.

        ``C``: the new fit's regularisation (default: this classifier's ``C``; ``"cv"`` chooses
        it again on the new rows)."""
        X = np.asarray(X, dtype=np.float32)
        y = np.asarray(y, dtype=np.int64)
        if (
            X.ndim != 2
            or X.shape[0] != y.shape[0]
            or (self._train and X.shape[1] != self._train[0].shape[1])
        ):
            raise ValueError(
                f"X {X.shape} and y {y.shape}: expected one label per row of X [n, d_model]"
            )
        if self._train is None:
            raise ValueError("with_generations needs a classifier made by LabelClassifier.fit")
        bad = sorted(set(y.tolist()) - set(range(len(self.label_names))))
        if bad:
            raise ValueError(f"y holds label ids {bad}: expected 0..{len(self.label_names) - 1}")
        if np.unique(y).size < 2 and not documents:
            raise ValueError(
                f"y has a single label ({np.unique(y).tolist()}): fitting on generations alone "
                "needs continuations of two or more labels"
            )
        n_labels = len(self.label_names)
        Xd, yd = self._train
        sources = [(Xd, yd)] if documents else []
        if y.size:
            sources.append((X, y))
        Xa = np.concatenate([s[0] for s in sources])
        ya = np.concatenate([s[1] for s in sources])
        n_none = 0
        if X_none is not None:
            Xn = np.asarray(X_none, dtype=np.float32)
            if Xn.ndim != 2 or Xn.shape[0] == 0 or Xn.shape[1] != Xd.shape[1]:
                raise ValueError(
                    f"X_none {Xn.shape}: expected continuations of topic-neutral openings "
                    f"[m >= 1, {Xd.shape[1]}]"
                )
            if NONE_LABEL in self.label_names:
                raise ValueError(
                    f"label_names={self.label_names} already hold {NONE_LABEL!r}: the "
                    "abstaining classifier needs that name for text of no label"
                )
            n_none = int(Xn.shape[0])
            Xa, ya = np.concatenate([Xa, Xn]), np.concatenate([ya, np.full(n_none, n_labels)])
        # "none" as one more label: its total weight is a label's mean total weight
        w = fit_weights([s[1] for s in sources], n_none, n_labels, self.balanced)
        C = self.C if C is None else C
        model, fitted_C, search = _fit_model(Xa, ya, w, C, self.split_seed)
        out = dataclasses.replace(
            self,
            model=model,
            C=C if C == "cv" else float(C),
            fitted_C=fitted_C,
            c_search=search,
            fitted_on=(
                ("documents+generations" if documents else "generations") if y.size else "documents"
            ),
            n_train_generations=int(y.size),
            abstain=n_none > 0,
            n_none_generations=n_none,
        )
        out._score_documents()
        return out

    @torch.inference_mode()
    def features(
        self, backend, texts: Sequence[str], batch_size: int = 16
    ) -> tuple[np.ndarray, np.ndarray]:
        """Mean-pooled activations of ``texts``: ``(X [n, d], valid bool [n])``; a text with no
        token left after dropping BOS/special tokens is not valid (its row is zero)."""
        from integral_superposition.data.tokenize import tokenize_texts

        tok = backend.tokenizer
        hp = backend.hook_point(self.hook_point)
        drop = torch.tensor(sorted(special_ids(tok)) or [-1], dtype=torch.long)
        X = np.zeros((len(texts), backend.d_model), dtype=np.float32)
        valid = np.zeros(len(texts), dtype=bool)
        nonempty = [i for i, t in enumerate(texts) if t.strip()]
        enc = tokenize_texts(tok, [texts[i] for i in nonempty], self.max_len, self.prepend_bos)
        pad = pad_token_id(tok)
        for a in range(0, len(nonempty), batch_size):
            idx = nonempty[a : a + batch_size]
            batch = pad_batch(enc[a : a + batch_size], pad, "right")
            acts = backend.capture(batch.input_ids, batch.attention_mask, [hp])[hp.name].float()
            keep = batch.attention_mask.bool() & ~torch.isin(batch.input_ids, drop)
            keep = keep.to(acts.device)
            n = keep.sum(1)
            pooled = (acts * keep[..., None]).sum(1) / n.clamp_min(1)[:, None]
            X[idx] = pooled.cpu().numpy()
            valid[idx] = (n > 0).cpu().numpy()
        return X, valid

    @property
    def classes(self) -> list[str]:
        """The columns of :meth:`predict_proba`: the labels, then ``none`` when it abstains."""
        return [*self.label_names, NONE_LABEL] if self.abstain else list(self.label_names)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """``[n, C]`` label probabilities (columns in ``label_names`` order), ``[n, C + 1]``
        with the ``none`` column last when the classifier abstains."""
        proba = self.model.predict_proba(X)
        out = np.zeros((X.shape[0], len(self.classes)))
        out[:, self.model.classes_] = proba
        return out

    def predict(self, X: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """``[n]`` label ids of ``X [n, d]``: :data:`ABSTAIN` for ``none``, :data:`EMPTY`
        where ``valid [n]`` is False."""
        ok = np.ones(X.shape[0], bool) if valid is None else valid
        return predicted_labels(self.predict_proba(X), ok, len(self.label_names))

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "logistic regression on mean-pooled activations",
            "fitted_on": self.fitted_on,
            "balanced": self.balanced,
            "n_train_generations": self.n_train_generations,
            "abstain": self.abstain,
            "n_none_generations": self.n_none_generations,
            "held_out_abstain": self.test_abstain,
            "hook_point": self.hook_point,
            "held_out_accuracy": self.accuracy,
            "C": self.fitted_C,
            "C_chosen_by": "cross-validation" if self.C == "cv" else "given",
            **({"C_search": self.c_search} if self.c_search else {}),
            "n_train_docs": self.n_train,
            "n_test_docs": self.n_test,
            "split": f"store.split_mask('test', {self.test_fraction:g}, seed={self.split_seed})",
            "chance": 1.0 / len(self.label_names),
        }


def _text_model(C: float):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    return make_pipeline(
        TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=2),
        LogisticRegression(C=C, max_iter=2000),
    )


@dataclass
class TextJudge:
    """A judge of text that reads its words, not the model: TF-IDF over words and word pairs
    (sublinear term frequency, terms in at least two fitted texts) and an L2 logistic
    regression (scikit-learn). Fitted on the texts the activation classifier is fitted on
    (training documents, continuations of their openings, and ``none`` continuations) with the
    same weights, it gives every steered set a second share: one that no activation, latent or
    edit of the model can move except through the words the model wrote."""

    model: Any
    """The fitted scikit-learn pipeline (TF-IDF, then logistic regression)."""
    label_names: list[str]
    abstain: bool
    """It has a ``none`` class (column ``len(label_names)`` of :meth:`predict_proba`)."""
    n_train: int
    """Texts it was fitted on."""
    accuracy: float = float("nan")
    """Accuracy on the held-out documents (nan: none given)."""
    C: float = 1.0
    """The fitted inverse regularisation strength."""
    c_search: dict[str, Any] | None = None
    """With ``C="cv"``: the grid, each value's cross-validated log loss and the folds."""

    @classmethod
    def fit(
        cls,
        texts: Sequence[str],
        y: np.ndarray,
        weights: np.ndarray,
        label_names: Sequence[str],
        *,
        C: float | str = "cv",
        test_texts: Sequence[str] = (),
        test_y: np.ndarray | None = None,
    ) -> TextJudge:
        """Fit on ``texts [n]`` with label ids ``y [n]`` (``len(label_names)``: ``none``) and
        sample ``weights [n]``; ``test_texts`` / ``test_y``: held-out documents to score.
        ``C``: a number, or ``"cv"`` (chosen by :func:`cross_validated_c`, the vocabulary
        refitted within each fold)."""
        texts = [str(t) for t in texts]
        y = np.asarray(y, dtype=np.int64)
        w = np.asarray(weights, dtype=np.float64)
        n_labels = len(label_names)
        if not (len(texts) == y.size == w.size):
            raise ValueError(
                f"texts ({len(texts)}), y {y.shape} and weights {w.shape}: expected one label "
                "and one weight per text"
            )
        bad = sorted(set(y.tolist()) - set(range(n_labels + 1)))
        if bad:
            raise ValueError(f"y holds label ids {bad}: expected 0..{n_labels} ({n_labels}: none)")
        if np.unique(y).size < 2:
            raise ValueError(
                f"y has a single label ({np.unique(y).tolist()}): a judge needs texts of two or "
                "more labels"
            )
        if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError("weights: expected finite non-negative weights with a positive sum")
        search = None
        _check_c(C)
        try:
            if C == "cv":
                _text_model(1.0).steps[0][1].fit(texts)  # the vocabulary, before any fold
                C, search = cross_validated_c(_text_model, texts, y, w, TEXT_JUDGE_CS)
            model = _text_model(float(C))
            model.fit(texts, y, logisticregression__sample_weight=w)
        except ValueError as e:  # an empty vocabulary: no term in two texts
            if "vocabulary" not in str(e) and "no terms remain" not in str(e):
                raise
            raise ValueError(f"texts: expected words shared by at least two texts ({e})") from e
        judge = cls(
            model=model, label_names=list(label_names), abstain=bool((y == n_labels).any()),
            n_train=len(texts), C=float(C), c_search=search,
        )  # fmt: skip
        if test_y is not None and len(test_texts):
            pred = judge.predict(test_texts)
            judge.accuracy = float((pred == np.asarray(test_y)).mean())
        return judge

    @property
    def classes(self) -> list[str]:
        """The columns of :meth:`predict_proba`: the labels, then ``none`` when it abstains."""
        return [*self.label_names, NONE_LABEL] if self.abstain else list(self.label_names)

    def predict_proba(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(proba [n, C (+1)], valid [n])``: label probabilities of ``texts`` (columns as
        :attr:`classes`), and whether a text holds any term the judge knows (one with none is
        not judged)."""
        texts = [str(t) for t in texts]
        if not texts:
            return np.zeros((0, len(self.classes))), np.zeros(0, bool)
        tfidf, lr = self.model.steps[0][1], self.model.steps[-1][1]
        F = tfidf.transform(texts)
        out = np.zeros((len(texts), len(self.classes)))
        out[:, lr.classes_] = lr.predict_proba(F)
        return out, np.asarray(F.getnnz(axis=1) > 0)

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        """``[n]`` label ids of ``texts``: :data:`ABSTAIN` for ``none``, :data:`EMPTY` for a
        text with no known term."""
        proba, valid = self.predict_proba(texts)
        return predicted_labels(proba, valid, len(self.label_names))

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "logistic regression on TF-IDF of words and word pairs",
            "n_train_texts": self.n_train,
            "abstain": self.abstain,
            "held_out_accuracy": self.accuracy,
            "C": self.C,
            **({"C_search": self.c_search} if self.c_search else {}),
        }


def label_prompts(
    store,
    label_id: int,
    docs_pool: np.ndarray,
    n: int,
    words: int,
    seed: int,
    *,
    fallback: bool = True,
    exclude: np.ndarray | None = None,
) -> list[str]:
    """Up to ``n`` prompts of label ``label_id``: the first ``words`` words of documents in
    ``docs_pool`` (held-out documents for the check; training documents for fitting). With
    ``fallback``, all the label's documents not in ``exclude`` are used when the pool holds
    too few."""
    docs = store.docs
    of_label = docs["label"] == label_id
    pool = docs[of_label & docs["doc_id"].isin(docs_pool)]
    if len(pool) < n and fallback:
        pool = docs[of_label & ~docs["doc_id"].isin(exclude if exclude is not None else [])]
    pool = pool.sample(n=min(n, len(pool)), random_state=seed) if len(pool) else pool
    return [" ".join(str(t).split()[:words]) for t in pool["text"]]
