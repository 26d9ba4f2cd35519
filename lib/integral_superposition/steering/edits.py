"""Latent edits: what a steering hook does to the SAE code of a token.

An :class:`Edit` names one latent and one operation:

===============  ==========================================  =================================
op               effect on the code ``z [N, d_sae]``          constructor
===============  ==========================================  =================================
``set``          ``z[:, j] = value``                          :func:`clamp`, ``set_or_scale_latent(j, set_to=v)``
``set_max``      ``z[:, j] = value * max_act[j]``              :func:`clamp_to_max`
``scale``        ``z[:, j] *= value``                         :func:`scale`, ``set_or_scale_latent(j, scale=s)``
``add``          ``z[:, j] += value`` (adds ``value * W_dec[j]``)  :func:`add`
``ablate``       ``z[:, j] = 0``                              :func:`ablate`
===============  ==========================================  =================================

Several edits are applied in order. :class:`RowEdits` gives different rows of one batch
different edits (or none), so that one generation call carries several steered sets.
``set_max`` needs the largest activation each latent
reached in the data: an array ``[d_sae]``, an analysis latents table (``latent, max_act``), a
published analysis (:func:`max_activations` reads any of them).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

__all__ = [
    "OPS",
    "Edit",
    "RowEdits",
    "ablate",
    "add",
    "as_edits",
    "clamp",
    "clamp_to_max",
    "max_activations",
    "parse_edit",
    "resolve_edits",
    "scale",
    "set_or_scale_latent",
]

EditOp = Literal["set", "set_max", "scale", "add", "ablate"]
OPS: tuple[str, ...] = ("set", "set_max", "scale", "add", "ablate")


@dataclass(frozen=True)
class Edit:
    """One operation on latent ``latent`` of the SAE code (see the module table).

    Calling an edit on a code ``z [..., d_sae]`` returns the edited copy, so an edit is also
    the seed's ``latent_map``. ``set_max`` must be resolved to ``set`` first
    (:func:`resolve_edits`), because it needs the latent's maximum activation.
    """

    latent: int
    op: EditOp
    value: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.latent, bool) or not isinstance(self.latent, int | np.integer):
            raise TypeError(
                f"latent={self.latent!r}: expected an int latent index, got {type(self.latent).__name__}"
            )
        if self.latent < 0:
            raise ValueError(f"latent={self.latent}: expected a non-negative latent index")
        if self.op not in OPS:
            raise ValueError(f"op={self.op!r}: expected one of {OPS}")
        if not isinstance(self.value, int | float | np.number) or not math.isfinite(self.value):
            raise ValueError(
                f"value={self.value!r} for latent {self.latent}: expected a finite number"
            )
        object.__setattr__(self, "latent", int(self.latent))
        object.__setattr__(self, "value", float(self.value))

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """The edited copy of ``z [..., d_sae]``."""
        if self.op == "set_max":
            raise ValueError(
                f"{self}: clamp_to_max needs the latent's max activation; resolve it with "
                "resolve_edits(edits, d_sae, max_acts=...) or pass max_acts= to steer()"
            )
        if not 0 <= self.latent < z.shape[-1]:
            raise ValueError(
                f"latent={self.latent} out of range: the code has {z.shape[-1]} latents (0..{z.shape[-1] - 1})"
            )
        z = z.clone()
        col = z[..., self.latent]
        if self.op == "set":
            col.fill_(self.value)
        elif self.op == "scale":
            col.mul_(self.value)
        elif self.op == "add":
            col.add_(self.value)
        else:  # ablate
            col.zero_()
        return z

    def __str__(self) -> str:
        return {
            "set": f"{self.latent}={self.value:g}",
            "set_max": f"{self.latent}={self.value:g}xmax",
            "scale": f"{self.latent}*{self.value:g}",
            "add": f"{self.latent}+{self.value:g}",
            "ablate": f"{self.latent}=ablate",
        }[self.op]

    def to_dict(self) -> dict[str, Any]:
        return {"latent": self.latent, "op": self.op, "value": self.value}


def clamp(latent: int, value: float) -> Edit:
    """Clamp latent ``latent`` to ``value`` at the steered positions."""
    return Edit(latent, "set", value)


def clamp_to_max(latent: int, c: float) -> Edit:
    """Clamp latent ``latent`` to ``c`` times the largest activation it reached in the data."""
    return Edit(latent, "set_max", c)


def scale(latent: int, factor: float) -> Edit:
    """Multiply latent ``latent`` by ``factor``."""
    return Edit(latent, "scale", factor)


def add(latent: int, alpha: float) -> Edit:
    """Add ``alpha`` times the latent's decoder row to the activation."""
    return Edit(latent, "add", alpha)


def ablate(latent: int) -> Edit:
    """Set latent ``latent`` to zero (removes its decoder contribution)."""
    return Edit(latent, "ablate", 0.0)


def set_or_scale_latent(
    latent_j: int, set_to: float | None = None, scale: float | None = None
) -> Edit:
    """The seed's modifier: clamp latent ``latent_j`` to ``set_to``, or multiply it by ``scale``.

    Exactly one of ``set_to`` and ``scale`` must be given.
    """
    if (set_to is None) == (scale is None):
        given = "both" if set_to is not None else "neither"
        raise ValueError(
            f"set_to={set_to!r}, scale={scale!r}: expected exactly one of set_to and scale, got {given}"
        )
    return Edit(latent_j, "set", set_to) if set_to is not None else Edit(latent_j, "scale", scale)


_EDIT_RE = re.compile(
    r"^\s*(?P<j>\d+)\s*(?:"
    r"(?P<set>=)\s*(?P<setv>[-+]?[\d.eE+-]+)\s*(?P<max>x\s*max)?"
    r"|(?P<scale>\*)\s*(?P<scalev>[-+]?[\d.eE+-]+)"
    r"|(?P<add>\+)\s*(?P<addv>[-+]?[\d.eE+-]+)"
    r"|\s*[:=]\s*(?P<ablate>ablate|0)"
    r")\s*$"
)


def parse_edit(text: str) -> Edit:
    """Parse a compact edit: ``42=100`` (clamp), ``42=3xmax`` (clamp to 3 x max activation),
    ``42*0.5`` (scale), ``42+8`` / ``42+-8`` (add 8 / -8 decoder rows), ``42:ablate`` (ablate)."""
    m = _EDIT_RE.match(str(text))
    if m is None:
        raise ValueError(
            f"edit={text!r}: expected LATENT=VALUE, LATENT=CxMAX, LATENT*FACTOR, LATENT+ALPHA "
            "or LATENT:ablate (e.g. '42=100', '42=3xmax', '42*0.5', '42+8', '42:ablate')"
        )
    j = int(m["j"])
    try:
        if m["ablate"]:
            return ablate(j)
        if m["set"]:
            v = float(m["setv"])
            return clamp_to_max(j, v) if m["max"] else clamp(j, v)
        if m["scale"]:
            return scale(j, float(m["scalev"]))
        return add(j, float(m["addv"]))
    except ValueError as e:
        raise ValueError(f"edit={text!r}: {e}") from None


def as_edits(edits: Any) -> list[Edit]:
    """Normalise ``edits`` (an :class:`Edit`, a string, or a sequence of them) to a list."""
    if isinstance(edits, Edit):
        return [edits]
    if isinstance(edits, str):
        return [parse_edit(edits)]
    if isinstance(edits, Sequence):
        out = []
        for e in edits:
            if isinstance(e, Edit):
                out.append(e)
            elif isinstance(e, str):
                out.append(parse_edit(e))
            else:
                raise TypeError(
                    f"edits: expected Edit objects or edit strings, got {type(e).__name__} ({e!r})"
                )
        return out
    raise TypeError(
        f"edits={edits!r}: expected an Edit, an edit string, a sequence of them, or a callable "
        "mapping codes [N, d_sae] to edited codes"
    )


class RowEdits:
    """Edits per row of a batch: ``groups[g] = (rows, edits)`` applies ``edits`` to exactly
    the rows ``rows`` (indices into the ``n_rows`` rows of a call, e.g. of one
    ``generate_continuations`` call); a row in no group is not edited.

    ``group_of``: ``int64 [n_rows]``, the group of each row (-1: none). A row may be in at most
    one group (put several edits in one group); a group's edits are any form
    :func:`as_edits` takes.
    """

    def __init__(self, n_rows: int, groups: Sequence[tuple[Sequence[int], Any]]):
        if isinstance(n_rows, bool) or not isinstance(n_rows, int | np.integer) or n_rows < 1:
            raise ValueError(
                f"n_rows={n_rows!r}: expected the number of rows of the call (an int >= 1)"
            )
        self.n_rows = int(n_rows)
        self.edits: list[list[Edit]] = []
        self.group_of = np.full(self.n_rows, -1, dtype=np.int64)
        for g, item in enumerate(groups):
            if not (isinstance(item, Sequence) and len(item) == 2):
                raise TypeError(f"groups[{g}]={item!r}: expected a (rows, edits) pair")
            rows, edits = item
            idx = np.asarray(rows)
            if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
                raise TypeError(f"groups[{g}] rows={rows!r}: expected a list of row indices")
            idx = idx.astype(np.int64)
            bad = idx[(idx < 0) | (idx >= self.n_rows)]
            if bad.size:
                raise ValueError(
                    f"groups[{g}] rows: row {int(bad[0])} out of range for n_rows={self.n_rows} "
                    f"(0..{self.n_rows - 1})"
                )
            uniq, counts = np.unique(idx, return_counts=True)
            if (counts > 1).any():
                raise ValueError(
                    f"groups[{g}] rows: row {int(uniq[counts > 1][0])} is listed twice: "
                    "expected distinct row indices"
                )
            taken = idx[self.group_of[idx] >= 0]
            if taken.size:
                row = int(taken[0])
                raise ValueError(
                    f"groups[{g}] rows: row {row} is already in groups[{self.group_of[row]}]: "
                    "expected each row in at most one group (put several edits in one group)"
                )
            try:
                self.edits.append(as_edits(edits))
            except (TypeError, ValueError) as e:
                raise type(e)(f"groups[{g}]: {e}") from None
            self.group_of[idx] = g

    def __len__(self) -> int:
        return len(self.edits)

    def to_dict(self) -> list[dict[str, Any]]:
        """The groups as JSON-able dicts: ``rows`` (count) and ``edits``."""
        return [
            {"rows": int((self.group_of == g).sum()), "edits": [e.to_dict() for e in es]}
            for g, es in enumerate(self.edits)
        ]


def max_activations(source: Any, d_sae: int | None = None, storage_options=None) -> np.ndarray:
    """The largest activation of every latent in the data, ``float64 [d_sae]``.

    ``source``: an array or tensor ``[d_sae]``; a DataFrame with ``latent`` and ``max_act``
    columns (the analysis latents table); an object with a ``latents`` table (a loaded
    analysis); a :class:`~integral_superposition.analysis.scan.LatentScan`; or the URI of a
    published analysis.
    """
    if isinstance(source, str):
        from integral_superposition.analysis import load_analysis

        source = load_analysis(source, storage_options)
    if hasattr(source, "act_max") and hasattr(source, "top"):  # a LatentScan
        arr = np.asarray(source.act_max, dtype=np.float64)
    elif hasattr(source, "latents") and isinstance(getattr(source, "latents", None), pd.DataFrame):
        return max_activations(source.latents, d_sae)
    elif isinstance(source, pd.DataFrame):
        if "max_act" not in source.columns:
            raise ValueError(
                f"max_acts: the table has columns {list(source.columns)}; expected 'max_act' (and 'latent')"
            )
        if "latent" in source.columns:
            lat = source["latent"].to_numpy(dtype=np.int64)
            n = int(lat.max()) + 1 if lat.size else 0
            arr = np.full(max(n, d_sae or 0), np.nan)
            arr[lat] = source["max_act"].to_numpy(dtype=np.float64)
        else:
            arr = source["max_act"].to_numpy(dtype=np.float64)
    elif isinstance(source, torch.Tensor | np.ndarray | Sequence):
        arr = np.asarray(
            source.detach().cpu().numpy() if isinstance(source, torch.Tensor) else source,
            dtype=np.float64,
        )
    else:
        raise TypeError(
            f"max_acts={type(source).__name__}: expected an array [d_sae], a latents table with "
            "'max_act', a loaded analysis, a LatentScan or an analysis URI"
        )
    if arr.ndim != 1:
        raise ValueError(f"max_acts has shape {arr.shape}: expected one value per latent")
    if d_sae is not None and arr.shape[0] != d_sae:
        raise ValueError(
            f"max_acts has {arr.shape[0]} values, but the SAE has d_sae={d_sae}: it was computed for another SAE"
        )
    return arr


def resolve_edits(
    edits: Sequence[Edit], d_sae: int, max_acts: Any = None, storage_options=None
) -> list[Edit]:
    """Check every latent index against ``d_sae`` and turn ``set_max`` into ``set``."""
    edits = list(edits)
    for e in edits:
        if not 0 <= e.latent < d_sae:
            raise ValueError(
                f"latent={e.latent} (edit {e}) out of range: the SAE has d_sae={d_sae} latents (0..{d_sae - 1})"
            )
    if not any(e.op == "set_max" for e in edits):
        return edits
    if max_acts is None:
        bad = next(e for e in edits if e.op == "set_max")
        raise ValueError(
            f"edit {bad} clamps to a multiple of the latent's max activation: pass max_acts= "
            "(an array [d_sae], the analysis latents table, or an analysis URI)"
        )
    mx = max_activations(max_acts, d_sae, storage_options)
    out = []
    for e in edits:
        if e.op == "set_max":
            m = mx[e.latent]
            if not np.isfinite(m) or m <= 0:
                raise ValueError(
                    f"edit {e}: latent {e.latent} has max activation {m} in the data (dead or "
                    "unknown): clamp it to an absolute value instead"
                )
            e = Edit(e.latent, "set", e.value * float(m))
        out.append(e)
    return out


def edits_summary(edits: Sequence[Edit] | Mapping[str, Any] | Any) -> list[dict[str, Any]] | str:
    """JSON-able description of edits (for manifests); a callable is described by its name."""
    if isinstance(edits, RowEdits):
        return edits.to_dict()
    if callable(edits) and not isinstance(edits, Edit):
        return getattr(edits, "__qualname__", type(edits).__name__)
    return [e.to_dict() for e in as_edits(edits)]
