"""Pydantic configs shared by the library, the tasks and the CLI.

Every field has a one-line docstring under it; those become the JSON-schema descriptions
and the CLI help.
"""

from __future__ import annotations

import itertools
import numbers
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

StorageDtype = Literal["fp16", "bf16", "fp32"]


class _Config(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        use_attribute_docstrings=True,
        validate_assignment=True,
        allow_inf_nan=False,
    )


class DumpConfig(_Config):
    """How activations are extracted and stored."""

    layer: int = Field(13, ge=0)
    """Layer index i: the residual stream entering block i, i.e. the seed's ``hidden_states[i]``."""
    hook_points: list[str] | None = None
    """Extra or alternative hook points (``"layer.13"`` or a module path); default ``[f"layer.{layer}"]``."""
    max_len: int = Field(32, ge=1)
    """Truncate each text to this many tokens (BOS included), as the seed does."""
    batch_size: int = Field(64, ge=1)
    """Texts per forward pass."""
    dtype: StorageDtype = "bf16"
    """Storage dtype of the activation shards."""
    shard_size_mb: float = Field(128.0, gt=0)
    """Target shard size in MiB (per hook point); shards end on document boundaries."""
    drop_bos: bool = True
    """Drop the BOS token's activations (its residual norm is huge on many models)."""
    drop_special: bool = True
    """Drop every other special token (EOS, CLS, SEP, ...; UNK stands for text and is kept; pad is always dropped)."""
    sort_by_length: bool = True
    """Batch texts of similar length together to minimise padding."""
    prepend_bos: bool = True
    """Let the tokenizer add its BOS token, as the model saw in training."""

    @field_validator("hook_points")
    @classmethod
    def _non_empty_hooks(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and len(v) == 0:
            raise ValueError(
                "hook_points=[]: expected at least one hook point, or None to use `layer`"
            )
        return v

    def resolved_hook_points(self) -> list[str]:
        """The hook point names this config dumps."""
        return list(self.hook_points) if self.hook_points else [f"layer.{self.layer}"]


SAEArchitecture = Literal["relu", "topk", "batchtopk", "jumprelu"]

MAX_LATENTS = 1 << 28
"""Largest ``SAEConfig.k`` accepted: 268,435,456 latents, eight times the largest published
SAEs; whether a width fits this machine is checked against its memory when training starts."""

TOPK_FAMILY = ("topk", "batchtopk", "groupmax")
"""Architectures whose ``top_k`` is the number of active latents per token."""


def check_k(k: Any) -> int:
    """The one rule for ``k``, the number of latents (``SAEConfig.k``, the sweep's ``k``,
    ``SparseAutoencoder(d_model, k)``): an int (not a bool) with ``1 <= k <= MAX_LATENTS``.
    Returns ``k`` as an int; ``ValueError`` naming the value and the range otherwise."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= MAX_LATENTS:
        raise ValueError(
            f"k={k!r}: expected an int with 1 <= k <= {MAX_LATENTS} (the number of latents)"
        )
    return int(k)


def check_top_k(architecture: str | None, top_k: Any, k: int | None = None) -> int:
    """The one rule for ``top_k`` (``SAEConfig.top_k``, ``SparseAutoencoder(..., top_k=)``):
    an int (not a bool) ``>= 1``; for the TopK family also ``top_k <= k`` (``k``: latents
    before a merge), and for ``groupmax`` a divisor of ``k``. ``architecture``/``k`` None:
    only the value itself is checked. Returns ``top_k`` as an int; ``ValueError`` naming the
    value and what was expected otherwise."""
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1:
        raise ValueError(f"top_k={top_k!r}: expected an int >= 1 (active latents per token)")
    if k is not None and architecture in TOPK_FAMILY and top_k > k:
        raise ValueError(f"top_k={top_k!r}: expected top_k <= k (the number of latents, {k})")
    if k is not None and architecture == "groupmax" and k % top_k:
        raise ValueError(
            f"top_k={top_k!r}: a groupmax SAE splits its k={k} latents into top_k equal "
            f"groups; expected a divisor of {k}"
        )
    return int(top_k)


DEAD_WINDOW_MAX = 10_000_000
"""Largest automatic dead-latent window, in tokens."""
DEAD_WINDOW_MIN_BATCHES = 4
"""Smallest automatic dead-latent window, in batches."""
DEAD_WINDOW_FRACTION = 0.1
"""Automatic dead-latent window as a fraction of the run's training tokens."""
DEAD_WINDOW_UNKNOWN = 1_000_000
"""Automatic dead-latent window when the run's length is unknown (a one-shot iterator)."""


def dead_window(cfg: TrainSchedule, total_steps: int | None) -> int:
    """Training tokens without a firing after which a latent counts as dead.

    ``cfg.dead_tokens`` when set; else ``min(10M, max(4 * batch_size, total_tokens / 10))``
    with ``total_tokens = total_steps * batch_size``, so that AuxK engages within short runs
    too; 1M (capped likewise) when ``total_steps`` is None.
    """
    if cfg.dead_tokens is not None:
        return int(cfg.dead_tokens)
    floor = DEAD_WINDOW_MIN_BATCHES * cfg.batch_size
    if total_steps is None:
        return max(floor, DEAD_WINDOW_UNKNOWN)
    run_tokens = int(total_steps) * cfg.batch_size
    return max(1, min(DEAD_WINDOW_MAX, max(floor, int(DEAD_WINDOW_FRACTION * run_tokens))))


class SAEArchitectureConfig(_Config):
    """What an SAE is: its width, architecture and the constructor's shape parameters.

    The model (``SparseAutoencoder.from_config``) and the saved ``cfg.json`` depend on this
    part only. ``k`` is the dictionary size (number of latents), as in the seed; the number of
    active latents of the TopK family is ``top_k``. This is where ``k`` and ``top_k`` are
    checked for every config (``SAEConfig`` is one), by the same rules as the model's
    constructor (:func:`check_k`, :func:`check_top_k`).
    """

    k: int = Field(2048, json_schema_extra={"minimum": 1, "maximum": MAX_LATENTS})
    """Number of latents (dictionary size, d_sae); at most ``MAX_LATENTS`` (2**28)."""
    architecture: SAEArchitecture = "relu"
    """``relu`` (ReLU + decoder-norm-weighted L1, the seed's), ``topk``, ``batchtopk`` or ``jumprelu``."""
    top_k: int = Field(32, json_schema_extra={"minimum": 1})
    """Active latents per token for ``topk``/``batchtopk``."""
    jumprelu_bandwidth: float = Field(0.001, gt=0)
    """Straight-through bandwidth of JumpReLU's step function."""
    jumprelu_init_threshold: float = Field(0.001, gt=0)
    """Initial JumpReLU threshold."""

    @field_validator("k", mode="before")
    @classmethod
    def _check_k(cls, v: Any) -> int:
        return check_k(v)

    @field_validator("top_k", mode="before")
    @classmethod
    def _check_top_k_value(cls, v: Any) -> int:
        return check_top_k(None, v)

    @model_validator(mode="after")
    def _check_topk(self) -> SAEArchitectureConfig:
        check_top_k(self.architecture, self.top_k, self.k)
        return self

    @property
    def d_sae(self) -> int:
        """``k`` under the name SAELens and the model use."""
        return self.k


def check_grad_clip(v: Any) -> float | str:
    """``grad_clip``: ``"auto"`` or a finite number >= 0, else a ``ValueError`` naming it."""
    if v == "auto":
        return v
    if isinstance(v, bool) or not isinstance(v, numbers.Real | str):
        raise ValueError(f"grad_clip={v!r}: expected 'auto' or a number >= 0 (0 disables)")
    try:
        f = float(v)
    except ValueError:
        raise ValueError(
            f"grad_clip={v!r}: expected 'auto' or a number >= 0 (0 disables)"
        ) from None
    if not (f >= 0 and f != float("inf")):
        raise ValueError(f"grad_clip={v!r}: expected 'auto' or a finite number >= 0 (0 disables)")
    return f


def grad_clip_norm(cfg: TrainSchedule, d_in: int) -> float:
    """The gradient-norm clip a run uses on a ``d_in``-wide hook: ``1 / d_in`` for
    ``grad_clip="auto"``, else ``cfg.grad_clip`` (0: no clipping)."""
    if cfg.grad_clip == "auto":
        return 1.0 / int(d_in)
    return float(cfg.grad_clip)


class TrainSchedule(_Config):
    """How an SAE is trained: budget, optimiser schedule, losses, data stream and execution.

    None of it changes what the trained SAE is (its ``cfg.json``); inputs scaled in training
    (``normalize_activations``) are folded back, so a saved SAE always takes raw activations.
    """

    lr: float = Field(3e-4, gt=0)
    """Peak Adam learning rate."""
    l1: float = Field(1e-3, ge=0)
    """Sparsity coefficient: L1 for ``relu``, L0 (or tanh) for ``jumprelu``."""
    epochs: float = Field(2, gt=0)
    """Passes over the training tokens (ignored when ``train_tokens`` is set)."""
    batch_size: int = Field(4096, ge=1)
    """Tokens per optimiser step."""
    train_tokens: int | None = Field(None, ge=1)
    """Token budget; overrides ``epochs`` when set."""
    hook_point: str | None = None
    """Hook point to train on (default: the store's first)."""
    seed: int = 0
    """Seed for initialisation and data order."""
    lr_warmup_steps: int = Field(100, ge=0)
    """Linear LR warmup steps."""
    lr_decay_frac: float = Field(0.2, ge=0, le=1)
    """Fraction of steps at the end over which the LR decays linearly to zero."""
    l1_warmup_frac: float = Field(0.05, ge=0, le=1)
    """Fraction of steps over which the sparsity coefficient ramps from 0."""
    grad_clip: Annotated[float, Field(ge=0)] | Literal["auto"] = "auto"
    """Gradient-norm clip: ``auto`` clips at ``1 / d_in`` (the loss is divided by ``d_in``, so
    this is SAELens's clip at 1 on its undivided loss), resolved by the trainer from the hook's
    width (:func:`grad_clip_norm`); a number clips at that norm; 0 disables."""

    @field_validator("grad_clip", mode="before")
    @classmethod
    def _check_grad_clip(cls, v: Any) -> float | str:
        return check_grad_clip(v)

    auxk_coef: float = Field(1 / 32, ge=0)
    """AuxK loss coefficient for dead latents (TopK family)."""
    aux_k: int = Field(512, ge=1)
    """Dead latents used by AuxK per token."""
    decoder_norm: Literal["unit", "free"] = "unit"
    """Decoder rows in training (``topk``): ``unit`` keeps them unit-norm (the gradient's
    component along each row removed before each step, rows renormalised after); ``free`` is
    SAELens's TopK parametrisation: rows of any norm, latents ranked by pre-activation times
    row norm. The norms are folded into the encoder when training ends (the saved SAE has unit
    rows and the same outputs)."""
    decoder_init_norm: float = Field(1.0, gt=0)
    """Initial norm of the decoder rows and encoder columns with ``decoder_norm: free``
    (SAELens: 0.1); 1 with ``unit``."""
    dead_tokens: int | None = Field(None, ge=1)
    """A latent is dead in training when it has not fired for this many tokens. None (auto):
    a tenth of the run's training tokens, at least 4 batches and at most 10,000,000
    (``dead_window``)."""
    jumprelu_sparsity: Literal["step", "tanh"] = "step"
    """JumpReLU penalty: ``step`` (L0 through the threshold's straight-through estimator,
    DeepMind's) or ``tanh`` (``sum tanh(jumprelu_tanh_scale * z * ||W_dec||)``, Anthropic's)."""
    jumprelu_tanh_scale: float = Field(4.0, gt=0)
    """Scale inside the ``tanh`` penalty."""
    jumprelu_ste_to_input: bool = False
    """Let the jump's straight-through gradient reach the encoder too (Anthropic's variant)."""
    jumprelu_pre_act_coef: float = Field(0.0, ge=0)
    """Coefficient of Anthropic's pre-activation loss ``sum_i relu(threshold_i - pre_i) *
    ||W_dec[i]||`` (0: off); it keeps JumpReLU latents from dying."""
    normalize_activations: bool = True
    """Scale inputs to mean norm sqrt(d) in training; folded back into the weights when saved."""
    max_norm_factor: float | None = Field(10.0, gt=0)
    """Skip tokens whose norm exceeds this multiple of the median norm (None keeps all)."""
    autocast_bf16: bool | None = None
    """bf16 autocast over fp32 master weights; None (auto): on for a CUDA device with bf16, off elsewhere."""
    sparse_decode: bool | None = None
    """Decode and back-propagate only the active latents (relu/topk/batchtopk); None: automatic."""
    device: str = "auto"
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    checkpoint_every: int = Field(500, ge=1)
    """Optimiser steps between checkpoints."""
    log_every: int = Field(50, ge=1)
    """Optimiser steps between metric logs."""
    test_fraction: float = Field(0.05, gt=0, lt=1)
    """Fraction of documents held out for evaluation."""
    shuffle_buffer_tokens: int = Field(65536, ge=1)
    """Rows shuffled together when streaming from a store (bounds the reader's memory)."""
    refit_decoder: bool = True
    """After training, refit the decoder in closed form (ridge) on the final encoder's codes of
    the training tokens, kept only when it lowers the held-out FVU (docs/sae.md); False keeps
    the pure SGD result."""


class SAEConfig(TrainSchedule, SAEArchitectureConfig):
    """Sparse autoencoder hyperparameters and training schedule, as one flat config.

    The fields are those of :class:`SAEArchitectureConfig` (what the SAE is) and
    :class:`TrainSchedule` (how it is trained), in that order; ``architecture_config()`` and
    ``schedule()`` give the two parts and ``SAEConfig.from_parts(arch, schedule)`` joins
    them. ``SAEConfig(k=..., lr=..., l1=..., epochs=...)`` is the seed's call.
    """

    @model_validator(mode="after")
    def _check_decoder_norm(self) -> SAEConfig:
        if self.decoder_norm == "free" and self.architecture != "topk":
            raise ValueError(
                f"decoder_norm='free' with architecture={self.architecture!r}: the free-norm "
                "decoder is implemented for topk only; expected decoder_norm='unit'"
            )
        if self.decoder_norm == "unit" and self.decoder_init_norm != 1.0:
            raise ValueError(
                f"decoder_init_norm={self.decoder_init_norm!r} with decoder_norm='unit': unit "
                "decoder rows start at norm 1; expected decoder_init_norm=1 or decoder_norm='free'"
            )
        return self

    def architecture_config(self) -> SAEArchitectureConfig:
        """The architecture part (what the model and its ``cfg.json`` depend on)."""
        return SAEArchitectureConfig.model_construct(
            **{f: getattr(self, f) for f in SAEArchitectureConfig.model_fields}
        )

    def schedule(self) -> TrainSchedule:
        """The training part: budget, optimiser schedule, losses, data stream, execution."""
        return TrainSchedule.model_construct(
            **{f: getattr(self, f) for f in TrainSchedule.model_fields}
        )

    @classmethod
    def from_parts(
        cls, architecture: SAEArchitectureConfig, schedule: TrainSchedule | None = None
    ) -> SAEConfig:
        """Join an architecture and a schedule (default: the default schedule)."""
        if not isinstance(architecture, SAEArchitectureConfig):
            raise TypeError(
                f"architecture: expected an SAEArchitectureConfig, got {type(architecture).__name__}"
            )
        if schedule is not None and not isinstance(schedule, TrainSchedule):
            raise TypeError(f"schedule: expected a TrainSchedule, got {type(schedule).__name__}")
        parts = [(SAEArchitectureConfig, architecture)]
        if schedule is not None:
            parts.append((TrainSchedule, schedule))
        return cls(**{f: getattr(obj, f) for part, obj in parts for f in part.model_fields})


RUN_ROOT_RESERVED = frozenset(
    {
        "config.yaml",
        "run.json",
        ".lease.json",
        ".prefect-results",
        "checkpoints",
        "analysis",
        "merge",
        "steering",
        "report",
    }
)
"""Names under a run root that the pipeline itself uses; a ``Paths`` field may not take them."""


def check_run_path(value: Any, field: str) -> str:
    """A path under a run root: relative, ``/``-separated, no ``..``, no URI, no reserved name.

    Output paths always resolve inside the run root, so a step can never write to (or
    replace) a folder outside it.
    """
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{field}={value!r}: expected a relative path under the run root")
    text = value.strip()
    why = None
    if "://" in text or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", text):
        why = "a URI"
    elif text.startswith(("/", "\\", "~")) or re.match(r"^[A-Za-z]:[\\/]", text):
        why = "an absolute path"
    elif "\\" in text:
        why = "a path with backslashes"
    else:
        parts = text.rstrip("/").split("/")
        if any(p in ("", ".", "..") for p in parts):
            why = "a path with empty, '.' or '..' components"
        elif parts[0] in RUN_ROOT_RESERVED:
            why = f"a path under {parts[0]!r}, which the run itself uses"
    if why:
        raise ValueError(
            f"{field}={value!r}: is {why}; expected a relative path inside the run root "
            "such as 'acts' or 'outputs/acts' (outputs never leave {storage}/{name}/{run})"
        )
    return text.rstrip("/")


def cache_root() -> Path:
    """The local cache of converted and generated models: ``$ISUP_CACHE``, by default
    ``~/.cache/integral_superposition``."""
    return Path(os.environ.get("ISUP_CACHE", Path.home() / ".cache" / "integral_superposition"))


class Paths(_Config):
    """Where a run's outputs go: relative paths under the run root ``{storage}/{name}/{run}``
    (no absolute paths, URIs or ``..``: outputs never leave the run root)."""

    shards_dir: str = "acts"
    """Activation store directory."""
    sae_path: str = "sae"
    """SAE directory (SAELens format)."""
    summary_csv: str = "results.csv"
    """Enrichment summary table (also written as Parquet next to it)."""

    @field_validator("shards_dir", "sae_path", "summary_csv")
    @classmethod
    def _inside_run_root(cls, v: Any, info) -> str:
        return check_run_path(v, f"paths.{info.field_name}")

    @model_validator(mode="after")
    def _distinct(self) -> Paths:
        items = {
            "shards_dir": self.shards_dir,
            "sae_path": self.sae_path,
            "summary_csv": self.summary_csv,
        }
        for a, b in itertools.combinations(items, 2):
            pa, pb = items[a] + "/", items[b] + "/"
            if pa.startswith(pb) or pb.startswith(pa):
                raise ValueError(
                    f"paths.{a}={items[a]!r} and paths.{b}={items[b]!r}: expected separate "
                    "locations (neither inside the other), so one step never mixes with another"
                )
        return self
