"""Steering hooks: edit SAE latents inside a model while it runs or generates.

``with steer(backend, sae, "layer.9", [clamp(42, 30.0)], positions="all"):`` registers two
hooks and removes both on exit, also after an exception:

- a forward pre-hook on the whole model that classifies the columns of every forward as
  *prompt* or *generated* (below);
- an edit hook at the SAE's hook point (``backend.edit``'s mechanism) that replaces the
  activation ``x`` of the selected tokens by ``x + dec(z') - dec(z)`` (the SAE error term is
  kept), or by ``dec(z')`` with ``keep_error=False``; ``z = sae.encode(x)`` and ``z'`` is
  ``z`` after the edits.

Hook points
-----------
``"layer.i"`` (or ``i``, or SAELens's ``blocks.i.hook_resid_pre``) is the residual stream
entering block ``i`` = HuggingFace's ``hidden_states[i]`` - the tensor a dump at
``DumpConfig(layer=i)`` stores, so an SAE trained on that dump is applied to exactly the
activations it was trained on. ``blocks.i.hook_resid_post`` is mapped to ``layer.{i+1}``.
With ``hook_point=None`` the SAE's own metadata (``hook_name``) is used.

Which tokens are edited (``positions``) is decided in
:mod:`~integral_superposition.steering.positions`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from integral_superposition.backends.base_model import HookPoint, register_edit_hook
from integral_superposition.sae.model import SparseAutoencoder
from integral_superposition.steering.edits import (
    Edit,
    RowEdits,
    as_edits,
    edits_summary,
    resolve_edits,
    set_or_scale_latent,
)
from integral_superposition.steering.positions import (
    PositionTracker,
    parse_positions,
    special_token_ids,
)

log = logging.getLogger(__name__)

__all__ = [
    "LatentEditor",
    "SteeringHandle",
    "register_prehook_last_row",
    "register_steering",
    "resolve_sae_hook_point",
    "set_or_scale_latent",
    "steer",
]

LatentMap = Edit | Sequence[Edit | str] | str | RowEdits | Callable[[torch.Tensor], torch.Tensor]


# -- the latent editor -----------------------------------------------------------------------
class LatentEditor:
    """Applies latent edits to activation rows: ``x [N, d_in] -> x' [N, d_in]`` (same dtype).

    ``edits``: :class:`Edit` objects (or edit strings), or a callable ``z [N, d_sae] ->
    z' [N, d_sae]``. With ``keep_error`` (default) ``x' = x + dec(z') - dec(z)``, computed as
    ``x + (z'_S - z_S) @ W_dec[S]`` over the edited latents ``S`` only; the code ``z_S`` is
    computed for those latents alone when the architecture is elementwise (ReLU, JumpReLU,
    BatchTopK at inference). Pure ``add`` edits need no encoding. ``keep_error=False``
    returns ``dec(z')``.

    ``edits`` may be :class:`~integral_superposition.steering.edits.RowEdits`: each group's
    edits apply to its rows only, and the call takes ``rows [N]``, the group of each row of
    ``x`` (-1: not edited); a row of no group is returned as it came in.
    """

    def __init__(
        self,
        sae: SparseAutoencoder,
        edits: LatentMap,
        *,
        keep_error: bool = True,
        max_acts: Any = None,
        device: torch.device | str | None = None,
        storage_options=None,
    ):
        if not isinstance(sae, SparseAutoencoder):
            raise TypeError(
                f"sae: expected a SparseAutoencoder (sae.load_sae reads ours and SAELens folders), got {type(sae).__name__}"
            )
        device = torch.device(device) if device is not None else sae.W_dec.device
        if sae.W_dec.device != device:
            sae = copy.deepcopy(sae).to(device)  # never move the caller's SAE
        self.sae = sae.eval()
        self.keep_error = bool(keep_error)
        self.fn: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.edits: list[Edit] = []
        self.row_edits: RowEdits | None = None
        self.parts: list[LatentEditor] = []  # per-row edits: one editor per group
        if isinstance(edits, RowEdits):
            self.row_edits = edits
            kw = dict(keep_error=keep_error, max_acts=max_acts, storage_options=storage_options)
            self.parts = [LatentEditor(sae, es, device=device, **kw) for es in edits.edits]
        elif callable(edits) and not isinstance(edits, Edit):
            self.fn = edits
        else:
            self.edits = resolve_edits(as_edits(edits), sae.d_sae, max_acts, storage_options)
        self._compile()

    def _compile(self) -> None:
        sae = self.sae
        with torch.no_grad():
            W_dec = sae.W_dec.detach().float()
            latents = sorted({e.latent for e in self.edits})
            self.latents = latents
            col = {j: i for i, j in enumerate(latents)}
            # Groups of same-op edits with distinct columns, applied in the order given.
            self.groups: list[tuple[str, torch.Tensor, torch.Tensor]] = []
            cur_op, cur_cols, cur_vals = None, [], []
            for e in self.edits:
                c = col[e.latent]
                if e.op != cur_op or c in cur_cols:
                    if cur_op is not None:
                        self.groups.append(self._group(cur_op, cur_cols, cur_vals))
                    cur_op, cur_cols, cur_vals = e.op, [], []
                cur_cols.append(c)
                cur_vals.append(e.value)
            if cur_op is not None:
                self.groups.append(self._group(cur_op, cur_cols, cur_vals))
            idx = torch.tensor(latents, dtype=torch.long, device=W_dec.device)
            self.W_dec_S = W_dec[idx]  # [S, d]
            self.pure_add = (
                self.fn is None and self.keep_error and all(e.op == "add" for e in self.edits)
            )
            if self.pure_add and latents:
                alpha = torch.zeros(len(latents), device=W_dec.device)
                for _op, c, v in self.groups:
                    alpha.index_add_(0, c, v)
                self.constant_delta = alpha @ self.W_dec_S  # [d]
            else:
                self.constant_delta = None
            self.elementwise = not sae.is_merged and sae.architecture in (
                "relu",
                "jumprelu",
                "batchtopk",
            )
            if self.elementwise and latents:
                self.W_enc_S = sae.W_enc.detach().float()[:, idx]
                self.b_enc_S = sae.b_enc.detach().float()[idx]
                self.thr_S = sae.threshold.detach().float()[idx]
                self.b_dec = sae.b_dec.detach().float()

    def _group(self, op: str, cols: list[int], vals: list[float]):
        dev = self.sae.W_dec.device
        return (
            op,
            torch.tensor(cols, dtype=torch.long, device=dev),
            torch.tensor(vals, dtype=torch.float32, device=dev),
        )

    @property
    def is_identity(self) -> bool:
        """True when the edits cannot change any code (no edits, ``scale 1``, ``add 0``)."""
        if self.fn is not None or not self.keep_error:
            return False
        if self.row_edits is not None:
            return all(part.is_identity for part in self.parts)
        return all(
            (e.op == "scale" and e.value == 1.0) or (e.op == "add" and e.value == 0.0)
            for e in self.edits
        )

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Codes of the edited latents ``[N, S]`` for float32 rows ``x [N, d_in]``."""
        if self.elementwise:
            pre = (x - self.b_dec) @ self.W_enc_S + self.b_enc_S
            if self.sae.architecture == "relu":
                return torch.relu(pre)
            return pre * (pre > self.thr_S)
        idx = torch.tensor(self.latents, dtype=torch.long, device=x.device)
        return self.sae.encode(x)[:, idx]

    def _apply_groups(self, z: torch.Tensor) -> torch.Tensor:
        for op, cols, vals in self.groups:
            if op == "set":
                z[:, cols] = vals
            elif op == "scale":
                z[:, cols] = z[:, cols] * vals
            elif op == "add":
                z[:, cols] = z[:, cols] + vals
            else:  # ablate
                z[:, cols] = 0.0
        return z

    def __call__(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``x [N, d_in]`` -> ``x' [N, d_in]``; ``rows [N]`` (int, per-row edits only): the
        edit group of each row, -1 for none."""
        if x.shape[-1] != self.sae.d_in:
            raise ValueError(
                f"the hooked activation has dimension {x.shape[-1]}, but the SAE has d_in={self.sae.d_in}: "
                "it was trained on another layer or model"
            )
        if self.row_edits is not None:
            return self._per_row(x, rows)
        if rows is not None:
            raise ValueError(
                "rows= is for per-row edits (RowEdits); these edits apply to every row"
            )
        xf = x.float()
        if self.fn is not None:
            z = self.sae.encode(xf)
            z2 = self.fn(z.clone())
            if not isinstance(z2, torch.Tensor) or z2.shape != z.shape:
                raise ValueError(
                    f"latent_map returned {type(z2).__name__}{tuple(getattr(z2, 'shape', ()))}: "
                    f"expected a tensor of shape {tuple(z.shape)} (the edited code)"
                )
            new = (
                xf + (z2 - z) @ self.sae.W_dec.float()
                if self.keep_error
                else self.sae.decode(z2, xf)
            )
            return new.to(x.dtype)
        if not self.keep_error:
            z = self.sae.encode(xf)
            if self.latents:
                idx = torch.tensor(self.latents, dtype=torch.long, device=x.device)
                z[:, idx] = self._apply_groups(z[:, idx].clone())
            return self.sae.decode(z, xf).to(x.dtype)
        if not self.latents:
            return x
        if self.constant_delta is not None:
            return x + self.constant_delta.to(x.dtype)
        z = self.codes(xf)
        delta = (self._apply_groups(z.clone()) - z) @ self.W_dec_S
        return (xf + delta).to(x.dtype)

    def _per_row(self, x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        if rows is None or rows.shape != x.shape[:1]:
            got = "none" if rows is None else f"shape {tuple(rows.shape)}"
            raise ValueError(
                f"per-row edits: rows= must give the group of each of the {x.shape[0]} rows "
                f"of x, got {got}"
            )
        out = x
        for g, part in enumerate(self.parts):
            idx = (rows == g).nonzero().flatten()
            if idx.numel():
                if out is x:
                    out = x.clone()  # the rows of no group stay the very input
                out[idx] = part(x[idx])
        return out


# -- the handle and the context manager -------------------------------------------------------
class SteeringHandle:
    """Hooks registered by :func:`register_steering`; ``remove()`` unregisters both (idempotent).

    Also a context manager. ``edited_tokens`` counts the tokens edited so far, split into
    ``prompt`` and ``generated``.

    With per-row edits (:class:`~integral_superposition.steering.edits.RowEdits` for
    ``n_rows`` rows) a forward must have all ``n_rows`` rows, or the rows last named by
    :meth:`select_rows`: a call that runs its rows in batches names each batch first
    (``generate_continuations(..., on_batch=handle.select_rows)``).
    """

    def __init__(
        self,
        backend,
        hook_point: HookPoint,
        editor: LatentEditor,
        tracker: PositionTracker,
        positions: Any,
    ):
        self.backend = backend
        self.hook_point = hook_point
        self.editor = editor
        self.positions = positions
        self._tracker = tracker
        self._handles: list[Any] = []
        # Counts stay on the model's device: no host sync per forward.
        self._prompt: torch.Tensor | int = 0
        self._generated: torch.Tensor | int = 0
        self._rows: np.ndarray | None = None  # per-row edits: the call's rows of the forwards
        self._row_groups: torch.Tensor | None = None  # [B] their groups, on the model's device

    def select_rows(self, rows: Sequence[int] | range | None, n_rows: int | None = None) -> None:
        """The rows (indices into the per-row edits' ``n_rows``) that the next forwards carry,
        in order; ``None``: all of them. ``n_rows``: the rows of the whole call, checked
        against the edits'. Without per-row edits this does nothing."""
        re = self.editor.row_edits
        if re is None:
            return
        if n_rows is not None and n_rows != re.n_rows:
            raise ValueError(
                f"per-row edits for n_rows={re.n_rows}, but the call has {n_rows} rows: "
                "expected one per row"
            )
        if rows is None:
            self._rows, self._row_groups = None, None
            return
        idx = np.asarray(list(rows) if isinstance(rows, range) else rows)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise TypeError(f"rows={rows!r}: expected a list of row indices")
        bad = idx[(idx < 0) | (idx >= re.n_rows)]
        if bad.size:
            raise ValueError(
                f"rows: row {int(bad[0])} out of range for per-row edits of n_rows={re.n_rows} "
                f"(0..{re.n_rows - 1})"
            )
        self._rows = idx.astype(np.int64)
        self._row_groups = None

    def _groups_of_forward(self, B: int, device: torch.device) -> torch.Tensor:
        """``[B]`` the edit group of each row of the current forward (per-row edits)."""
        re = self.editor.row_edits
        n = re.n_rows if self._rows is None else len(self._rows)
        if n != B:
            raise ValueError(
                f"steering with per-row edits: the forward has {B} rows but "
                + (
                    f"the edits are for n_rows={re.n_rows}"
                    if self._rows is None
                    else f"select_rows named {n}"
                )
                + ": a call that runs its rows in batches names each one with "
                "handle.select_rows (generate_continuations(..., on_batch=handle.select_rows))"
            )
        g = self._row_groups
        if g is None or g.device != device:
            groups = re.group_of if self._rows is None else re.group_of[self._rows]
            self._row_groups = g = torch.as_tensor(groups, device=device)
        return g

    def _edit(self, x: torch.Tensor) -> torch.Tensor | None:
        step = self._tracker.step
        if step is None:
            raise RuntimeError(
                "the steering hook fired without the model-level hook: call the model itself "
                "(backend.model / backend.generate), not one of its submodules"
            )
        if step.select is None:
            return None
        if x.dim() != 3 or x.shape[0] != step.B or x.shape[1] != step.T:
            raise RuntimeError(
                f"steering at {self.hook_point.name}: activation of shape {tuple(x.shape)} does not "
                f"match the forward's tokens [{step.B}, {step.T}]"
            )
        flat = x.reshape(-1, x.shape[-1])
        if self.editor.row_edits is None:
            new = self.editor(flat)
            sel = step.select.reshape(-1, 1)
            self._prompt = self._prompt + step.n_prompt
            self._generated = self._generated + step.n_generated
            return torch.where(sel, new, flat).reshape(x.shape)
        groups = self._groups_of_forward(step.B, x.device)  # [B]
        sel = step.select & (groups >= 0)[:, None]  # [B, T]
        rows = torch.where(sel, groups[:, None], -1).reshape(-1)  # only the selected tokens
        n_prompt = sel[:, : step.n_prompt_cols].sum()
        self._prompt = self._prompt + n_prompt
        self._generated = self._generated + (sel.sum() - n_prompt)
        return self.editor(flat, rows).reshape(x.shape)

    @property
    def edited_tokens(self) -> dict[str, int]:
        return {"prompt": int(self._prompt), "generated": int(self._generated)}

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def describe(self) -> dict[str, Any]:
        pos = self.positions
        return {
            "hook_point": self.hook_point.name,
            "edits": edits_summary(self.editor.fn or self.editor.row_edits or self.editor.edits),
            "positions": pos
            if isinstance(pos, str)
            else ("mask" if isinstance(pos, torch.Tensor | np.ndarray) else list(pos)),
            "keep_error": self.editor.keep_error,
        }

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> SteeringHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


_RESID_POST = re.compile(r"^blocks\.(\d+)\.hook_resid_post$")


def resolve_sae_hook_point(
    backend, sae: SparseAutoencoder, hook_point: Any = None, arg: str = "hook_point"
) -> HookPoint:
    """The hook point to steer: ``hook_point`` when given, else the SAE's metadata ``hook_name``.

    Checks that the SAE's ``d_in`` matches the hooked activation (for layer hook points) and
    warns when the SAE's metadata names a different hook point.
    """
    recorded = (getattr(sae, "metadata", None) or {}).get("hook_name")
    recorded_hp = None
    if recorded:
        m = _RESID_POST.match(str(recorded))
        name = recorded
        if m:  # the output of block i is the input of block i + 1
            i = int(m.group(1))
            name = f"layer.{i + 1}" if i + 1 < backend.n_layers else f"{backend.blocks_path}.{i}"
        try:
            recorded_hp = backend.hook_point(name)
        except ValueError:
            recorded_hp = None
    if hook_point is None:
        if recorded_hp is None:
            raise ValueError(
                f"{arg}=None: the SAE does not record a hook point this model has "
                f"(metadata hook_name={recorded!r}); pass {arg}, e.g. 'layer.9'"
            )
        hp = recorded_hp
    elif isinstance(hook_point, HookPoint):
        hp = hook_point
    else:
        try:
            hp = backend.hook_point(hook_point)
        except ValueError as e:
            raise ValueError(f"{arg}={hook_point!r}: {e}") from None
    if hp.layer is not None and int(backend.d_model) != sae.d_in:
        raise ValueError(
            f"sae.d_in={sae.d_in} does not match the hooked layer: {hp.name} of {backend.model_id} "
            f"has d_model={backend.d_model}"
        )
    if recorded_hp is not None and recorded_hp.name != hp.name:
        msg = (
            f"steering at {hp.name}, but the SAE was trained on {recorded!r} ({recorded_hp.name}): "
            "its latents mean something else here"
        )
        warnings.warn(msg, UserWarning, stacklevel=3)
        log.warning(msg)
    return hp


def register_steering(
    backend,
    sae: SparseAutoencoder,
    hook_point: Any = None,
    edits: LatentMap = (),
    positions: Any = "all",
    *,
    max_acts: Any = None,
    keep_error: bool = True,
    include_special: bool = False,
    storage_options=None,
) -> SteeringHandle:
    """Register the steering hooks and return their :class:`SteeringHandle` (call ``remove()``).

    Prefer the :func:`steer` context manager. Every argument is checked before any hook is
    registered. See the module docstring for ``hook_point``, ``positions`` and the edits.
    """
    hp = resolve_sae_hook_point(backend, sae, hook_point)
    sets, mask = parse_positions(positions)
    editor = LatentEditor(
        sae, edits, keep_error=keep_error, max_acts=max_acts, device=backend.device,
        storage_options=storage_options,
    )  # fmt: skip
    special = None if include_special else special_token_ids(getattr(backend, "tokenizer", None))
    tracker = PositionTracker(sets, mask, special)
    handle = SteeringHandle(backend, hp, editor, tracker, positions)
    try:
        handle._handles.append(backend.model.register_forward_pre_hook(tracker, with_kwargs=True))
        handle._handles.append(register_edit_hook(hp, handle._edit))
    except BaseException:
        handle.remove()
        raise
    return handle


@contextlib.contextmanager
def steer(
    backend,
    sae: SparseAutoencoder,
    hook_point: Any = None,
    edits: LatentMap = (),
    positions: Any = "all",
    *,
    max_acts: Any = None,
    keep_error: bool = True,
    include_special: bool = False,
    storage_options=None,
) -> Iterator[SteeringHandle]:
    """Within the block, every forward and ``generate`` of ``backend`` runs with ``edits``
    applied to ``sae``'s latents at ``hook_point`` on ``positions``; the hooks are removed on
    exit, also after an exception.

    ``edits``: an :class:`Edit` (``clamp``, ``clamp_to_max``, ``scale``, ``add``, ``ablate``),
    an edit string (``"42=30"``), a list of them, a callable ``z -> z'`` on codes
    ``[N, d_sae]``, or :class:`~integral_superposition.steering.edits.RowEdits` (different
    edits on different rows; see :meth:`SteeringHandle.select_rows`). ``max_acts`` supplies the max activations for ``clamp_to_max``.
    ``keep_error=False`` replaces the activation by the SAE reconstruction.
    """
    handle = register_steering(
        backend, sae, hook_point, edits, positions, max_acts=max_acts, keep_error=keep_error,
        include_special=include_special, storage_options=storage_options,
    )  # fmt: skip
    try:
        yield handle
    finally:
        handle.remove()


def register_prehook_last_row(
    backend,
    layer_idx: int | str,
    sae: SparseAutoencoder,
    latent_map: LatentMap,
    *,
    positions: Any = "last_prompt",
    keep_error: bool = True,
    max_acts: Any = None,
) -> SteeringHandle:
    """The seed's hook: steer the last real prompt token of each row at layer ``layer_idx``
    (the input of block ``layer_idx``). Returns a handle; call ``handle.remove()``.

    ``latent_map``: e.g. ``set_or_scale_latent(latent_j=42, set_to=100.0)``, a list of edits or
    a callable on codes. ``positions`` widens the steered tokens (e.g. ``"all"``).
    """
    if isinstance(layer_idx, bool) or not isinstance(layer_idx, int | str | np.integer):
        raise TypeError(f"layer_idx={layer_idx!r}: expected a layer index (int)")
    try:
        hp = backend.hook_point(layer_idx if isinstance(layer_idx, str) else int(layer_idx))
    except ValueError as e:
        raise ValueError(f"layer_idx={layer_idx!r}: {e}") from None
    return register_steering(
        backend, sae, hp, latent_map, positions, keep_error=keep_error, max_acts=max_acts
    )
