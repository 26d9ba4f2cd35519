"""Which latents to steer: the most label-enriched latents, and a topic-neutral random
latent of matched decoder norm as the control of each."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch

__all__ = [
    "enrichment_tables",
    "group_picks",
    "mean_diff_latents",
    "pick_latents",
    "random_controls",
    "target_latents",
    "vocabulary_logit_scores",
]


# -- picking latents --------------------------------------------------------------------------------
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


def _enriched(
    token_table: pd.DataFrame, doc_table: pd.DataFrame | None, q_max: float
) -> pd.DataFrame:
    """The token table's rows enriched at ``q < q_max`` (positive log odds), labels as text,
    with the document table's ``doc_q`` and ``doc_log_odds`` joined (NaN without it)."""
    t = token_table.copy()
    t["label"] = t["label"].astype(str)
    t = t[(t["q"] < q_max) & (t["log_odds"] > 0)]
    if doc_table is None:
        return t.assign(doc_q=np.nan, doc_log_odds=np.nan)
    d = doc_table[["latent", "label", "q", "log_odds"]].copy()
    d["label"] = d["label"].astype(str)
    return t.merge(
        d.rename(columns={"q": "doc_q", "log_odds": "doc_log_odds"}),
        on=["latent", "label"],
        how="left",
    )


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
    if per_label < 1:
        raise ValueError(f"per_label={per_label}: expected >= 1")
    names = [str(x) for x in token_table["label"].astype(str).unique()]
    if labels is not None:
        unknown = [lb for lb in labels if lb not in names]
        if unknown:
            raise ValueError(
                f"labels={list(labels)}: {unknown} not among the store's labels {names}"
            )
    t = _enriched(token_table, doc_table, q_max)
    if labels is not None:
        t = t[t["label"].isin(list(labels))]
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


def mean_diff_latents(
    label_codes: np.ndarray,
    names: Sequence[str],
    *,
    labels: Sequence[str] | None = None,
    per_label: int = 1,
) -> pd.DataFrame:
    """Each label's latents by how much more they fire on its documents: ``label, latent,
    mean_diff``, ``per_label`` rows per label at most, largest difference first.

    ``label_codes [n_labels, K]``: each label's mean document code
    (:func:`~integral_superposition.analysis.stats.label_mean_codes`). A latent's ``mean_diff``
    for label ``c`` is ``label_codes[c]`` minus the mean of the other labels' rows (each other
    label the same weight, so a larger label does not set the reference); only latents with a
    positive difference are kept. Adding ``mean_diff`` to every kept latent moves an average
    token's code from the other labels' toward the label's: the sum of those edits through the
    decoder is the SAE's view of the mean-difference steering vector."""
    codes = np.asarray(label_codes, dtype=np.float64)
    names = [str(n) for n in names]
    if codes.ndim != 2 or codes.shape[0] != len(names):
        raise ValueError(
            f"label_codes has shape {codes.shape}: expected [{len(names)}, K], one row per label"
        )
    if len(names) < 2:
        raise ValueError(f"names={names}: a mean difference needs at least two labels")
    if per_label < 1:
        raise ValueError(f"per_label={per_label}: expected >= 1")
    wanted = list(labels) if labels is not None else names
    unknown = [lb for lb in wanted if lb not in names]
    if unknown:
        raise ValueError(f"labels={wanted}: {unknown} not among the store's labels {names}")
    ok = np.isfinite(codes).all(1)
    rows = []
    for lb in wanted:
        c = names.index(lb)
        others = ok.copy()
        others[c] = False
        if not ok[c] or not others.any():
            continue
        diff = codes[c] - codes[others].mean(0)
        order = np.argsort(-diff, kind="stable")[:per_label]
        order = order[diff[order] > 0]
        rows += [{"label": lb, "latent": int(j), "mean_diff": float(diff[j])} for j in order]
    return pd.DataFrame(rows, columns=["label", "latent", "mean_diff"])


@torch.no_grad()
def vocabulary_logit_scores(
    W_dec: torch.Tensor, W_U: torch.Tensor, final_norm, vocab_ids: Sequence[int]
) -> np.ndarray:
    """How strongly each decoder row ``W_dec [M, d]`` promotes the tokens ``vocab_ids``
    through the unembedding ``W_U [V, d]`` (after the model's final norm, as
    :func:`~integral_superposition.analysis.logit_lens.logit_lens`): the mean direct logit of
    those tokens minus the mean over the vocabulary, in standard deviations of the row's
    logits. ``[M]``; 0 means the row favours them no more than any token."""
    ids = torch.as_tensor(list(vocab_ids), dtype=torch.long)
    if ids.numel() == 0:
        return np.zeros(W_dec.shape[0])
    WU = W_U.detach().float()
    rows = W_dec.detach().float().to(WU.device)
    if final_norm is not None:
        ref = next(final_norm.parameters(), None)
        dt = ref.dtype if ref is not None else torch.float32
        zero = final_norm(torch.zeros(1, rows.shape[1], device=WU.device, dtype=dt)).float()
        rows = final_norm(rows.to(dt)).float() - zero
    out = []
    for a in range(0, rows.shape[0], 64):
        logits = rows[a : a + 64] @ WU.T  # [m, V]
        mu, sd = logits.mean(1), logits.std(1).clamp_min(1e-12)
        out.append(((logits[:, ids.to(WU.device)].mean(1) - mu) / sd).cpu())
    return torch.cat(out).double().numpy()


@torch.no_grad()
def vocabulary_gain_scores(
    backend,
    sae,
    hook_point,
    latents: Sequence[int],
    values: Sequence[float],
    vocab_ids: Sequence[int],
    prompt_ids: Sequence[Sequence[int]],
    token_ids: Sequence[Sequence[int]],
    batch_size: int = 8,
) -> pd.DataFrame:
    """What each latent writes through the whole model: latent ``latents[m]`` clamped to
    ``values[m]`` on every token of each sequence ``prompt_ids[i] + token_ids[i]``, the forward
    teacher-forced on the continuation ``token_ids[i]``.

    Returns one row per latent: ``latent``, ``vocab_gain`` (log of the mean probability the
    next-token distributions at the continuations' positions put on ``vocab_ids``, steered
    over unsteered; 0 for an edit that changes nothing) and ``nll_gain`` (the continuation
    tokens' mean NLL in nats, steered minus unsteered: the edit's cost in fluency)."""
    from integral_superposition.steering.edits import Edit
    from integral_superposition.steering.generation import continuation_log_probs
    from integral_superposition.steering.hooks import steer

    if len(latents) != len(values):
        raise ValueError(
            f"values has {len(values)} entries but latents has {len(latents)}: expected one "
            "clamp value per latent"
        )
    if len(prompt_ids) != len(token_ids):
        raise ValueError(
            f"prompt_ids has {len(prompt_ids)} rows but token_ids has {len(token_ids)}: "
            "expected one continuation per prompt"
        )
    if not any(len(t) for t in token_ids):
        raise ValueError("token_ids: expected at least one non-empty continuation to score")
    ids = torch.as_tensor(list(vocab_ids), dtype=torch.long, device=backend.device)

    def measure() -> tuple[float, float]:
        """Mean vocabulary probability and mean NLL over every continuation token."""
        mass = nll = 0.0
        n = 0
        for _, lp, tgt in continuation_log_probs(backend, prompt_ids, token_ids, batch_size):
            mass += float(lp[:, ids].logsumexp(-1).exp().sum()) if len(ids) else 0.0
            nll -= float(lp.gather(1, tgt[:, None]).sum())
            n += tgt.numel()
        return mass / n, nll / n

    mass0, nll0 = measure()
    out = []
    for j, v in zip(latents, values, strict=True):
        with steer(backend, sae, hook_point, [Edit(int(j), "set", float(v))], "all"):
            mass, nll = measure()
        gain = float(np.log(mass / mass0)) if mass0 > 0 and mass > 0 else 0.0
        out.append({"latent": int(j), "vocab_gain": gain, "nll_gain": nll - nll0})
    return pd.DataFrame(out, columns=["latent", "vocab_gain", "nll_gain"])


def _best_by(picks: pd.DataFrame, column: str, per_label: int) -> pd.DataFrame:
    """Each label's ``per_label`` rows with the highest ``column`` (labels in their order,
    ties in rank order)."""
    order = {lb: i for i, lb in enumerate(dict.fromkeys(picks["label"]))}
    return (
        picks.assign(_o=picks["label"].map(order))
        .sort_values(["_o", column], ascending=[True, False], kind="stable")
        .groupby("label", sort=False)
        .head(per_label)
        .drop(columns="_o")
        .reset_index(drop=True)
    )


def target_latents(
    p,
    tok_table: pd.DataFrame,
    doc_table: pd.DataFrame | None,
    names: list[str],
    *,
    sae=None,
    backend=None,
    vocab: pd.DataFrame | None = None,
    gain_scorer: Callable[[str, list[int]], pd.DataFrame] | None = None,
    label_codes: np.ndarray | None = None,
) -> pd.DataFrame:
    """The latents to steer with their target label: picked by enrichment (``auto``) or given
    (target label: given, else the latent's most significant label).

    ``p.rank_by="vocab_logit"``: among each label's ``p.candidates`` best latents by
    document-level enrichment, the ones whose decoder direction promotes the label's target
    vocabulary (``vocab``) most through the model's unembedding
    (:func:`vocabulary_logit_scores`; needs ``sae`` and ``backend``). Enrichment says a latent
    *reads* the topic; steering needs one that *writes* it. ``p.rank_by="vocab_gain"``: among
    the same candidates, the ones with the highest ``vocab_gain`` through the whole model,
    ``gain_scorer(label, latents)`` (a :func:`vocabulary_gain_scores` table; its ``vocab_gain``
    and ``nll_gain`` columns join the picks). ``p.rank_by="mean_diff"``: the latents with the
    largest difference of mean document code, ``label_codes`` (:func:`mean_diff_latents`),
    whatever their enrichment; the enrichment columns join them where the tables have them."""
    if p.latents == "auto" and p.rank_by == "mean_diff":
        if label_codes is None:
            raise ValueError("rank_by='mean_diff' needs label_codes (label_mean_codes)")
        picks = mean_diff_latents(label_codes, names, labels=p.labels, per_label=p.per_label)
        if picks.empty:
            raise ValueError(
                f"no latent fires more on the documents of any of the labels {p.labels or names}"
            )
        enr = _enriched(tok_table, doc_table, 1.0).drop_duplicates(["label", "latent"])
        cols = ["q", "log_odds", "frac_in_set", "doc_q", "doc_log_odds"]
        return picks.merge(enr[["label", "latent", *cols]], on=["label", "latent"], how="left")[
            ["label", "latent", *cols, "mean_diff"]
        ]
    if p.latents == "auto":
        by_vocab = p.rank_by in ("vocab_logit", "vocab_gain")
        picks = pick_latents(
            tok_table, doc_table, labels=p.labels,
            per_label=max(p.per_label, p.candidates) if by_vocab else p.per_label,
            q_max=p.q_max, rank_by="doc_q" if by_vocab else p.rank_by,
        )  # fmt: skip
        if picks.empty:
            raise ValueError(
                f"no latent is enriched for any of the labels {p.labels or names} at q < {p.q_max}"
            )
        if p.rank_by == "vocab_gain":
            if gain_scorer is None:
                raise ValueError("rank_by='vocab_gain' needs gain_scorer (vocabulary_gain_scores)")
            scores = pd.concat(
                [
                    gain_scorer(str(label), [int(j) for j in g["latent"]]).assign(label=label)
                    for label, g in picks.groupby("label", sort=False)
                ],
                ignore_index=True,
            )
            return _best_by(picks.merge(scores, on=["label", "latent"], how="left"),
                            "vocab_gain", p.per_label)  # fmt: skip
        if by_vocab:
            if sae is None or backend is None or vocab is None:
                raise ValueError(
                    "rank_by='vocab_logit' needs the SAE, the backend and the vocabulary"
                )
            W_U = backend.output_embedding()
            norm = backend.final_norm()
            score = np.zeros(len(picks))
            for label, idx in picks.groupby("label", sort=False).groups.items():
                ids = vocab.loc[vocab["label"] == label, "token_id"].tolist()
                rows = sae.W_dec[
                    torch.tensor(picks.loc[idx, "latent"].to_numpy(), dtype=torch.long)
                ]
                score[picks.index.get_indexer(idx)] = vocabulary_logit_scores(rows, W_U, norm, ids)
            picks = _best_by(picks.assign(vocab_logit=score), "vocab_logit", p.per_label)
        return picks
    t = tok_table.assign(label=tok_table["label"].astype(str))
    t = t[t["latent"].isin(p.latents)].sort_values(["q", "log_odds"], ascending=[True, False])
    best = t.drop_duplicates("latent").set_index("latent")["label"]
    labels = p.labels if p.labels is not None else [best[j] for j in p.latents]
    pairs = pd.DataFrame({"latent": p.latents, "label": labels})
    cols = ["latent", "label", "q", "log_odds", "frac_in_set"]
    return pairs.merge(t[cols], on=["latent", "label"], how="left")[["label", *cols[:1], *cols[2:]]]


def random_controls(
    picks: pd.DataFrame,
    tok_table: pd.DataFrame,
    norms: np.ndarray,
    q_max: float,
    seed: int,
    draws: int = 1,
) -> pd.DataFrame:
    """For each steered latent, a random latent that fired in the data and is enriched for no
    label (a topic-neutral perturbation; if there is none, one not enriched for the target
    label), and the decoder-norm ratio that matches the injected vectors.

    A pick with a ``members`` column (a group steered together, :func:`group_picks`) gets as
    many distinct random latents, none of them a member: ``random_members`` and
    ``random_ratios`` (member ``i``'s decoder norm over random latent ``i``'s), with the first
    as ``random_latent`` and ``random_ratio``.

    ``draws``: independent draws per pick, ``random_draws`` (``[draws][members]`` latents, -1
    where there is no candidate) and ``random_draw_ratios``. Draw 0 is the one above, the
    same as with ``draws=1``; the later draws follow it from the same generator."""
    if isinstance(draws, bool) or int(draws) != draws or draws < 1:
        raise ValueError(f"draws={draws!r}: expected a positive whole number")
    t = tok_table.assign(label=tok_table["label"].astype(str))
    fired = np.zeros(norms.shape[0], dtype=bool)
    fired[t.loc[t["fires"], "latent"].to_numpy()] = True
    enriched = (t["q"] < q_max) & (t["log_odds"] > 0)
    neutral = fired.copy()
    neutral[t.loc[enriched, "latent"].to_numpy()] = False
    rng = np.random.default_rng(seed)
    groups = (
        [[int(j) for j in m] for m in picks["members"]]
        if "members" in picks
        else [[int(j)] for j in picks["latent"]]
    )
    cands_of = []
    for label, members in zip(picks["label"], groups, strict=True):
        ok = neutral.copy()
        ok[members] = False
        if ok.sum() < len(members):
            ok = fired.copy()
            ok[t.loc[enriched & (t["label"] == label), "latent"].to_numpy()] = False
            ok[members] = False
        cands_of.append(np.flatnonzero(ok))
    # every pick's draw 0 first, so that it is the draw of draws=1
    by_draw: list[list[list[int]]] = []
    for _ in range(int(draws)):
        randoms: list[list[int]] = []
        for members, cands in zip(groups, cands_of, strict=True):
            if cands.size < len(members):
                randoms.append([-1] * len(members))
            elif len(members) == 1:
                randoms.append([int(rng.choice(cands))])
            else:
                randoms.append([int(r) for r in rng.choice(cands, len(members), replace=False)])
        by_draw.append(randoms)

    def ratios(members: list[int], rs: list[list[int]]) -> list[list[float]]:
        """``[draws][members]`` member norm over random latent norm (nan where none)."""
        r = np.asarray(rs, dtype=np.int64)
        out = norms[np.asarray(members)][None, :] / norms[np.maximum(r, 0)]
        return np.where(r >= 0, out, np.nan).tolist()

    draws_of = [[d[i] for d in by_draw] for i in range(len(groups))]
    ratios_of = [ratios(m, ds) for m, ds in zip(groups, draws_of, strict=True)]
    out = picks.assign(
        random_latent=[ds[0][0] for ds in draws_of],
        random_ratio=[rt[0][0] for rt in ratios_of],
    )
    if "members" in picks:
        out = out.assign(
            random_members=[ds[0] for ds in draws_of], random_ratios=[rt[0] for rt in ratios_of]
        )
    return out.assign(random_draws=draws_of, random_draw_ratios=ratios_of)


def group_picks(picks: pd.DataFrame, group_size: int) -> pd.DataFrame:
    """Each label's first ``group_size`` picks (in rank order) as one pick: the first row,
    with ``members`` (the latents, best first) and, when ``picks`` has ``max_act`` /
    ``mean_diff``, ``member_max_acts`` / ``member_mean_diffs``."""
    if isinstance(group_size, bool) or int(group_size) != group_size or group_size < 1:
        raise ValueError(f"group_size={group_size!r}: expected a positive whole number")
    rows = []
    for _, g in picks.groupby("label", sort=False):
        g = g.head(int(group_size))
        row = g.iloc[0].to_dict()
        row["members"] = [int(j) for j in g["latent"]]
        for col, out in (("max_act", "member_max_acts"), ("mean_diff", "member_mean_diffs")):
            if col in g:
                row[out] = [float(m) for m in g[col]]
        rows.append(row)
    extra = [out for col, out in (("max_act", "member_max_acts"),
                                  ("mean_diff", "member_mean_diffs")) if col in picks]  # fmt: skip
    return pd.DataFrame(rows, columns=[*picks.columns, "members", *extra])
