"""The end-of-training decoder refit: one closed-form ridge pass over the training tokens.

SGD leaves the decoder behind the encoder, most of all in short runs. With the encoder fixed
the best decoder is a linear least-squares problem: regress the training activations ``x``
``[n, d]`` on the final encoder's codes ``z`` ``[n, d_sae]``,

    min_{W, b}  sum_t ||x_t - z_t W - b||^2 + lam ||W - W_trained||^2,

solved once from streamed sufficient statistics (``merge.refit.RidgeStats``, the same solver
the merge step uses; ``lam = ridge_lambda * mean(diag(Z^T Z))``). The prior is the trained
decoder, so a latent that never fires keeps its direction. Which latents fire stays the same
(L0 too); ``b_enc`` absorbs the change of ``b_dec``. The refit rescales decoder rows (an L1
penalty shrinks ReLU codes, and the refit undoes the shrinkage): for ``relu``, ``jumprelu``
and ``batchtopk`` the row norms are folded into the encoder
(``SparseAutoencoder.fold_decoder_norms``), so rows stay unit-norm and a latent's value is its
length along its row; a ``topk`` SAE, whose latents compete, keeps rows of any norm.

The refit is kept only when it lowers the held-out FVU; the held-out FVU and L0 before and
after are recorded either way (``refit_*`` metrics). Training tokens are those of the run:
the train split, without the outliers training skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from integral_superposition.sae.encode import encode_chunks
from integral_superposition.sae.model import SparseAutoencoder
from integral_superposition.sae.sources import StoreSource
from integral_superposition.sae.trainee import Trainee

log = logging.getLogger(__name__)

REFIT_MAX_LATENTS = 16384
"""Widest SAE refit (its ``Z^T Z`` is ``d_sae^2`` float64: 2 GiB at this width)."""
REFIT_RIDGE_LAMBDA = 1e-4
"""Ridge strength relative to the mean diagonal of ``Z^T Z``."""
_CHUNK_TOKENS = 16384


@torch.no_grad()
def _heldout(sae: SparseAutoencoder, source: StoreSource, hook: str) -> dict[str, float]:
    from integral_superposition.sae.metrics import latent_stats

    mask = source.store.split_mask("test", source.cfg.test_fraction, 0)
    s = latent_stats(sae, source.store, mask, _CHUNK_TOKENS, hook_point=hook).summary()
    return {"fvu": float(s["fvu"]), "l0": float(s["l0"])}


def _skip(reason: str) -> dict[str, Any]:
    return {"refit_applied": False, "refit_skipped": reason}


@torch.no_grad()
def refit_decoders(
    source: Any, trainees: Sequence[Trainee], ridge_lambda: float = REFIT_RIDGE_LAMBDA
) -> list[dict[str, Any]]:
    """Refit the decoder of every trainee whose config asks for it (``refit_decoder``), in
    place, keeping it only when it lowers the held-out FVU. The trainees' SAEs take raw
    activations (after ``trainee.finish``). One read of the train split per hook point serves
    every trainee on it. Returns one metrics dict per trainee: ``refit_applied`` and, when the
    refit ran, ``refit_fvu_before``/``_after``, ``refit_l0_before``/``_after`` (held out),
    ``refit_train_fvu`` (on the fit tokens) and ``refit_tokens``; or ``refit_skipped`` (why).
    """
    from integral_superposition.merge.refit import RidgeStats, apply_refit

    out: list[dict[str, Any]] = [{} for _ in trainees]
    todo: dict[str, list[int]] = {}
    for i, t in enumerate(trainees):
        if not t.cfg.refit_decoder:
            out[i] = _skip("refit_decoder is off")
        elif not isinstance(source, StoreSource):
            out[i] = _skip("the data source has no held-out split to judge the refit on")
        elif t.sae.d_sae > REFIT_MAX_LATENTS:
            out[i] = _skip(f"d_sae={t.sae.d_sae} is above {REFIT_MAX_LATENTS} latents")
        elif t.sae.W_skip is not None or t.sae.is_merged:
            out[i] = _skip("the SAE has a skip connection or is merged")
        else:
            todo.setdefault(t.hook, []).append(i)
    for hook, idx in todo.items():
        store = source.store
        stats = {i: RidgeStats.empty(trainees[i].sae.d_sae, store.d_model) for i in idx}
        mask = store.split_mask("train", source.cfg.test_fraction, 0)
        for _rows, x_all in store.iter_chunks(_CHUNK_TOKENS, hook_point=hook, mask=mask):
            for i in idx:
                t = trainees[i]
                x = x_all.to(t.device, torch.float32)
                if t.max_norm is not None:  # the outliers training skipped
                    x = x[x.norm(dim=1) <= t.max_norm]
                # the chunk is read once for every trainee; each encodes it its own way
                for _r, xc, z, _ in encode_chunks(t.sae, [x] if x.shape[0] else []):
                    stats[i].update(z, xc)
        for i in idx:
            t, sae = trainees[i], trainees[i].sae
            if stats[i].n == 0:
                out[i] = _skip("no training token passed the outlier filter")
                continue
            before = _heldout(sae, source, hook)
            saved = {n: getattr(sae, n).detach().clone() for n in ("W_dec", "b_dec", "b_enc")}
            try:
                result = stats[i].solve(ridge_lambda, prior=sae.W_dec.detach().cpu().double())
            except ValueError as e:  # a singular system: keep the SGD decoder
                out[i] = _skip(f"the ridge system could not be solved ({e})")
                continue
            if not np.isfinite(result.W_dec).all():
                out[i] = _skip("the ridge solution is not finite")
                continue
            apply_refit(sae, result)
            if sae.architecture != "topk":
                sae.fold_decoder_norms()
            after = _heldout(sae, source, hook)
            applied = after["fvu"] < before["fvu"]
            if not applied:
                for n, v in saved.items():
                    getattr(sae, n).copy_(v)
            out[i] = {
                "refit_applied": applied,
                "refit_fvu_before": before["fvu"],
                "refit_fvu_after": after["fvu"],
                "refit_l0_before": before["l0"],
                "refit_l0_after": after["l0"],
                "refit_train_fvu": float(result.fit_fvu),
                "refit_tokens": int(result.n_tokens),
            }
            log.info(
                "decoder refit of the SAE at %s (k=%d): held-out FVU %.4f -> %.4f (%s)",
                hook,
                sae.d_sae,
                before["fvu"],
                after["fvu"],
                "kept" if applied else "discarded: no better",
            )
    return out
