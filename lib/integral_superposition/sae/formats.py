"""Reading foreign SAE formats: SAELens folders (current and legacy ``cfg.json``), sparsify
``SparseCoder`` folders and the seed's ``.pt`` state dicts, each into a ``SparseAutoencoder``.

Every reader refuses a ``cfg.json`` key, tensor or option it does not understand (the known
keys per format: ``SAELENS_*_KEYS``, ``SPARSIFY_KEYS``): a key that is not known may change
the math, and a silently ignored one gives wrong codes. ``sae.load.load_sae`` dispatches here.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import load as st_load

from integral_superposition import storage
from integral_superposition.sae.model import SparseAutoencoder


class CorruptSAEError(ValueError):
    """An SAE file that cannot be read as written: not JSON or safetensors (truncated,
    damaged), or not the bytes its manifest records."""


def read_checked(
    path: str, name: str, storage_options, manifest: Mapping[str, Any] | None = None
) -> bytes:
    """The bytes of ``path/name``, checked against the ``manifest`` entry (size and SHA-256)
    when the folder has our manifest: a file that is not the one it records (damaged,
    truncated or replaced after the save) is a :class:`CorruptSAEError` naming it."""
    uri = storage.join(path, name)
    data = storage.read_bytes(uri, storage_options)
    entry = ((manifest or {}).get("files") or {}).get(name)
    if entry:
        digest = storage.sha256_bytes(data)
        if len(data) != entry.get("size") or digest != entry.get("sha256"):
            raise CorruptSAEError(
                f"{uri!r}: {len(data)} bytes with SHA-256 {digest[:16]}, but the SAE's "
                f"manifest records {entry.get('size')} bytes with SHA-256 "
                f"{str(entry.get('sha256'))[:16]}: the file was damaged or replaced after it "
                "was saved; save or download the SAE again"
            )
    return data


def read_cfg(
    path: str,
    storage_options,
    name: str = "cfg.json",
    manifest: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON object ``path/name`` (see :func:`read_checked`); a file that is not one is
    a :class:`CorruptSAEError` naming it."""
    data = read_checked(path, name, storage_options, manifest)
    try:
        cfg = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptSAEError(
            f"{storage.join(path, name)!r}: not valid JSON ({e}; {len(data)} bytes): the file "
            "is truncated or damaged; save or download the SAE again"
        ) from None
    if not isinstance(cfg, dict):
        raise CorruptSAEError(
            f"{storage.join(path, name)!r}: expected a JSON object, got {type(cfg).__name__}"
        )
    return cfg


def read_tensors(
    path: str, name: str, storage_options, manifest: Mapping[str, Any] | None = None
) -> dict[str, torch.Tensor]:
    """The safetensors file ``path/name`` (see :func:`read_checked`); one that is truncated
    or damaged is a :class:`CorruptSAEError` naming it."""
    data = read_checked(path, name, storage_options, manifest)
    try:
        return st_load(data)
    except Exception as e:  # safetensors raises its own SafetensorError for a bad header
        raise CorruptSAEError(
            f"{storage.join(path, name)!r}: not a readable safetensors file "
            f"({type(e).__name__}: {e}; {len(data)} bytes): it is truncated or damaged; "
            "save or download the SAE again"
        ) from None


def check_finite_weights(path: str, sae: SparseAutoencoder) -> SparseAutoencoder:
    """``sae``, after checking that every floating-point weight is finite; a NaN or inf is a
    ``ValueError`` naming the tensor, how many values and the first index."""
    for name, t in sae.state_dict().items():
        if t.is_floating_point():
            bad = ~torch.isfinite(t)
            if bool(bad.any()):
                first = bad.nonzero()[0].tolist()
                raise ValueError(
                    f"path={path!r}: the SAE's weights hold NaN or inf values ({name} has "
                    f"{int(bad.sum())} of {t.numel()}, first at index {first}): a diverged "
                    "training run or a damaged file; the SAE cannot be used"
                )
    return sae


def from_tensors(
    arch: str,
    d_in: int,
    d_sae: int,
    top_k: int,
    tensors: Mapping[str, torch.Tensor],
    bandwidth: float = 0.001,
    merge_mode: str = "sum",
) -> SparseAutoencoder:
    skip = tensors.get("W_skip")
    if skip is not None and tuple(skip.shape) != (d_in, d_in):
        raise ValueError(f"W_skip has shape {tuple(skip.shape)}, expected {(d_in, d_in)}")
    sae = SparseAutoencoder(
        d_in,
        d_sae,
        architecture=arch,
        top_k=top_k,
        jumprelu_bandwidth=bandwidth,
        seed=None,
        merge_index=tensors.get("merge_index"),
        merge_mode=merge_mode,
        merge_weight=tensors.get("merge_weight"),
        skip_connection=skip is not None,
    )
    with torch.no_grad():
        if skip is not None:
            sae.W_skip.copy_(skip.float())
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            t = tensors[name]
            expected = tuple(getattr(sae, name).shape)
            if tuple(t.shape) != expected:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {expected}")
            getattr(sae, name).copy_(t.float())
        if "threshold" in tensors:
            sae.threshold.copy_(tensors["threshold"].float())
        elif "log_threshold" in tensors:
            sae.threshold.copy_(tensors["log_threshold"].float().exp())
    return sae


# cfg.json keys, per format, that load_sae understands. Every other key is refused: a key
# that is not known may change the math, and a silently ignored one gives wrong codes.
SAELENS_COMMON_KEYS = frozenset(
    {"architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input",
     "normalize_activations", "reshape_activations", "metadata"}
)  # fmt: skip
"""Keys of every SAELens (>= 6) ``cfg.json``."""
SAELENS_ARCH_KEYS: dict[str, frozenset[str]] = {
    "standard": frozenset(),
    "topk": frozenset({"k", "rescale_acts_by_decoder_norm"}),
    "jumprelu": frozenset(),
    "batchtopk": frozenset({"k", "rescale_acts_by_decoder_norm"}),
    "matryoshka_batchtopk": frozenset({"k", "rescale_acts_by_decoder_norm"}),
}
"""Extra keys per SAELens architecture that ``load_sae`` reads (``save_model`` and
``save_inference_model`` folders). Other SAELens architectures (``gated``, ``abstopk``, the
transcoders, ``temporal``, ``matching_pursuit``) compute codes ``SparseAutoencoder`` cannot
represent and are refused."""
SAELENS_TRAINING_KEYS = frozenset(
    {"decoder_init_norm", "l1_coefficient", "lp_norm", "l1_warm_up_steps",
     "use_sparse_activations", "aux_loss_coefficient", "topk_threshold_lr",
     "jumprelu_init_threshold", "jumprelu_bandwidth", "jumprelu_sparsity_loss_mode",
     "l0_coefficient", "l0_warm_up_steps", "pre_act_loss_coefficient", "jumprelu_tanh_scale",
     "jumprelu_ste_to_input", "target_l0", "matryoshka_widths", "use_matryoshka_aux_loss"}
)  # fmt: skip
"""Training-only keys a SAELens ``save_model`` (training) folder carries: losses, schedules
and initialisation, none of which changes ``encode``/``decode``."""
SAELENS_TENSORS = {
    "standard": frozenset({"W_enc", "W_dec", "b_enc", "b_dec"}),
    "topk": frozenset({"W_enc", "W_dec", "b_enc", "b_dec"}),
    "jumprelu": frozenset({"W_enc", "W_dec", "b_enc", "b_dec", "threshold", "log_threshold"}),
    "batchtopk": frozenset({"W_enc", "W_dec", "b_enc", "b_dec", "threshold", "topk_threshold"}),
}
ISUP_KEYS = frozenset(
    {"format", "d_model", "k", "architecture", "top_k", "jumprelu_bandwidth", "merge_mode",
     "d_pre", "skip_connection"}
)  # fmt: skip
"""Keys of the ``isup`` block that ``save_sae`` adds to ``cfg.json``."""
SAELENS_TO_OURS = {
    "standard": "relu",
    "topk": "topk",
    "jumprelu": "jumprelu",
    "batchtopk": "batchtopk",
    "matryoshka_batchtopk": "batchtopk",
}


def refuse_unknown(path: str, what: str, keys, known) -> None:
    unknown = sorted(set(keys) - set(known))
    if unknown:
        raise ValueError(
            f"path={path!r}: {what} has keys {unknown} that load_sae does not understand "
            f"(they may change the encoder or decoder math); known keys: {sorted(known)}"
        )


def saelens_version(cfg: Mapping[str, Any]) -> str | None:
    meta = cfg.get("metadata") or {}
    return cfg.get("sae_lens_version") or meta.get("sae_lens_version")


def legacy_saelens_config(path: str, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A pre-6.0 flat SAELens config, translated the way SAELens itself migrates it.

    The old runner wrote its whole run configuration into ``cfg.json``; only these keys
    change the codes, and each is read or refused here: ``architecture``, ``activation_fn``
    (``relu`` or ``topk`` with ``activation_fn_kwargs.k``), ``apply_b_dec_to_input``,
    ``normalize_activations``, ``finetuning_scaling_factor``, ``hook_point``/``hook_name``
    ending in ``hook_z`` (a reshape).
    """
    out: dict[str, Any] = {
        "architecture": cfg.get("architecture", "standard"),
        "d_in": cfg["d_in"],
        "d_sae": cfg["d_sae"],
        "apply_b_dec_to_input": cfg.get("apply_b_dec_to_input", True),
        "normalize_activations": cfg.get("normalize_activations", "none"),
    }
    act = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
    if act == "topk":
        out["architecture"] = "topk"
        out["k"] = (cfg.get("activation_fn_kwargs") or {}).get("k", cfg.get("k"))
    elif act not in ("relu", None):
        raise ValueError(f"path={path!r}: activation_fn={act!r}; expected 'relu' or 'topk'")
    if isinstance(out["normalize_activations"], bool) or out["normalize_activations"] is None:
        out["normalize_activations"] = (
            "expected_average_only_in" if out["normalize_activations"] else "none"
        )
    if cfg.get("finetuning_scaling_factor"):
        raise ValueError(
            f"path={path!r}: finetuning_scaling_factor=True scales the codes by a learned "
            f"factor that load_sae does not apply; expected False"
        )
    hook = str(cfg.get("hook_name") or cfg.get("hook_point") or "")
    out["reshape_activations"] = "hook_z" if "hook_z" in hook else "none"
    keep = ("model_name", "hook_name", "hook_point", "context_size", "dataset_path", "prepend_bos")
    out["metadata"] = {k: cfg[k] for k in keep if k in cfg}
    return out


def saelens_tensors(
    path: str, cfg: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
) -> tuple[str, int, dict[str, torch.Tensor]]:
    """``(our architecture, top_k, tensors in our convention)`` for a SAELens folder.

    Our encoder is ``(x - b_dec) @ W_enc + b_enc``, our decoder ``z @ W_dec + b_dec``; each
    SAELens option that differs is folded into the weights so that the codes and the
    reconstruction equal SAELens's own ``encode``/``decode``.
    """
    arch = cfg.get("architecture", "standard")
    if arch not in SAELENS_ARCH_KEYS:
        raise ValueError(
            f"path={path!r}: SAELens architecture {arch!r} is not supported (its codes cannot "
            f"be represented by SparseAutoencoder); expected one of {sorted(SAELENS_ARCH_KEYS)}"
        )
    if saelens_version(cfg) is not None:
        known = SAELENS_COMMON_KEYS | SAELENS_ARCH_KEYS[arch] | SAELENS_TRAINING_KEYS | {"isup"}
        refuse_unknown(path, "cfg.json", cfg, known)
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", None):
        raise ValueError(
            f"path={path!r}: normalize_activations={norm!r}; load_sae reads raw activations, "
            f"expected 'none' (fold the scaling into the weights first)"
        )
    reshape = cfg.get("reshape_activations", "none")
    if reshape not in ("none", None):
        raise ValueError(
            f"path={path!r}: reshape_activations={reshape!r}; expected 'none' (activations "
            f"are [n_tokens, d_in] rows)"
        )
    t = {k: v.float() for k, v in tensors.items() if k not in ("scaling_factor",)}
    if "scaling_factor" in tensors and not torch.all(tensors["scaling_factor"] == 1):
        raise ValueError(
            f"path={path!r}: a 'scaling_factor' tensor that is not all ones (a finetuning "
            f"scale load_sae does not apply)"
        )
    ours = SAELENS_TO_OURS[arch]
    table = "batchtopk" if ours == "batchtopk" else arch
    refuse_unknown(
        path, "sae_weights.safetensors", t, SAELENS_TENSORS[table] | {"merge_index", "merge_weight"}
    )
    if ours == "batchtopk":  # a training folder: the running threshold, as SAELens saves it
        if "topk_threshold" in t:
            t["threshold"] = torch.full_like(t["b_enc"], float(t.pop("topk_threshold")))
        if "threshold" not in t:
            raise ValueError(f"path={path!r}: a {arch} SAE needs a 'topk_threshold' tensor")
    if "log_threshold" in t:  # SAELens < 6 JumpReLU
        t["threshold"] = t.pop("log_threshold").exp()
    if ours == "jumprelu" and "threshold" not in t:
        raise ValueError(f"path={path!r}: a jumprelu SAE needs a 'threshold' tensor")
    if "threshold" in t:
        # SAELens's JumpReLU is relu(pre) * (pre > threshold): a negative threshold acts as 0
        t["threshold"] = t["threshold"].clamp_min(0.0)
    if ours in ("topk", "batchtopk") and cfg.get("rescale_acts_by_decoder_norm", False):
        # SAELens ranks pre * ||W_dec[i]|| and decodes (z / ||W_dec[i]||) @ W_dec: the same
        # as pre' = pre * n with W_enc' = W_enc * n, b_enc' = b_enc * n, W_dec' = W_dec / n.
        n = t["W_dec"].norm(dim=-1)
        if not bool((n > 0).all()):
            raise ValueError(
                f"path={path!r}: rescale_acts_by_decoder_norm=True with {int((n == 0).sum())} "
                f"zero decoder rows (SAELens would divide by zero)"
            )
        t["W_enc"], t["b_enc"], t["W_dec"] = t["W_enc"] * n, t["b_enc"] * n, t["W_dec"] / n[:, None]
    if not cfg.get("apply_b_dec_to_input", True):
        # SAELens encodes x @ W_enc + b_enc: shift b_enc so (x - b_dec) @ W_enc + b_enc matches
        t["b_enc"] = t["b_enc"] + t["b_dec"] @ t["W_enc"]
    top_k = int(cfg.get("k", 32)) if ours in ("topk", "batchtopk") else 32
    return ours, top_k, t


SPARSIFY_KEYS = frozenset(
    {"d_in", "activation", "expansion_factor", "num_latents", "k", "normalize_decoder",
     "multi_topk", "skip_connection", "transcode"}
)  # fmt: skip
"""sparsify ``SparseCoderConfig`` keys ``load_sae`` reads: ``activation`` (``topk`` or
``groupmax``), ``k``, ``skip_connection`` (``W_skip``) and ``transcode`` (true is refused);
``expansion_factor``/``num_latents`` are checked against the weights; ``normalize_decoder``
and ``multi_topk`` act only in training."""


def load_sparsify(path: str, storage_options) -> SparseAutoencoder:
    """A sparsify ``SparseCoder`` folder: ``(relu(x - b_dec) @ encoder.weight.T + bias)``,
    top-k (or group max), decoded by ``W_dec`` plus ``b_dec`` (and ``x @ W_skip.T``)."""
    cfg = read_cfg(path, storage_options)
    refuse_unknown(path, "cfg.json (sparsify)", cfg, SPARSIFY_KEYS)
    if cfg.get("transcode", False):
        raise ValueError(
            f"path={path!r}: transcode=True is a sparsify transcoder (it predicts a module's "
            f"output from its input, and encodes x without subtracting b_dec); load_sae loads "
            f"sparse autoencoders only, expected transcode=False"
        )
    activation = cfg.get("activation", "topk")
    if activation not in ("topk", "groupmax"):
        raise ValueError(f"path={path!r}: activation={activation!r}; expected 'topk' or 'groupmax'")
    t = read_tensors(path, "sae.safetensors", storage_options)
    known = {"encoder.weight", "encoder.bias", "W_dec", "b_dec", "W_skip"}
    refuse_unknown(path, "sae.safetensors (sparsify)", t, known)
    if "W_dec" not in t:
        raise ValueError(f"path={path!r}: sae.safetensors has no W_dec (an encoder-only save)")
    if bool(cfg.get("skip_connection", False)) != ("W_skip" in t):
        raise ValueError(
            f"path={path!r}: skip_connection={cfg.get('skip_connection', False)!r} but "
            f"W_skip is {'present' if 'W_skip' in t else 'missing'} in sae.safetensors"
        )
    w_enc = t["encoder.weight"]  # [d_sae, d_in]
    d_sae, d_in = w_enc.shape
    if int(cfg.get("d_in", d_in)) != d_in:
        raise ValueError(
            f"path={path!r}: d_in={cfg['d_in']} but encoder.weight is {tuple(w_enc.shape)}"
        )
    expected = int(cfg.get("num_latents") or 0) or d_in * int(cfg.get("expansion_factor", 32))
    if expected != d_sae:
        raise ValueError(
            f"path={path!r}: num_latents/expansion_factor give {expected} latents but "
            f"encoder.weight has {d_sae}"
        )
    tensors = {
        "W_enc": w_enc.T.contiguous(),
        "b_enc": t["encoder.bias"],
        "W_dec": t["W_dec"],
        "b_dec": t["b_dec"],
    }
    if "W_skip" in t:
        tensors["W_skip"] = t["W_skip"]  # [d_out, d_in]: x_hat += x @ W_skip.T
    k = int(cfg.get("k", 32))
    arch = "groupmax" if activation == "groupmax" else "topk"
    sae = from_tensors(arch, int(d_in), int(d_sae), k, tensors)
    return sae


def load_legacy_state_dict(path: str, device, storage_options) -> SparseAutoencoder:
    data = storage.read_bytes(path, storage_options)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"path={path!r}: not a plain tensor state dict (only weights_only loading is allowed): {e}"
        ) from e
    if "enc.weight" in state:  # the seed's nn.Linear layout: z = relu(enc(x)), x_hat = dec(z)
        enc_w, dec_w = state["enc.weight"], state["dec.weight"]  # [K, d], [d, K]
        b_dec = state.get("dec.bias", torch.zeros(dec_w.shape[0]))
        b_enc = state.get("enc.bias", torch.zeros(enc_w.shape[0]))
        tensors = {
            "W_enc": enc_w.T,
            # we encode (x - b_dec) @ W_enc + b_enc; the seed encodes x @ W_enc + b_enc
            "b_enc": b_enc + b_dec @ enc_w.T,
            "W_dec": dec_w.T,
            "b_dec": b_dec,
        }
    elif "W_enc" in state:
        tensors = state
    else:
        raise ValueError(f"path={path!r}: unknown state dict keys {sorted(state)[:6]}")
    d_in, d_sae = tensors["W_enc"].shape
    sae = from_tensors("relu", int(d_in), int(d_sae), 32, tensors)
    return sae.to(device) if device is not None else sae
