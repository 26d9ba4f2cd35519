"""The training curve of an SAE and the rule that calls a run converged.

Training logs one curve entry every ``log_every`` steps (and at the last step): the step, the
training tokens so far, and the loss terms, FVU, L0, dead fraction, learning rate and
sparsity coefficient averaged over the steps since the previous entry. The curve is published
with the SAE as ``training_curve.parquet`` (one row per log step) and read back with
:func:`load_training_curve`.

Converged (:func:`convergence`): the smoothed training FVU and the smoothed L0 each changed
by less than ``CONVERGED_REL_TOL`` (2%, relative) over the last ``CONVERGED_WINDOW`` (20%) of
the steps at full learning rate, i.e. the stretch that ends where the LR decay starts (the
end of the run without a decay). The smoothed value at a step is the mean of the logged values
over the tenth of that stretch ending there. The decay itself is left out: annealing lowers
the loss of any run, converged or not; a flat curve at full learning rate says that more steps
would gain little. Both FVU and L0 count because a sparsity penalty trades one for the other:
FVU can stay flat while L0 is still falling. With fewer than ``CONVERGED_MIN_LOGS`` log
entries before the decay the curve is too short to judge and the run counts as not converged.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from integral_superposition import storage

CURVE_FILE = "training_curve.parquet"
CURVE_COLUMNS = (
    "step",
    "tokens",
    "loss",
    "mse",
    "fvu",
    "l0",
    "aux_loss",
    "sparsity_loss",
    "dead_frac",
    "dead_tokens",
    "tokens_per_step",
    "lr",
    "sparsity_coef",
)
"""Columns of the curve table, in order (``step`` and ``tokens`` int64, the rest float64)."""
CONVERGED_REL_TOL = 0.02
"""Largest relative change of the smoothed training FVU and L0 over the judged stretch for
which a run counts as converged."""
CONVERGED_WINDOW = 0.2
"""The judged stretch: this fraction of the steps at full learning rate, ending where the
decay starts."""
CONVERGED_MIN_LOGS = 5
"""Fewest log entries (at full learning rate) from which convergence is judged."""
CONVERGED_RULE = (
    f"the smoothed training FVU and L0 each changed by less than {CONVERGED_REL_TOL:.0%} "
    f"(relative) over the last {CONVERGED_WINDOW:.0%} of the steps before the learning-rate "
    f"decay; at least {CONVERGED_MIN_LOGS} log entries"
)


def curve_table(curve: Sequence[Mapping[str, Any]]) -> pa.Table:
    """The curve entries as a Parquet-ready table (one row per log step, ``CURVE_COLUMNS``)."""
    cols: dict[str, pa.Array] = {}
    for name in CURVE_COLUMNS:
        vals = [e.get(name) for e in curve]
        if name in ("step", "tokens"):
            cols[name] = pa.array([int(v) for v in vals], pa.int64())
        else:
            cols[name] = pa.array([np.nan if v is None else float(v) for v in vals], pa.float64())
    return pa.table(cols)


def curve_parquet(curve: Sequence[Mapping[str, Any]]) -> bytes:
    """``curve_table(curve)`` as Parquet bytes."""
    buf = io.BytesIO()
    pq.write_table(curve_table(curve), buf)
    return buf.getvalue()


def load_training_curve(
    sae_uri: str, storage_options: Mapping[str, Any] | None = None
) -> pd.DataFrame:
    """The training curve of the SAE published at ``sae_uri``: one row per log step.

    Reads ``training_curve.parquet``; an SAE saved before it existed falls back to the
    manifest's ``training_curve`` list. Raises ``FileNotFoundError`` when the SAE has neither
    (SAELens or sparsify folders, merged SAEs).
    """
    path = storage.join(str(sae_uri), CURVE_FILE)
    if storage.exists(path, storage_options):
        return pq.read_table(io.BytesIO(storage.read_bytes(path, storage_options))).to_pandas()
    from integral_superposition.sae.load import read_sae_manifest

    try:
        curve = read_sae_manifest(str(sae_uri), storage_options).get("training_curve")
    except FileNotFoundError:
        curve = None
    if not curve:
        raise FileNotFoundError(
            f"sae_uri={str(sae_uri)!r}: no training curve ({CURVE_FILE} or a manifest "
            "'training_curve'); expected an SAE trained by this library"
        )
    return curve_table(curve).to_pandas()


def _smoothed(steps: np.ndarray, fvu: np.ndarray, at: float, width: float) -> float | None:
    """Mean FVU of the log entries in ``(at - width, at]``; the last entry at or before ``at``
    when that window is empty; None when there is none."""
    upto = steps <= at
    if not upto.any():
        return None
    win = upto & (steps > at - width)
    return float(fvu[win].mean()) if win.any() else float(fvu[np.flatnonzero(upto)[-1]])


def convergence(
    curve: Sequence[Mapping[str, Any]], total_steps: int, decay_start: int | None = None
) -> dict[str, Any]:
    """``converged`` (bool) of a run of ``total_steps`` steps whose learning rate starts to decay
    at step ``decay_start`` (None: no decay), from its curve; with the relative changes it was
    judged on (``converged_fvu_change``, ``converged_l0_change``; None when the curve is too
    short to judge). See the module docstring for the rule."""
    end = float(total_steps if decay_start is None else min(decay_start, total_steps))
    width = CONVERGED_WINDOW * end
    steps = np.array([float(e["step"]) for e in curve])
    out: dict[str, Any] = {}
    for key in ("fvu", "l0"):
        vals = np.array([float(e.get(key, np.nan)) for e in curve])
        ok = np.isfinite(vals)
        s, v = steps[ok], vals[ok]
        rel = None
        if int((s <= end).sum()) >= CONVERGED_MIN_LOGS and end > 0:
            a = _smoothed(s, v, end - width, width / 2)
            b = _smoothed(s, v, end, width / 2)
            if a is not None and b is not None:
                rel = (b - a) / max(abs(a), 1e-12)
        out[f"converged_{key}_change"] = rel
    flat = all(c is not None and abs(c) < CONVERGED_REL_TOL for c in out.values())
    return {"converged": flat, **out}
