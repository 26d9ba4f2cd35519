"""SAE evaluation metrics (definitions in docs/sae.md).

All metrics are computed on one token set: the stored rows of an ``ActivationStore`` (real
tokens only: no BOS, pad or special tokens), usually its held-out ``test`` split.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from integral_superposition.sae.encode import encode_chunks
from integral_superposition.sae.model import SparseAutoencoder

DENSE_THRESHOLD = 0.1
DENSE_THRESHOLD_LOOSE = 0.01
DEAD_MIN_TOKENS = 100_000
"""Fewest tokens a latent must never fire on to count as dead (all tokens when fewer)."""
CE_LOGITS_ELEMENTS = 1 << 25
"""Most logits ``B x T x vocab`` one forward of :func:`spliced_ce` returns (128 MiB of
float32): texts are run in smaller forwards when ``batch_size`` texts would exceed it."""
CE_BLOCK_ELEMENTS = 1 << 22
"""Values per float64 block of the CE / KL reductions (32 MiB)."""


def dead_count_rows(mask: np.ndarray, min_tokens: int = DEAD_MIN_TOKENS) -> np.ndarray | None:
    """Rows to add to the ``mask`` rows (``bool[N]``) so that a dead count covers at least
    ``min_tokens`` tokens, or all ``N`` when there are fewer: ``bool[N]`` rows outside the
    mask, evenly spaced over the store, or None when the mask has enough."""
    mask = np.asarray(mask, dtype=bool)
    target = min(int(min_tokens), mask.size)
    n = int(mask.sum())
    if n >= target:
        return None
    rest = np.flatnonzero(~mask)
    pick = rest[np.unique(np.linspace(0, rest.size - 1, target - n).round().astype(np.int64))]
    extra = np.zeros(mask.size, dtype=bool)
    extra[pick] = True
    return extra


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
        self.update_reconstruction(x, x_hat)

    @torch.no_grad()
    def update_reconstruction(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        """Only the reconstruction terms (SSE, sums of x, cosine, norm ratio) for
        ``x, x_hat [B, d]``; the caller counts the tokens and latents."""
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
        """Scalar metrics: L0, EV, FVU, dead/dense fractions, cosine and norm ratio (the
        reconstruction terms NaN when only latents were counted)."""
        dens = self.density
        ev = self.explained_variance
        recon = self.sum_x is not None and self.n_tokens > 0
        return {
            "n_tokens": int(self.n_tokens),
            "l0": self.l0,
            "explained_variance": ev,
            "fvu": 1.0 - ev,
            "dead_frac": float((self.fire_count == 0).mean()),
            "dense_frac": float((dens > DENSE_THRESHOLD).mean()),
            "dense_frac_001": float((dens > DENSE_THRESHOLD_LOOSE).mean()),
            # NaN (shown as "-") when no reconstruction was accumulated
            "cos_sim": self.cos_sum / self.n_tokens if recon else float("nan"),
            "norm_ratio": self.norm_ratio_sum / self.n_tokens if recon else float("nan"),
        }

    def log10_density_hist(
        self, bins: int = 50, lo: float = -10.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """Histogram of ``log10(density + 1e-10)``: ``(counts [bins], edges [bins + 1])``."""
        # latents firing on every token sit at log10(1 + 1e-10) > 0: keep them in the last bin
        logd = np.minimum(np.log10(self.density + 1e-10), 0.0)
        return np.histogram(logd, bins=bins, range=(lo, 0.0))


@torch.no_grad()
def latent_stats(
    sae: SparseAutoencoder,
    store,
    mask: np.ndarray | None = None,
    chunk_tokens: int = 16384,
    device: str | torch.device | None = None,
    hook_point: str | None = None,
) -> LatentStats:
    """One streaming pass of ``sae`` over ``store`` rows (``mask``: ``bool[n_tokens]``).

    Memory is O(d_sae + chunk_tokens * d_sae), independent of the number of tokens.
    ``hook_point`` picks the store's hook point (default: the store's own).
    """
    stats = LatentStats(sae.d_sae)
    for _rows, x, z, x_hat in encode_chunks(
        sae, store, device, chunk_tokens=chunk_tokens, mask=mask, hook_point=hook_point,
        reconstruct=True,
    ):  # fmt: skip
        stats.update(x, z, x_hat)
    if stats.n_tokens == 0:
        raise ValueError("latent_stats: the selected token set is empty")
    return stats


def _default_hook(sae: SparseAutoencoder, store=None) -> str | None:
    meta = getattr(sae, "metadata", {}) or {}
    return (
        meta.get("isup_hook_point")
        or meta.get("hook_name")
        or (store.hook_point if store is not None else None)
    )


Reconstruction = SparseAutoencoder | Callable[[torch.Tensor], torch.Tensor]
"""What :func:`spliced_ce` splices in: an SAE (its ``reconstruct``) or a function of the
hook point's activation ``[B, T, d]`` returning its replacement ``[B, T, d]``."""


def _splice_fn(name: str, recon: Reconstruction, d_model: int):
    """``x [B, T, d] -> replacement [B, T, d]`` for one entry of :func:`spliced_ce_many`."""
    if isinstance(recon, SparseAutoencoder):
        if recon.d_in != d_model:
            raise ValueError(
                f"saes[{name!r}].d_in={recon.d_in} does not match the model's d_model={d_model}"
            )
        dev = recon.W_enc.device
        return lambda x: recon.reconstruct(x.to(dev, torch.float32)).to(x.device)
    if not callable(recon):
        raise TypeError(
            f"saes[{name!r}]: expected a SparseAutoencoder or a function of the activation, "
            f"got {type(recon).__name__}"
        )
    return recon


@torch.no_grad()
def spliced_ce(
    backend,
    sae: Reconstruction,
    hook_point: str | int | None,
    texts: Sequence[str],
    *,
    batch_size: int = 8,
    max_len: int = 64,
    prepend_bos: bool = True,
    drop_bos: bool = True,
    drop_special: bool = True,
) -> dict[str, float]:
    """Next-token CE with the SAE reconstruction spliced in at ``hook_point``.

    Three forwards per batch on the same tokens: clean, with the activation replaced by
    ``sae.reconstruct`` and with it replaced by zeros. Only the positions an activation dump
    stores are replaced (no pad; no BOS or special tokens under ``drop_bos``/``drop_special``),
    and the CE and ``KL(p_clean || p_spliced)`` are averaged over the predictions made at a
    replaced position whose target is also a stored token. So an identity SAE leaves the CE
    unchanged and a zero SAE gives the zero-ablation CE. ``sae`` may also be a function of
    the activation ``[B, T, d]`` (``lambda x: x`` splices the clean activation back).

    ``batch_size`` texts go through one forward unless their logits ``[B, max_len, vocab]``
    would exceed :data:`CE_LOGITS_ELEMENTS` (then fewer); the CE and KL reductions run in
    float64 blocks of rows, so memory stays bounded for large vocabularies.

    Returns ``ce_clean``, ``ce_sae``, ``ce_zero`` (nats), ``delta_ce = ce_sae - ce_clean``,
    ``ce_recovered = (ce_zero - ce_sae) / (ce_zero - ce_clean)``, ``kl`` and ``kl_zero``
    (nats per prediction) and ``n_predictions``.
    """
    if isinstance(sae, SparseAutoencoder):
        hook_point = hook_point if hook_point is not None else _default_hook(sae)
        if hasattr(backend, "d_model") and sae.d_in != backend.d_model:
            raise ValueError(
                f"sae.d_in={sae.d_in} does not match the model's d_model={backend.d_model}"
            )
    return spliced_ce_many(
        backend,
        {"sae": sae},
        hook_point,
        texts,
        batch_size=batch_size,
        max_len=max_len,
        prepend_bos=prepend_bos,
        drop_bos=drop_bos,
        drop_special=drop_special,
    )["sae"]


@torch.no_grad()
def spliced_ce_many(
    backend,
    saes: Mapping[str, Reconstruction],
    hook_point: str | int | None,
    texts: Sequence[str],
    *,
    batch_size: int = 8,
    max_len: int = 64,
    prepend_bos: bool = True,
    drop_bos: bool = True,
    drop_special: bool = True,
) -> dict[str, dict[str, float]]:
    """:func:`spliced_ce` of several SAEs on the same texts: ``{name: its results}``.

    Each batch runs the clean and the zero-ablated forward once and one spliced forward per
    SAE (``2 + n`` forwards instead of ``3 n``); every SAE's CE and KL are taken at the same
    predictions against the same clean logits, so their rows compare exactly. ``hook_point``
    None: the first SAE's metadata names it.
    """
    from integral_superposition.config import DumpConfig
    from integral_superposition.data.tokenize import pad_batch, pad_token_id, tokenize_texts
    from integral_superposition.dump.activations import TokenMask

    if not hasattr(backend, "logits"):
        raise TypeError(
            f"backend: expected a causal LM backend with logits() (HFCausalLM), got {type(backend).__name__}"
        )
    if not saes:
        raise ValueError("saes is empty: expected at least one SAE to splice in")
    texts = [str(t) for t in texts]
    if not texts:
        raise ValueError("texts is empty: expected at least one text")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected a positive number of texts")
    if hook_point is None:
        first = next((s for s in saes.values() if isinstance(s, SparseAutoencoder)), None)
        hook_point = _default_hook(first) if first is not None else None
    if hook_point is None:
        raise ValueError("hook_point: not given and the SAE's metadata names none")
    hp = backend.hook_point(hook_point)
    fns = {name: _splice_fn(name, r, backend.d_model) for name, r in saes.items()}
    tok = backend.tokenizer
    token_mask = TokenMask(
        tok, DumpConfig(max_len=max_len, drop_bos=drop_bos, drop_special=drop_special)
    )
    pad = pad_token_id(tok)
    ce_clean = ce_zero = kl_zero = 0.0
    sums = {name: [0.0, 0.0] for name in fns}  # summed CE and KL per SAE
    n_pred = 0
    config = getattr(getattr(backend, "model", None), "config", None)
    vocab = max(len(tok), int(getattr(config, "vocab_size", 0) or 0))
    # forwards of at most CE_LOGITS_ELEMENTS logits (a [B, T, vocab] tensor each)
    per_forward = max(1, min(batch_size, CE_LOGITS_ELEMENTS // max(1, max_len * vocab)))
    # batches of similar lengths: less padding to run through the blocks and the LM head (the
    # sums below do not depend on the order)
    all_seqs = tokenize_texts(tok, texts, max_len, prepend_bos)
    all_seqs = sorted(all_seqs, key=len)
    for a in range(0, len(all_seqs), per_forward):
        seqs = all_seqs[a : a + per_forward]
        batch = pad_batch(seqs, pad, "right")
        keep = token_mask.batch(batch.input_ids, batch.lengths)  # [B, T] spliced positions
        pred = keep[:, :-1] & keep[:, 1:]  # predictions at spliced positions of stored targets
        if not pred.any():
            continue
        targets = batch.input_ids[:, 1:][pred]
        keep_dev = keep.to(backend.device)

        def splice(x: torch.Tensor, fn, keep_dev=keep_dev) -> torch.Tensor:
            return torch.where(keep_dev[..., None], fn(x).to(x.dtype), x)

        def selected(ids=batch.input_ids, am=batch.attention_mask, pred=pred) -> torch.Tensor:
            return backend.logits(ids, am)[:, :-1][pred]  # float32 [P, vocab]

        clean = selected()
        tgt = targets.to(clean.device)
        ce_clean += _ce_and_kl(clean, None, tgt)[0]
        with backend.edit(hp, lambda x: splice(x, torch.zeros_like)):
            ce, kl = _ce_and_kl(selected(), clean, tgt)
        ce_zero += ce
        kl_zero += kl
        for name, fn in fns.items():
            with backend.edit(hp, lambda x, fn=fn: splice(x, fn)):
                ce, kl = _ce_and_kl(selected(), clean, tgt)
            sums[name][0] += ce
            sums[name][1] += kl
        n_pred += int(pred.sum())
        del clean
    if n_pred == 0:
        raise ValueError("texts: no prediction at a stored position (texts too short?)")
    clean_mean, zero_mean = ce_clean / n_pred, ce_zero / n_pred
    denom = zero_mean - clean_mean
    out = {}
    for name, (ce_sum, kl_sum) in sums.items():
        ce_sae = ce_sum / n_pred
        out[name] = {
            "ce_clean": clean_mean,
            "ce_sae": ce_sae,
            "ce_zero": zero_mean,
            "delta_ce": ce_sae - clean_mean,
            "ce_recovered": (zero_mean - ce_sae) / denom if abs(denom) > 1e-12 else float("nan"),
            "kl": kl_sum / n_pred,
            "kl_zero": kl_zero / n_pred,
            "n_predictions": n_pred,
        }
    return out


def _ce_and_kl(
    logits: torch.Tensor, clean: torch.Tensor | None, targets: torch.Tensor
) -> tuple[float, float]:
    """Summed CE of ``logits`` ``[P, V]`` at ``targets`` ``[P]`` and summed
    ``KL(softmax(clean) || softmax(logits))`` (0 without ``clean``), in float64.

    Rows go through in blocks of about :data:`CE_BLOCK_ELEMENTS` values, so no float64
    ``[P, V]`` copy is made.
    """
    rows = max(1, CE_BLOCK_ELEMENTS // max(1, logits.shape[1]))
    ce = kl = 0.0
    for a in range(0, logits.shape[0], rows):
        lp = torch.log_softmax(logits[a : a + rows].double(), dim=-1)
        ce -= float(lp.gather(1, targets[a : a + rows, None]).sum())
        if clean is not None:
            lc = torch.log_softmax(clean[a : a + rows].double(), dim=-1)
            kl += float((lc.exp() * (lc - lp)).sum())
    return ce, kl


def evaluate_sae(
    sae: SparseAutoencoder,
    store,
    backend=None,
    *,
    split: str = "test",
    test_fraction: float = 0.05,
    split_seed: int = 0,
    hook_point: str | None = None,
    chunk_tokens: int = 8192,
    device: str | torch.device | None = None,
    n_ce_docs: int = 64,
    ce_batch_size: int = 8,
    hist_bins: int = 50,
    dead_min_tokens: int = DEAD_MIN_TOKENS,
) -> dict[str, Any]:
    """Evaluate ``sae`` on a split of ``store`` (the held-out ``test`` split by default).

    Returns scalars - ``n_tokens``, ``l0``, ``explained_variance`` (about the mean), ``fvu``,
    ``mse`` (per token, summed over d), ``dead_frac`` (never fires on ``dead_tokens``
    tokens: the split, plus rows outside it when the split has fewer than
    ``dead_min_tokens``; all of the store's when it has fewer),
    ``dense_frac`` (> 0.1), ``dense_frac_001`` (> 0.01), ``cos_sim``, ``norm_ratio`` - plus
    ``density_hist`` (counts and edges of ``log10(density + 1e-10)``) and ``density``
    (``[d_sae]`` firing frequencies, a list). With a causal LM ``backend``, also the
    :func:`spliced_ce` results on up to ``n_ce_docs`` documents of the split, tokenised as the
    dump was (same ``max_len``, BOS and special-token handling).
    """
    hook_point = (
        hook_point
        or (
            _default_hook(sae, store)
            if _default_hook(sae, store) in store.hook_point_names
            else None
        )
        or store.hook_point
    )
    mask = store.split_mask(split, test_fraction, split_seed)
    if not mask.any():
        raise ValueError(f"split={split!r}: the store has no tokens in it")
    stats = latent_stats(sae, store, mask, chunk_tokens, device, hook_point=hook_point)
    out: dict[str, Any] = stats.summary()
    # a latent is dead when it never fires on at least dead_min_tokens tokens (or all)
    fires, out["dead_tokens"] = stats.fire_count, stats.n_tokens
    extra = dead_count_rows(mask, dead_min_tokens)
    if extra is not None:
        more = latent_stats(sae, store, extra, chunk_tokens, device, hook_point=hook_point)
        fires = fires + more.fire_count
        out["dead_tokens"] = stats.n_tokens + more.n_tokens
    out["dead_frac"] = float((fires == 0).mean())
    out["mse"] = stats.sse / max(1, stats.n_tokens)
    counts, edges = stats.log10_density_hist(hist_bins)
    out["density_hist"] = {"counts": counts.tolist(), "edges": edges.tolist()}
    out["density"] = stats.density.tolist()
    out["split"] = split
    out["hook_point"] = hook_point
    if backend is not None:
        ce = store_spliced_ce(
            backend,
            {"sae": sae},
            store,
            mask,
            hook_point=hook_point,
            n_docs=n_ce_docs,
            batch_size=ce_batch_size,
        )["sae"]
        out.update(ce)
    return out


def store_spliced_ce(
    backend,
    saes: Mapping[str, Reconstruction],
    store,
    mask: np.ndarray,
    *,
    hook_point: str | None = None,
    n_docs: int = 64,
    batch_size: int = 8,
) -> dict[str, dict[str, float]]:
    """:func:`spliced_ce_many` on the first ``n_docs`` documents with a row in ``mask``
    (``bool [store rows]``), tokenised as the dump was (same ``max_len``, BOS and
    special-token handling) and spliced at the store's layer (``hook_point``: one of the
    store's hook points, default its first)."""
    if n_docs < 1:
        raise ValueError(f"n_docs={n_docs}: expected at least one document")
    held = np.unique(store.doc_ids[mask])[:n_docs]
    if held.size == 0:
        raise ValueError("mask selects no row of the store: expected at least one document")
    texts = store.docs.set_index("doc_id").loc[held, "text"].tolist()
    mcfg = store.manifest.get("config") or {}
    info = store.hook_info(hook_point or store.hook_point)
    return spliced_ce_many(
        backend,
        saes,
        info.get("module_path") if info.get("layer") is None else f"layer.{info['layer']}",
        texts,
        batch_size=batch_size,
        max_len=int(mcfg.get("max_len", 64)),
        prepend_bos=bool(mcfg.get("prepend_bos", True)),
        drop_bos=bool(mcfg.get("drop_bos", True)),
        drop_special=bool(mcfg.get("drop_special", True)),
    )
