"""Does steering work? Strength sweeps with a label classifier, vocabulary mass, fluency and
controls.

For every steered latent (picked per label by enrichment, or given) and every strength, the
model continues a fixed list of neutral prompts with the latent edited, and each set of
generations is scored by

- **vocab_mass**: the next-token probability the steered model puts on the target label's
  vocabulary (the label's most enriched token ids in the activation store, a one-sided Fisher
  test per token), averaged over generation steps;
- **share**: the fraction of continuations that a label classifier assigns to the target
  label - scikit-learn logistic regression on mean-pooled activations of the store's labelled
  documents at the store's hook point, applied to each continuation read by the unsteered
  model (its held-out accuracy is reported next to it);
- **perplexity** of the continuations under the unsteered model (and the ratio to the
  unsteered generations' perplexity), plus the distinct-bigram fraction.

Controls are rows of their own: ``unsteered`` (no hook), ``alpha0`` (the hook with an identity
edit), ``random`` (a random live latent enriched for no label, its edit scaled so the
injected vector has the target's norm) and ``own_label`` (the same latent on prompts cut from
held-out documents of its own label).

:func:`run_steering_eval` publishes ``sweep.parquet``, ``generations.parquet``,
``latents.parquet``, ``vocabulary.parquet``, ``sweep.png``/``.svg`` and ``summary.json``
with the manifest written last.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from pydantic import BaseModel, ConfigDict, Field, field_validator

from integral_superposition import storage
from integral_superposition.data.tokenize import pad_batch, pad_token_id, special_ids
from integral_superposition.progress import ProgressFn, Reporter
from integral_superposition.steering.edits import Edit
from integral_superposition.steering.generation import (
    Generations,
    check_prompts,
    check_steerable_prompts,
    continuation_nll,
    generate_continuations,
)
from integral_superposition.steering.hooks import resolve_sae_hook_point, steer

log = logging.getLogger(__name__)

Mode = Literal["clamp_max", "clamp", "add", "scale"]
Control = Literal["alpha0", "random", "own_label"]

__all__ = [
    "LabelClassifier",
    "SteeringEval",
    "SteeringParams",
    "SteeringResult",
    "evaluate_steering",
    "label_vocabulary",
    "load_steering",
    "pick_latents",
    "plot_sweep",
    "run_steering_eval",
    "side_by_side",
    "steering_section",
]


class SteeringParams(BaseModel):
    """What :func:`run_steering_eval` sweeps and how it scores it."""

    model_config = ConfigDict(
        extra="forbid",
        use_attribute_docstrings=True,
        validate_assignment=True,
        allow_inf_nan=False,
    )

    latents: list[int] | Literal["auto"] = "auto"
    """Latents to steer, or ``auto``: the most enriched latents of each label (``labels``)."""
    labels: list[str] | None = None
    """``auto``: the target labels (default: every label). Explicit latents: one target label per latent (default: each latent's most enriched label)."""
    per_label: int = Field(1, ge=1)
    """``auto``: latents picked per label."""
    q_max: float = Field(1e-3, gt=0, le=1)
    """A picked latent's token-level enrichment q-value must be below this."""
    rank_by: Literal["doc_q", "token_q", "log_odds"] = "doc_q"
    """Order of the significant latents: document-level q (broad, label-specific latents first), token-level q, or token-level log odds."""
    n_top: int = Field(20, ge=1)
    """Top activating tokens per latent in the token-level enrichment test."""
    mode: Mode = "clamp_max"
    """Edit swept: ``clamp_max`` (clamp to strength x the latent's max activation in the store), ``clamp`` (to strength), ``add`` (strength x decoder row), ``scale``."""
    strengths: list[float] = Field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])
    """Strengths of the sweep."""
    positions: str | list[str] = "all"
    """Steered positions: ``last_prompt``, ``prompt``, ``generated``, ``all`` (or a list of them)."""
    prompts: list[str] | None = None
    """Neutral prompts (default: ``data.neutral_prompts()``)."""
    max_new_tokens: int = Field(24, ge=1)
    """Tokens generated per continuation."""
    do_sample: bool = True
    """Sample (``True``) or decode greedily."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass."""
    samples_per_prompt: int = Field(2, ge=1)
    """Continuations per prompt (with sampling)."""
    seed: int = 0
    """Seed of sampling, the random control latent and the classifier split."""
    batch_size: int = Field(16, ge=1)
    """Prompts per generate call."""
    keep_error: bool = True
    """Keep the SAE error term (``x + dec(z') - dec(z)``); False replaces ``x`` by ``dec(z')``."""
    controls: list[Control] = Field(default_factory=lambda: ["alpha0", "random", "own_label"])
    """Control rows to add."""
    own_label_prompts: int = Field(12, ge=1)
    """``own_label`` control: prompts cut from held-out documents of the latent's label."""
    own_prompt_words: int = Field(5, ge=1)
    """``own_label`` control: words kept from each document as its prompt."""
    vocab_per_label: int = Field(50, ge=1)
    """Target vocabulary: most enriched token ids per label."""
    vocab_min_count: int = Field(5, ge=1)
    """Target vocabulary: a token must occur at least this often in the store."""
    vocab_words_only: bool = True
    """Target vocabulary: keep only tokens that read as words (three or more letters)."""
    classifier_test_fraction: float = Field(0.2, gt=0, lt=1)
    """Held-out documents for the classifier's accuracy."""
    classifier_c: float = Field(1.0, gt=0)
    """Inverse regularisation strength of the logistic regression."""
    ppl_ratio_max: float = Field(2.0, gt=1)
    """Fluency bound: the summary's best strength keeps perplexity within this factor of unsteered."""
    hook_point: str | None = None
    """Where to steer (default: the store's hook point, where the SAE was trained)."""
    device: str = "auto"
    """Torch device of the SAE scan: ``auto`` (the model's), ``cpu``, ``cuda:0``, ..."""

    @field_validator("strengths")
    @classmethod
    def _strengths(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("strengths is empty: expected at least one strength")
        if any(not math.isfinite(s) for s in v):
            raise ValueError(f"strengths={v}: expected finite numbers")
        return v

    @field_validator("prompts")
    @classmethod
    def _prompts(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ValueError(
                "prompts is empty: expected at least one prompt (or None for the neutral prompts)"
            )
        blank = [i for i, s in enumerate(v or []) if not s]
        if blank:
            raise ValueError(
                f"prompts[{blank[0]}]={v[blank[0]]!r} is empty: expected text to steer"
            )
        return v

    @field_validator("latents")
    @classmethod
    def _latents(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("latents is empty: expected latent indices or 'auto'")
            if any(j < 0 for j in v):
                raise ValueError(f"latents={v}: expected non-negative latent indices")
        return v


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


@dataclass
class LabelClassifier:
    """Logistic regression on mean-pooled activations at ``hook_point``, fitted on a store's
    labelled documents; scores texts read by a backend the same way the store was dumped."""

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

    @classmethod
    def fit(
        cls,
        store,
        *,
        test_fraction: float = 0.2,
        seed: int = 0,
        C: float = 1.0,
        chunk_tokens: int = 65536,
    ) -> LabelClassifier:
        """Fit on the store's documents; a seeded document-level split holds out ``test_fraction``."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        docs_table = store.docs.set_index("doc_id")
        doc_ids, X = mean_pooled_documents(store, chunk_tokens)
        y = docs_table.loc[doc_ids, "label"].to_numpy(dtype=np.int64)
        if np.unique(y).size < 2:
            raise ValueError(
                f"the store's documents have a single label ({store.label_names}): a label classifier needs two or more"
            )
        rng = np.random.default_rng(seed)
        test = rng.random(doc_ids.size) < test_fraction
        if test.all() or not test.any():
            test = np.zeros(doc_ids.size, dtype=bool)
            test[rng.permutation(doc_ids.size)[: max(1, round(test_fraction * doc_ids.size))]] = (
                True
            )
        model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
        model.fit(X[~test], y[~test])
        acc = float((model.predict(X[test]) == y[test]).mean())
        cfg = store.manifest.get("config", {})
        return cls(
            model=model,
            label_names=list(store.label_names),
            hook_point=store.hook_point,
            max_len=int(cfg.get("max_len", 64)),
            prepend_bos=bool(cfg.get("prepend_bos", True)),
            accuracy=acc,
            n_train=int((~test).sum()),
            n_test=int(test.sum()),
            test_doc_ids=doc_ids[test],
        )

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

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """``[n, C]`` label probabilities (columns in ``label_names`` order)."""
        proba = self.model.predict_proba(X)
        out = np.zeros((X.shape[0], len(self.label_names)))
        out[:, self.model.classes_] = proba
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "logistic regression on mean-pooled activations",
            "hook_point": self.hook_point,
            "held_out_accuracy": self.accuracy,
            "n_train_docs": self.n_train,
            "n_test_docs": self.n_test,
            "chance": 1.0 / len(self.label_names),
        }


# -- picking latents --------------------------------------------------------------------------------
def _resolve_device(device: str, backend) -> torch.device:
    """``auto``: where the model runs (it generates the steered texts), else CUDA or CPU."""
    from integral_superposition.compute import resolve_device

    return resolve_device(device, default=backend.device if backend is not None else None)


def enrichment_tables(sae, store, n_top: int = 20, device=None, chunk_tokens: int | None = None):
    """One scan of ``sae`` over ``store``: ``(token table, document table, scan)`` with the
    enrichment tables of :mod:`integral_superposition.analysis.enrichment`."""
    from integral_superposition.analysis.enrichment import document_enrichment, fisher_enrichment
    from integral_superposition.analysis.scan import scan_latents

    labels = np.asarray(store.labels, dtype=np.int64)
    scan = scan_latents(
        sae, store, n_top=n_top, labels=labels, label_names=store.label_names,
        doc_threshold=0.0, stats=True, device=device, chunk_tokens=chunk_tokens,
    )  # fmt: skip
    tok = fisher_enrichment(scan.top, labels, label_names=store.label_names)
    doc = None
    if scan.doc_pairs is not None:
        docs = store.docs
        doc = document_enrichment(
            scan.doc_pairs,
            pd.DataFrame({"doc_id": docs["doc_id"], "label": docs["label"]}),
            sae.d_sae,
            label_names=store.label_names,
        )
    return tok, doc, scan


def pick_latents(
    token_table: pd.DataFrame,
    doc_table: pd.DataFrame | None = None,
    *,
    labels: Sequence[str] | None = None,
    per_label: int = 1,
    q_max: float = 1e-3,
    rank_by: str = "doc_q",
) -> pd.DataFrame:
    """The most enriched latents of each label: ``label, latent, q, log_odds, frac_in_set,
    doc_q, doc_log_odds`` (``per_label`` rows per label at most; a label with no latent at
    ``q < q_max`` has none).

    ``token_table``/``doc_table``: tidy enrichment tables (``analysis.fisher_enrichment`` /
    ``document_enrichment``, or a published analysis's ``enrichment`` table split by level).
    """
    if rank_by not in ("doc_q", "token_q", "log_odds"):
        raise ValueError(f"rank_by={rank_by!r}: expected 'doc_q', 'token_q' or 'log_odds'")
    names = [str(x) for x in token_table["label"].astype(str).unique()]
    if labels is not None:
        unknown = [lb for lb in labels if lb not in names]
        if unknown:
            raise ValueError(
                f"labels={list(labels)}: {unknown} not among the store's labels {names}"
            )
    t = token_table.copy()
    t["label"] = t["label"].astype(str)
    t = t[(t["q"] < q_max) & (t["log_odds"] > 0)]
    if labels is not None:
        t = t[t["label"].isin(list(labels))]
    if doc_table is not None:
        d = doc_table[["latent", "label", "q", "log_odds"]].copy()
        d["label"] = d["label"].astype(str)
        t = t.merge(
            d.rename(columns={"q": "doc_q", "log_odds": "doc_log_odds"}),
            on=["latent", "label"],
            how="left",
        )
    else:
        t["doc_q"], t["doc_log_odds"] = np.nan, np.nan
    if rank_by == "doc_q" and doc_table is not None:
        order = (["doc_q", "doc_log_odds", "q"], [True, False, True])
    elif rank_by == "log_odds":
        order = (["log_odds", "q"], [False, True])
    else:
        order = (["q", "log_odds"], [True, False])
    t = t.sort_values(order[0], ascending=order[1], kind="stable")
    t = t.groupby("label", sort=False).head(per_label)
    cols = ["label", "latent", "q", "log_odds", "frac_in_set", "doc_q", "doc_log_odds"]
    wanted = list(labels) if labels is not None else names
    t = t.assign(_o=t["label"].map({n: i for i, n in enumerate(wanted)})).sort_values(
        ["_o"], kind="stable"
    )
    return t[cols].reset_index(drop=True)


# -- the sweep --------------------------------------------------------------------------------------
@dataclass
class _Scored:
    """A set of generations and its per-row scores."""

    gens: Generations
    proba: np.ndarray  # [n, C]
    valid: np.ndarray  # [n]
    nll: np.ndarray  # [n]
    n_tok: np.ndarray  # [n]


def _distinct2(token_ids: Sequence[Sequence[int]]) -> float:
    pairs = [(a, b) for ids in token_ids for a, b in itertools.pairwise(ids)]
    return len(set(pairs)) / len(pairs) if pairs else float("nan")


def _metrics(s: _Scored, c: int, base_ppl: float | None) -> dict[str, Any]:
    pred = np.where(s.valid, s.proba.argmax(1), -1)
    total = s.n_tok.sum()
    ppl = float(math.exp(s.nll.sum() / total)) if total > 0 else float("nan")
    return {
        "n": len(s.gens),
        "share": float((pred == c).mean()),
        "prob": float(s.proba[s.valid, c].mean()) if s.valid.any() else float("nan"),
        "vocab_mass": float(s.gens.vocab_mass[:, c].mean())
        if s.gens.vocab_mass is not None
        else float("nan"),
        "perplexity": ppl,
        "ppl_ratio": ppl / base_ppl if base_ppl else float("nan"),
        "distinct2": _distinct2(s.gens.token_ids),
        "mean_tokens": float(s.n_tok.mean()),
        "empty": int((~s.valid).sum()),
    }


def _edit_for(mode: str, latent: int, strength: float, max_act: float, ratio: float = 1.0) -> Edit:
    """The sweep's edit of ``latent`` at ``strength``; ``ratio`` rescales it so that another
    latent's injected vector matches the target's norm (random control)."""
    if mode == "clamp_max":
        return Edit(latent, "set", strength * max_act * ratio)
    if mode == "clamp":
        return Edit(latent, "set", strength * ratio)
    if mode == "add":
        return Edit(latent, "add", strength * ratio)
    return Edit(latent, "scale", strength)


@dataclass
class SteeringEval:
    """The result of :func:`evaluate_steering`."""

    table: pd.DataFrame
    """The sweep: one row per (latent, control, strength)."""
    generations: pd.DataFrame
    """Every generation: ``set, latent, label, control, strength, prompt, text, predicted, target_prob, n_tokens, nll``."""
    picks: pd.DataFrame
    """The steered latents with their enrichment, max activation and random control."""
    vocabulary: pd.DataFrame
    """The target vocabularies."""
    classifier: dict[str, Any]
    summary: dict[str, Any]

    def figure(self) -> Figure:
        return plot_sweep(self.table, self.summary.get("ppl_ratio_max"))


def _own_label_prompts(
    store, label_id: int, test_docs: np.ndarray, n: int, words: int, seed: int
) -> list[str]:
    docs = store.docs
    pool = docs[(docs["label"] == label_id) & docs["doc_id"].isin(test_docs)]
    if len(pool) < n:
        pool = docs[docs["label"] == label_id]
    pool = pool.sample(n=min(n, len(pool)), random_state=seed) if len(pool) else pool
    return [" ".join(str(t).split()[:words]) for t in pool["text"]]


def _target_latents(
    p: SteeringParams, tok_table: pd.DataFrame, doc_table: pd.DataFrame | None, names: list[str]
) -> pd.DataFrame:
    """The latents to steer with their target label: picked by enrichment (``auto``) or given
    (target label: given, else the latent's most significant label)."""
    if p.latents == "auto":
        picks = pick_latents(
            tok_table, doc_table, labels=p.labels, per_label=p.per_label, q_max=p.q_max,
            rank_by=p.rank_by,
        )  # fmt: skip
        if picks.empty:
            raise ValueError(
                f"no latent is enriched for any of the labels {p.labels or names} at q < {p.q_max}"
            )
        return picks
    t = tok_table.assign(label=tok_table["label"].astype(str))
    t = t[t["latent"].isin(p.latents)].sort_values(["q", "log_odds"], ascending=[True, False])
    best = t.drop_duplicates("latent").set_index("latent")["label"]
    labels = p.labels if p.labels is not None else [best[j] for j in p.latents]
    pairs = pd.DataFrame({"latent": p.latents, "label": labels})
    cols = ["latent", "label", "q", "log_odds", "frac_in_set"]
    return pairs.merge(t[cols], on=["latent", "label"], how="left")[["label", *cols[:1], *cols[2:]]]


def _random_controls(
    picks: pd.DataFrame, tok_table: pd.DataFrame, norms: np.ndarray, q_max: float, seed: int
) -> pd.DataFrame:
    """For each steered latent, a random latent that fired in the data and is enriched for no
    label (a topic-neutral perturbation; if there is none, one not enriched for the target
    label), and the decoder-norm ratio that matches the injected vectors."""
    t = tok_table.assign(label=tok_table["label"].astype(str))
    fired = np.zeros(norms.shape[0], dtype=bool)
    fired[t.loc[t["fires"], "latent"].to_numpy()] = True
    enriched = (t["q"] < q_max) & (t["log_odds"] > 0)
    neutral = fired.copy()
    neutral[t.loc[enriched, "latent"].to_numpy()] = False
    rng = np.random.default_rng(seed)
    randoms = []
    for label, j in zip(picks["label"], picks["latent"], strict=True):
        ok = neutral.copy()
        ok[int(j)] = False
        if not ok.any():
            ok = fired.copy()
            ok[t.loc[enriched & (t["label"] == label), "latent"].to_numpy()] = False
            ok[int(j)] = False
        cands = np.flatnonzero(ok)
        randoms.append(int(rng.choice(cands)) if cands.size else -1)
    r = np.asarray(randoms)
    ratio = np.where(r >= 0, norms[picks["latent"].to_numpy()] / norms[np.maximum(r, 0)], np.nan)
    return picks.assign(random_latent=r, random_ratio=ratio)


def _latent_summary(j, label, base_m, steer_ms, rand_ms, r, ppl_ratio_max) -> dict[str, Any]:
    """The strongest share within the fluency bound, and how far the random control moved."""
    fluent = [(s, m) for s, m in steer_ms if m["ppl_ratio"] <= ppl_ratio_max]
    best = max(fluent, key=lambda sm: (sm[1]["share"], -sm[0])) if fluent else None
    rand_at = dict(rand_ms)
    return {
        "latent": j, "label": label, "baseline_share": base_m["share"],
        "baseline_vocab_mass": base_m["vocab_mass"], "baseline_perplexity": base_m["perplexity"],
        "best_strength": best[0] if best else None,
        "best_share": best[1]["share"] if best else None,
        "best_vocab_mass": best[1]["vocab_mass"] if best else None,
        "best_ppl_ratio": best[1]["ppl_ratio"] if best else None,
        "max_share": max(m["share"] for _, m in steer_ms),
        "random_latent": r,
        "random_share_at_best": rand_at[best[0]]["share"] if best and best[0] in rand_at else None,
        "random_max_shift": max((abs(m["share"] - base_m["share"]) for _, m in rand_ms), default=None),
    }  # fmt: skip


def evaluate_steering(
    backend,
    sae,
    store,
    params: SteeringParams | Mapping[str, Any] | None = None,
    *,
    classifier: LabelClassifier | None = None,
    enrichment: tuple[pd.DataFrame, pd.DataFrame | None] | None = None,
    max_acts: Any = None,
    on_progress: ProgressFn | None = None,
) -> SteeringEval:
    """Sweep steering strengths for the chosen latents and score every set of generations.

    ``store``: the activation store the SAE was trained on (labels, token ids, documents).
    ``enrichment``: ``(token table, document table)`` to reuse (else one SAE scan of the
    store computes them and the max activations). ``max_acts``: per-latent max activations
    for ``clamp_max`` (default: from that scan). Every input is checked before generating.
    """
    from integral_superposition.data import neutral_prompts
    from integral_superposition.steering.edits import max_activations

    p = (
        params
        if isinstance(params, SteeringParams)
        else SteeringParams.model_validate(dict(params or {}))
    )
    prompts = check_prompts(p.prompts if p.prompts is not None else neutral_prompts())
    check_steerable_prompts(backend.tokenizer, prompts)
    hook = p.hook_point or store.hook_point
    hp = resolve_sae_hook_point(backend, sae, hook)
    if store.d_model != sae.d_in:
        raise ValueError(f"sae.d_in={sae.d_in} does not match the store's d_model={store.d_model}")
    if isinstance(p.latents, list):
        bad = [j for j in p.latents if not 0 <= j < sae.d_sae]
        if bad:
            raise ValueError(
                f"latents={p.latents}: {bad} out of range for an SAE with d_sae={sae.d_sae} (0..{sae.d_sae - 1})"
            )
        if p.labels is not None and len(p.labels) != len(p.latents):
            raise ValueError(
                f"labels={p.labels}: expected one target label per latent ({len(p.latents)})"
            )
    if p.labels is not None:
        unknown = [lb for lb in p.labels if lb not in store.label_names]
        if unknown:
            raise ValueError(
                f"labels={p.labels}: {unknown} not among the store's labels {store.label_names}"
            )
    t0 = time.perf_counter()
    names = list(store.label_names)
    scan = None
    rep = Reporter("steering", on_progress, unit="sets")
    if enrichment is None:
        rep.set_phase("enrichment scan")
        tok_table, doc_table, scan = enrichment_tables(
            sae, store, p.n_top, device=_resolve_device(p.device, backend)
        )
    else:
        tok_table, doc_table = enrichment
    mx = (
        max_activations(max_acts, sae.d_sae)
        if max_acts is not None
        else (np.asarray(scan.act_max, dtype=np.float64) if scan is not None else None)
    )
    if p.mode == "clamp_max" and mx is None:
        raise ValueError("mode='clamp_max' needs max_acts= when enrichment tables are given")

    picks = _target_latents(p, tok_table, doc_table, names)
    norms = sae.W_dec.detach().float().norm(dim=1).cpu().numpy()
    picks["max_act"] = mx[picks["latent"].to_numpy()] if mx is not None else np.nan
    picks["decoder_norm"] = norms[picks["latent"].to_numpy()]
    picks = _random_controls(picks, tok_table, norms, p.q_max, p.seed)

    rep.set_phase("label classifier")
    classifier = classifier or LabelClassifier.fit(
        store, test_fraction=p.classifier_test_fraction, seed=p.seed, C=p.classifier_c
    )
    vocab = label_vocabulary(
        store, p.vocab_per_label, p.q_max, p.vocab_min_count, backend.tokenizer, p.vocab_words_only
    )
    vocab_sets = [vocab.loc[vocab["label_id"] == c, "token_id"].tolist() for c in range(len(names))]

    gen_kw = dict(
        do_sample=p.do_sample, temperature=p.temperature, top_p=p.top_p,
        samples_per_prompt=p.samples_per_prompt, seed=p.seed, batch_size=p.batch_size,
        vocab_sets=vocab_sets,
    )  # fmt: skip
    own = "own_label" in p.controls
    n_sets = 1 + len(picks) * (
        len(p.strengths) * (1 + ("random" in p.controls) + own) + ("alpha0" in p.controls) + own
    )
    rep.update(0, n_sets)

    def run(prompt_list: list[str], edits: list[Edit] | None, what: str) -> _Scored:
        rep.set_phase(what)
        if edits is None:
            g = generate_continuations(backend, prompt_list, p.max_new_tokens, **gen_kw)
        else:
            with steer(backend, sae, hp, edits, p.positions, keep_error=p.keep_error):
                g = generate_continuations(backend, prompt_list, p.max_new_tokens, **gen_kw)
        X, valid = classifier.features(backend, g.texts, p.batch_size)
        nll, n_tok = continuation_nll(backend, g.prompt_ids, g.token_ids)
        rep.advance()
        return _Scored(g, classifier.predict_proba(X), valid, nll, n_tok)

    rows: list[dict[str, Any]] = []
    gen_frames: list[pd.DataFrame] = []

    def record(s: _Scored, pick, control: str, prompt_set: str, base_ppl: float | None,
               strength: float = float("nan"), edit: Edit | None = None) -> dict[str, Any]:  # fmt: skip
        c = names.index(pick["label"])
        m = _metrics(s, c, base_ppl)
        rows.append({
            "latent": int(pick["latent"]), "label": pick["label"], "control": control,
            "strength": strength, "steered_latent": edit.latent if edit else -1,
            "edit_value": edit.value if edit else float("nan"), "mode": p.mode,
            "prompts": prompt_set, **m, "classifier_accuracy": classifier.accuracy,
        })  # fmt: skip
        pred = np.where(s.valid, s.proba.argmax(1), -1)
        gen_frames.append(pd.DataFrame({
            "set": len(rows) - 1, "latent": int(pick["latent"]), "label": pick["label"],
            "control": control, "strength": strength, "prompts": prompt_set,
            "prompt": s.gens.prompts, "text": s.gens.texts,
            "predicted": [names[i] if i >= 0 else None for i in pred],
            "target_prob": s.proba[:, c], "n_tokens": s.n_tok, "nll": s.nll,
        }))  # fmt: skip
        return m

    def sweep(pick, control: str, latent: int, ratio: float, prompt_list, prompt_set, base_ppl):
        """One steered set per strength; returns ``[(strength, metrics)]``."""
        max_act = float(pick["max_act"]) if np.isfinite(pick["max_act"]) else 1.0
        out = []
        for s in p.strengths:
            e = _edit_for(p.mode, latent, s, max_act, ratio)
            what = f"{pick['label']}: {control} latent {latent}, strength {s:g}"
            scored = run(prompt_list, [e], what)
            out.append((s, record(scored, pick, control, prompt_set, base_ppl, s, e)))
        return out

    base = run(prompts, None, "unsteered")
    summary_latents = []
    for _, pick in picks.iterrows():
        j, c = int(pick["latent"]), names.index(pick["label"])
        base_ppl = _metrics(base, c, None)["perplexity"]
        base_m = record(base, pick, "unsteered", "neutral", base_ppl)
        if "alpha0" in p.controls:
            identity = Edit(j, "add", 0.0)
            scored = run(prompts, [identity], f"{pick['label']}: alpha0 control latent {j}")
            record(scored, pick, "alpha0", "neutral", base_ppl, 0.0, identity)
        steer_ms = sweep(pick, "steer", j, 1.0, prompts, "neutral", base_ppl)
        r = int(pick["random_latent"])
        rand_ms = []
        if "random" in p.controls and r >= 0:
            rand_ms = sweep(
                pick, "random", r, float(pick["random_ratio"]), prompts, "neutral", base_ppl
            )
        if own:
            own_prompts = _own_label_prompts(
                store, c, classifier.test_doc_ids, p.own_label_prompts, p.own_prompt_words, p.seed
            )
            if own_prompts:
                own_base = run(own_prompts, None, f"{pick['label']}: own-label prompts")
                own_ppl = _metrics(own_base, c, None)["perplexity"]
                record(own_base, pick, "own_label", "own_label", own_ppl)
                sweep(pick, "own_label", j, 1.0, own_prompts, "own_label", own_ppl)
        summary_latents.append(
            _latent_summary(j, pick["label"], base_m, steer_ms, rand_ms, r, p.ppl_ratio_max)
        )
    table = pd.DataFrame(rows)
    generations = pd.concat(gen_frames, ignore_index=True)
    summary = {
        "hook_point": hp.name,
        "mode": p.mode,
        "positions": p.positions,
        "strengths": list(p.strengths),
        "n_prompts": len(prompts),
        "ppl_ratio_max": p.ppl_ratio_max,
        "classifier": classifier.describe(),
        "latents": summary_latents,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return SteeringEval(table, generations, picks, vocab, classifier.describe(), summary)


# -- the plot ---------------------------------------------------------------------------------------
_STYLE = {"steer": "-", "random": "--", "own_label": ":", "alpha0": "none"}


def plot_sweep(table: pd.DataFrame, ppl_ratio_max: float | None = 2.0) -> Figure:
    """Effect against perplexity: classifier share (left) and target-vocabulary mass (right)
    against perplexity under the unsteered model, one line per latent and per control
    (strengths annotated; each line starts at its unsteered point, a black star). The dashed
    line marks ``ppl_ratio_max`` x the unsteered perplexity of the neutral prompts."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    from integral_superposition.viz.figures import label_color, new_figure

    fig = new_figure(figsize=(11.0, 4.6))
    axes = fig.subplots(1, 2)
    cols = ("share", "vocab_mass")
    labels = list(dict.fromkeys(table["label"].astype(str)))
    for (lat, control), g in table.groupby(["latent", "control"], sort=False):
        if control == "unsteered":
            continue
        sub = table[table["latent"] == lat]
        start = sub[
            sub["control"].isin(["unsteered", "own_label"])
            & sub["strength"].isna()
            & (sub["prompts"] == g["prompts"].iloc[0])
        ]
        g = g[g["strength"].notna()].sort_values("strength")
        pts = g if control == "alpha0" else pd.concat([start, g])
        label = str(g["label"].iloc[0])
        name = f"{lat} ({label})" + ("" if control == "steer" else f" {control}")
        style = dict(
            linestyle=_STYLE.get(control, "-"), marker="x" if control == "alpha0" else "o",
            markersize=7 if control == "alpha0" else 4, color=label_color(labels.index(label)),
            label=name, alpha=0.9,
        )  # fmt: skip
        for ax, col in zip(axes, cols, strict=True):
            ax.plot(pts["perplexity"], pts[col], **style)
            if control == "steer":
                for x, y, s in zip(g["perplexity"], g[col], g["strength"], strict=True):
                    ax.annotate(
                        f"{s:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points"
                    )
    base = table[table["control"] == "unsteered"]
    for ax, col in zip(axes, cols, strict=True):
        ax.plot(
            base["perplexity"],
            base[col],
            marker="*",
            markersize=11,
            color="black",
            linestyle="none",
        )
        if ppl_ratio_max and len(base):
            ax.axvline(
                ppl_ratio_max * base["perplexity"].iloc[0], color="grey", linestyle="--", lw=1
            )
        ax.set_xlabel("perplexity under the unsteered model")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("classifier share of the target label")
    axes[1].set_ylabel("next-token mass on the target vocabulary")
    axes[0].set_ylim(-0.02, 1.02)
    handles, names = axes[0].get_legend_handles_labels()
    uniq = dict(zip(names, handles, strict=True))
    fig.legend(
        uniq.values(),
        uniq.keys(),
        loc="lower center",
        ncol=min(4, len(uniq)),
        fontsize=7,
        frameon=False,
    )
    title = "Steering sweep (star: unsteered; numbers: strength"
    title += f"; dashed: {ppl_ratio_max:g}x unsteered perplexity)" if ppl_ratio_max else ")"
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(bottom=0.18 + 0.03 * ((len(uniq) - 1) // 4), wspace=0.25)
    return fig


# -- publishing and reading -------------------------------------------------------------------------
def _parquet(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


def run_steering_eval(
    sae_uri: Any,
    store_uri: Any,
    out_uri: str,
    params: SteeringParams | Mapping[str, Any] | None = None,
    *,
    backend,
    storage_options: Mapping[str, Any] | None = None,
    on_progress: ProgressFn | None = None,
    allow_other_store: bool = False,
) -> dict[str, Any]:
    """Evaluate steering of the SAE at ``sae_uri`` (trained on the store at ``store_uri``)
    and publish the sweep to ``out_uri``; returns the manifest (``kind="steering"``). The
    store must be the SAE's training store (``check_training_store``), unless
    ``allow_other_store=True``.

    Files: ``sweep.parquet``, ``generations.parquet``, ``latents.parquet``,
    ``vocabulary.parquet``, ``sweep.png``, ``sweep.svg``, ``summary.json``; the manifest is
    written last. ``sae_uri``/``store_uri`` may also be a loaded SAE / store. Inputs are
    checked before anything is written; on failure the files written so far are removed.
    """
    from integral_superposition.dump.store import ActivationStore
    from integral_superposition.sae import (
        SparseAutoencoder,
        check_training_store,
        load_sae,
        read_sae_manifest,
    )
    from integral_superposition.viz.figures import close_figure, figure_bytes

    p = (
        params
        if isinstance(params, SteeringParams)
        else SteeringParams.model_validate(dict(params or {}))
    )
    if backend is None or not hasattr(backend, "generate"):
        raise TypeError(f"backend={backend!r}: expected a causal LM backend (backends.HFCausalLM)")
    if isinstance(sae_uri, SparseAutoencoder):
        sae, sae_info = sae_uri, {"uri": None, "content_hash": None}
    else:
        sae = load_sae(str(sae_uri), storage_options=storage_options)
        try:
            sae_info = {
                "uri": str(sae_uri),
                "content_hash": read_sae_manifest(str(sae_uri), storage_options).get(
                    "content_hash"
                ),
            }
        except (FileNotFoundError, ValueError):  # a SAELens folder without our manifest
            sae_info = {"uri": str(sae_uri), "content_hash": None}
    store = (
        store_uri
        if isinstance(store_uri, ActivationStore)
        else ActivationStore(store_uri, storage_options)
    )
    if not isinstance(sae_uri, SparseAutoencoder):
        check_training_store(sae_uri, store, storage_options, allow_other_store)
    if str(out_uri).rstrip("/") in {
        str(sae_info["uri"] or "").rstrip("/"),
        *[u.rstrip("/") for u in store.uris],
    }:
        raise ValueError(f"out_uri={out_uri!r} is an input folder: expected a new location")
    storage.unpublish(out_uri, "steering", storage_options)

    ev = evaluate_steering(backend, sae, store, p, on_progress=on_progress)
    written: dict[str, dict[str, Any]] = {}
    try:
        fig = ev.figure()
        try:
            payloads = {
                "sweep.parquet": _parquet(ev.table),
                "generations.parquet": _parquet(ev.generations),
                "latents.parquet": _parquet(ev.picks),
                "vocabulary.parquet": _parquet(ev.vocabulary),
                "sweep.png": figure_bytes(fig, "png"),
                "sweep.svg": figure_bytes(fig, "svg"),
                "summary.json": storage.canonical_json(_json_safe(ev.summary), indent=2).encode(),
            }
        finally:
            close_figure(fig)
        for name, data in payloads.items():
            storage.write_bytes(storage.join(out_uri, name), data, storage_options)
            written[name] = storage.file_entry("", data)
        return storage.write_manifest(
            out_uri, "steering", p, written, storage_options,
            sae=sae_info,
            activations={"uris": list(store.uris), "content_hash": store.content_hash, "hook_point": store.hook_point},
            model=backend.describe() if hasattr(backend, "describe") else None,
            summary=_json_safe({k: ev.summary[k] for k in ("hook_point", "classifier", "latents")}),
        )  # fmt: skip
    except BaseException:
        for name in written:
            try:
                storage.remove(storage.join(out_uri, name), storage_options, recursive=False)
            except Exception as e:  # best effort: no manifest was written
                log.warning("could not remove %s after a failed steering evaluation: %s", name, e)
        raise


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


class SteeringResult:
    """A published steering evaluation, read lazily: ``manifest``, ``summary`` and the tables
    ``sweep``, ``generations``, ``picks``, ``vocabulary`` as DataFrames."""

    def __init__(self, uri: str, storage_options: Mapping[str, Any] | None = None):
        self.uri = uri
        self.storage_options = storage_options
        self.manifest = storage.read_manifest(uri, storage_options, kind="steering")
        self._cache: dict[str, Any] = {}

    def read(self, name: str) -> bytes:
        if name not in self.manifest["files"]:
            raise FileNotFoundError(f"{self.uri!r} has no {name!r}")
        return storage.read_bytes(storage.join(self.uri, name), self.storage_options)

    def _table(self, name: str) -> pd.DataFrame:
        if name not in self._cache:
            self._cache[name] = pd.read_parquet(io.BytesIO(self.read(name)))
        return self._cache[name]

    @property
    def sweep(self) -> pd.DataFrame:
        return self._table("sweep.parquet")

    table = sweep

    @property
    def generations(self) -> pd.DataFrame:
        return self._table("generations.parquet")

    @property
    def picks(self) -> pd.DataFrame:
        return self._table("latents.parquet")

    @property
    def vocabulary(self) -> pd.DataFrame:
        return self._table("vocabulary.parquet")

    @property
    def summary(self) -> dict[str, Any]:
        if "summary" not in self._cache:
            self._cache["summary"] = json.loads(self.read("summary.json"))
        return self._cache["summary"]

    def figure(self) -> Figure:
        """The sweep plot, redrawn from the table (the PNG/SVG are ``read('sweep.png')``)."""
        return plot_sweep(self.sweep, self.summary.get("ppl_ratio_max"))


def load_steering(uri: str, storage_options: Mapping[str, Any] | None = None) -> SteeringResult:
    """Open a published steering evaluation."""
    return SteeringResult(uri, storage_options)


def side_by_side(
    result: SteeringEval | SteeringResult | str,
    latent: int | None = None,
    strength: float | None = None,
    *,
    prompts: str = "neutral",
    storage_options: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Unsteered and steered continuations of the same prompts: ``prompt, unsteered, steered``.

    ``latent``: default the first steered latent. ``strength``: default the summary's best
    strength within the fluency bound (else the largest). ``prompts``: ``neutral`` or
    ``own_label``.
    """
    if isinstance(result, str):
        result = load_steering(result, storage_options)
    g = result.generations
    summ = {int(s["latent"]): s for s in result.summary.get("latents", [])}
    if latent is None:
        latent = int(g.loc[g["control"] == "steer", "latent"].iloc[0])
    if latent not in set(g["latent"].astype(int)):
        raise ValueError(
            f"latent={latent}: not steered in this evaluation (latents {sorted(summ)})"
        )
    steered_rows = g[
        (g["latent"] == latent)
        & (g["prompts"] == prompts)
        & g["strength"].notna()
        & g["control"].isin(["steer", "own_label"])
    ]
    if strength is None:
        best = summ.get(latent, {}).get("best_strength")
        strength = float(best) if best is not None else float(steered_rows["strength"].max())
    st = steered_rows[np.isclose(steered_rows["strength"], strength)]
    if st.empty:
        raise ValueError(
            f"strength={strength}: not in the sweep {sorted(steered_rows['strength'].unique())}"
        )
    base_control = "unsteered" if prompts == "neutral" else "own_label"
    base = g[
        (g["latent"] == latent)
        & (g["control"] == base_control)
        & g["strength"].isna()
        & (g["prompts"] == prompts)
    ]
    label = str(st["label"].iloc[0])
    return pd.DataFrame(
        {
            "prompt": st["prompt"].to_numpy(),
            "unsteered": base["text"].to_numpy()[: len(st)],
            f"steered ({latent} {label}, strength {strength:g})": st["text"].to_numpy(),
        }
    )


def steering_section(
    result: SteeringEval | SteeringResult | str, storage_options: Mapping[str, Any] | None = None
):
    """A :class:`~integral_superposition.viz.report.ReportSection` with the sweep table, the
    plot and side-by-side generations of every steered latent."""
    from integral_superposition.viz.report import ReportSection

    if isinstance(result, str):
        result = load_steering(result, storage_options)
    s = result.summary
    clf = s.get("classifier", {})
    lines = [
        f"Steering at {s.get('hook_point')} ({s.get('mode')}, positions {s.get('positions')}) over "
        f"{s.get('n_prompts')} neutral prompts. Label classifier: held-out accuracy "
        f"{clf.get('held_out_accuracy', float('nan')):.3f} (chance {clf.get('chance', float('nan')):.2f})."
    ]
    for lat in s.get("latents", []):
        best = lat.get("best_strength")
        lines.append(
            f"Latent {lat['latent']} ({lat['label']}): classifier share {lat['baseline_share']:.2f} unsteered"
            + (
                f", {lat['best_share']:.2f} at strength {best:g} (perplexity x{lat['best_ppl_ratio']:.2f})"
                if best is not None
                else ", no strength within the fluency bound"
            )
            + (
                f"; random latent {lat['random_latent']} moves it by at most {lat['random_max_shift']:.2f}."
                if lat.get("random_max_shift") is not None
                else "."
            )
        )
    cols = [
        "latent",
        "label",
        "control",
        "strength",
        "share",
        "vocab_mass",
        "perplexity",
        "ppl_ratio",
        "distinct2",
        "classifier_accuracy",
    ]
    table = result.table[cols].round(4)
    gens = []
    for lat in s.get("latents", []):
        try:
            gens.append(side_by_side(result, int(lat["latent"])))
        except ValueError:
            continue
    frame = pd.concat(gens, ignore_index=True) if gens else None
    if frame is not None:  # one steered column per latent: merge them under one header
        steered = frame.filter(like="steered (").bfill(axis=1).iloc[:, 0]
        frame = pd.DataFrame(
            {"prompt": frame["prompt"], "unsteered": frame["unsteered"], "steered": steered}
        )
    return ReportSection(
        "Steering",
        text="\n\n".join(lines),
        tables=[("Strength sweep with controls", table)],
        figures=[("Effect against perplexity", result.figure())],
        generations=frame,
        anchor="steering",
    )
