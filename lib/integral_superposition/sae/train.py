"""Training sparse autoencoders from stored activations.

:func:`train_saes` trains several SAEs (widths, ``top_k``, coefficients, architectures or
hook points) on one stream of batches, read once, and publishes each with
:func:`~integral_superposition.sae.save_sae`. :func:`train_sae` is the seed's call: it trains
one given model in place.

The recipe (docs/sae.md): inputs scaled to mean norm ``sqrt(d)`` and extreme-norm tokens
dropped; ``b_dec`` at the geometric median of a sample, ``W_enc = W_dec^T``; unit-norm decoder
rows (the gradient's parallel component removed before each step, rows renormalised after);
Adam with linear LR warmup and a linear decay to zero over the last ``lr_decay_frac`` of the
steps; the sparsity coefficient warmed up; gradient-norm clipping; AuxK for dead latents of
the TopK family; the scale folded back into the weights when saved.

The loss is ``(mse + auxk_coef * aux) / d_in + coef * sparsity`` where ``mse`` is the squared
error summed over ``d_in`` and averaged over tokens (of the scaled inputs).

Checkpoints (``checkpoint_uri``) are written atomically every ``checkpoint_every`` steps:
``step-NNNNNNNNN/`` holds one safetensors file per SAE (weights, Adam moments, dead-latent
counters) plus ``state.json`` (step, schedule, scales, training curve, config fingerprint),
and ``latest.json`` is replaced last. A run resumes from ``latest.json`` and, on CPU with the
same seed, ends with the same weights as an uninterrupted run.

The pieces: ``sources`` (where batches come from), ``trainee`` (one SAE's optimiser step,
initialisation and log), ``schedule`` (LR and sparsity coefficient), ``checkpoint``
(resumable state), ``parallel`` (how several processes share a run), ``publish``
(evaluation and saving); this module holds the loop over them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from integral_superposition import distributed
from integral_superposition.config import SAEConfig, dead_window
from integral_superposition.dump.store import NonFiniteActivationsError, first_non_finite
from integral_superposition.progress import ProgressFn, Reporter, report_phase
from integral_superposition.sae.checkpoint import Checkpoints, first_difference, run_fingerprint
from integral_superposition.sae.curve import CURVE_FILE
from integral_superposition.sae.load import check_sae_folder
from integral_superposition.sae.model import SparseAutoencoder, sae_parameter_count
from integral_superposition.sae.online import OnlineActivations, OnlineSource
from integral_superposition.sae.parallel import (
    Layout,
    join_processes,
    process_layout,
    sync_from_main,
    write_checkpoint,
)
from integral_superposition.sae.publish import (
    TrainResult,
    convergence_metrics,
    publish_trainee,
    store_metadata,
)
from integral_superposition.sae.refit import refit_decoders
from integral_superposition.sae.sources import (
    RankSlice,
    StoreSource,
    TrainingSource,
    open_source,
)
from integral_superposition.sae.trainee import (
    Trainee,
    calibrate_threshold,
    finish,
    init_trainee,
)

__all__ = ["LogFn", "NonFiniteActivationsError", "TrainResult", "train_sae", "train_saes"]

log = logging.getLogger(__name__)

LogFn = Callable[[int, dict[str, float]], None]

_STREAM_FIELDS = ("batch_size", "seed", "epochs", "train_tokens", "test_fraction")
_STREAM_FIELDS_STORE = (*_STREAM_FIELDS, "shuffle_buffer_tokens")
_INIT_TOKENS = 16384


# -- checks ------------------------------------------------------------------------------------
def _check_cfgs(cfgs: Any, store_like: bool) -> list[SAEConfig]:
    if isinstance(cfgs, SAEConfig):
        cfgs = [cfgs]
    if not isinstance(cfgs, Sequence) or not cfgs:
        raise ValueError(f"cfgs={cfgs!r}: expected a non-empty list of SAEConfig")
    out = []
    for i, c in enumerate(cfgs):
        if not isinstance(c, SAEConfig):
            raise TypeError(f"cfgs[{i}]: expected an SAEConfig, got {type(c).__name__}")
        # re-validate: model_construct or assignment tricks must not bypass the checks
        out.append(SAEConfig.model_validate(c.model_dump()))
    fields = _STREAM_FIELDS_STORE if store_like else _STREAM_FIELDS
    for f in fields:
        vals = {getattr(c, f) for c in out}
        if len(vals) > 1:
            raise ValueError(
                f"cfgs: {f} differs between configs ({sorted(map(str, vals))}); SAEs trained in one "
                f"pass share one stream of batches, so {', '.join(fields)} must be equal"
            )
    return out


# -- the training loop -------------------------------------------------------------------------
@torch.enable_grad()  # training works even when the caller sits inside no_grad/inference code
def _run(
    source: TrainingSource,
    trainees: list[Trainee],
    cfgs: list[SAEConfig],
    *,
    ckpt: Checkpoints | None,
    fingerprint: dict[str, Any],
    resume: bool,
    init_b_dec: bool,
    on_progress: ProgressFn | None,
    on_log: LogFn | None,
    progress: bool,
    layout: Layout | None = None,
) -> tuple[int, int]:
    """Train every trainee on one pass of ``source``; returns ``(steps, resumed_from)``."""
    layout = layout or Layout("single", tuple(range(len(trainees))), len(trainees), True)
    total = source.total
    for t in trainees:
        t.dead_tokens = dead_window(t.cfg, total)
        log.info(
            "dead-latent window: %d tokens (%s)",
            t.dead_tokens,
            "set by dead_tokens"
            if t.cfg.dead_tokens is not None
            else "automatic: scaled to the run",
        )
        log.info(
            "gradient-norm clip: %g (%s)",
            t.grad_clip,
            f"grad_clip='auto': 1/d_in, d_in={t.sae.d_in}"
            if t.cfg.grad_clip == "auto"
            else "set by grad_clip",
        )
    start = 0
    wrote_ckpt = False
    indices = list(layout.indices) if layout.mode == "modules" else None
    state = ckpt.read(indices) if (ckpt is not None and resume) else None
    if state is not None:
        js, tensors, rng = state
        diff = first_difference(js["fingerprint"], fingerprint)
        if diff:
            raise ValueError(
                f"checkpoint_uri={ckpt.uri!r} holds a checkpoint of a different run ({diff}); "
                "use another checkpoint_uri or resume=False to start over"
            )
        jsons = [js["trainees"][i] for i in indices] if indices is not None else js["trainees"]
        for t, tt, tj in zip(trainees, tensors, jsons, strict=True):
            t.load_state(tt, tj)
        torch.set_rng_state(rng["torch_cpu"])
        start = int(js["step"])
        log.info("resuming training from checkpoint step %d (%s)", start, ckpt.uri)
    else:
        sample = source.sample(_INIT_TOKENS)
        for t in trainees:
            init_trainee(t, sample[t.hook], init_b_dec)
            if layout.mode == "data":
                sync_from_main(t)
        del sample  # not held while training: memory stays one buffer
    for t in trainees:
        t.start(total, start)
    every_ckpt = min(c.checkpoint_every for c in cfgs)
    every_log = min(c.log_every for c in cfgs)
    bar = Reporter(
        f"train {len(trainees)} SAE{'s' if len(trainees) > 1 else ''}",
        on_progress if layout.is_main else None,
        unit="steps",
        total=total or 0,
        initial=start,
        show=progress and layout.is_main,
    ).__enter__()  # left in the finally below
    step = start
    try:
        for sae_t in trainees:
            sae_t.sae.train()
        for acts, index in source.batches(start):
            for h, x in acts.items():
                bad = first_non_finite(x)  # one aminmax per batch
                if bad is not None:
                    r = bad[0]
                    row = int(index[r]) if index is not None else r
                    raise NonFiniteActivationsError(
                        f"activations at hook point {h!r} contain NaN or inf values: {source.locate(row)}"
                    )
            for t in trainees:
                t.step(acts[t.hook], step, total)
            step += 1
            if step % every_log == 0 or step == total:
                entries = [t.flush_log(step, total) for t in trainees]
                bar.postfix(
                    loss=f"{entries[0]['loss']:.4g}",
                    l0=f"{entries[0]['l0']:.1f}",
                    fvu=f"{entries[0]['fvu']:.3f}",
                    dead=f"{entries[0]['dead_frac']:.3f}",
                )
                # data-parallel ranks hold the same (summed) log: rank 0 reports it
                if layout.mode != "data" or layout.is_main:
                    for i, e in zip(layout.indices, entries, strict=True):
                        log.info("step %d sae %d: %s", step, i, e)
                        if on_log is not None:
                            on_log(step, e if layout.n_saes == 1 else {**e, "sae": i})
            if ckpt is not None and (step % every_ckpt == 0 or step == total):
                write_checkpoint(ckpt, layout, step, fingerprint, trainees, {"total": total})
                wrote_ckpt = True
            # after the checkpoint: a reported step is durable
            bar.update(step, total if total is not None else step)
    except NonFiniteActivationsError:
        # bad data found mid-run: a fresh run leaves no checkpoint behind
        if ckpt is not None and wrote_ckpt and start == 0 and layout.is_main:
            ckpt.remove()
        raise
    finally:
        bar.__exit__(*sys.exc_info())
    if step == start and start == 0:
        raise ValueError("the data source yielded no batch: nothing to train on")
    if trainees[0].acc_steps:
        for t in trainees:
            t.flush_log(step, total)
    if any(t.sae.architecture == "batchtopk" for t in trainees):
        sample = source.sample(_INIT_TOKENS)
        for t in trainees:
            if t.sae.architecture == "batchtopk":
                calibrate_threshold(t, sample[t.hook])
    return step, start


def _check_training_memory(
    cfgs: Sequence[SAEConfig], d_model: int, dev: torch.device, allocated: int = 0
) -> None:
    """``MemoryError`` before training SAEs that cannot fit on ``dev``: float32 weights,
    gradients and two Adam moments per SAE, plus a batch of dense latents and their gradient
    (``allocated``: bytes of weights already on ``dev``)."""
    from integral_superposition.compute import check_memory

    need = -allocated
    for c in cfgs:
        need += 4 * 4 * sae_parameter_count(d_model, c.k) + 2 * 4 * c.batch_size * c.k
    widths = ", ".join(f"k={c.k}" for c in cfgs)
    check_memory(
        need,
        dev,
        f"training {len(cfgs)} SAE(s) ({widths}, d_model={d_model}, "
        f"batch_size={cfgs[0].batch_size}: weights, gradients, Adam moments and a batch of latents)",
    )


def train_saes(
    stores: Any,
    cfgs: Sequence[SAEConfig],
    out_uris: Sequence[str],
    *,
    checkpoint_uri: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    on_progress: ProgressFn | None = None,
    on_log: LogFn | None = None,
    resume: bool = True,
    device: str | torch.device | None = None,
    progress: bool = True,
    metadata: Mapping[str, Any] | None = None,
    evaluate: bool = True,
    distribute_modules: bool = False,
) -> list[TrainResult]:
    """Train one SAE per config on one pass over ``stores`` and publish each to ``out_uris``.

    ``stores``: an ``ActivationStore``, a dump URI or a list of them (concatenated), or tensors.
    The configs may differ in width, architecture, ``top_k``, coefficients and hook point, but
    share the stream: ``batch_size``, ``seed``, the budget and ``test_fraction``.
    ``checkpoint_uri``: directory for atomic checkpoints (resumed when ``resume``; removed after
    the SAEs are published). ``on_progress(step, total)`` after each step and
    ``on_log(step, metrics)`` every ``log_every`` steps. Returns one :class:`TrainResult` each.

    Under torchrun (``torchrun --nproc_per_node N``) the same call trains on N processes:
    data-parallel by default (every rank steps on its part of each batch, the result equals a
    single process's), or each rank trains its own SAEs with ``distribute_modules``. Rank 0
    writes checkpoints and outputs (with ``distribute_modules``, each SAE's rank publishes
    it); every rank returns the same results. See docs/sae.md, "Several processes".
    """
    from integral_superposition.dump.store import ActivationStore

    store_like = isinstance(stores, ActivationStore | str | OnlineActivations) or (
        isinstance(stores, Sequence)
        and bool(stores)
        and all(isinstance(s, ActivationStore | str) for s in stores)
    )
    cfg_list = _check_cfgs(cfgs, store_like)
    if isinstance(out_uris, str):
        out_uris = [out_uris]
    out_uris = [str(u) for u in out_uris]
    if len(out_uris) != len(cfg_list):
        raise ValueError(
            f"out_uris has {len(out_uris)} entries for {len(cfg_list)} configs: expected one URI per config"
        )
    if len(set(out_uris)) != len(out_uris):
        raise ValueError(f"out_uris={out_uris!r}: every SAE needs its own output URI")
    for uri in out_uris:  # a folder the save would refuse is refused before training
        check_sae_folder(uri, storage_options, extra=[CURVE_FILE])
    if checkpoint_uri is not None:
        Checkpoints(checkpoint_uri, storage_options).check()
    info = join_processes(device, cfg_list[0])
    dev = info.device
    leaves_store = isinstance(stores, OnlineActivations) and stores.store_uri is not None
    writes_store = isinstance(stores, OnlineActivations) and stores.write_store
    if leaves_store and info.enabled and not info.is_main:
        # rank 0 alone writes the store (or the sample) an online run leaves behind
        stores = dataclasses.replace(stores, write_store=False, store_uri=None)
    source = open_source(stores, cfg_list, storage_options)
    # the run's identity does not depend on the layout: any world size resumes a checkpoint
    fingerprint = run_fingerprint(cfg_list, source.describe(), {"total": source.total})
    costs = [float(sae_parameter_count(source.d_model, c.k)) for c in cfg_list]
    layout = process_layout(info, len(cfg_list), costs, distribute_modules)
    mine = [cfg_list[i] for i in layout.indices]
    if layout.mode == "modules" and isinstance(source, StoreSource):
        source = open_source(source.store, mine, storage_options)  # only this rank's hook points
    elif layout.mode == "modules" and isinstance(source, OnlineSource):
        # the forward passes stop after this rank's last hook point (or capture every hook
        # point on rank 0 when it writes the store)
        source = open_source(stores, mine, storage_options)
    elif layout.mode == "data":
        source = RankSlice(source, info.rank, info.world_size)
    _check_training_memory(mine, source.d_model, dev)
    source.check_finite()
    if checkpoint_uri is not None and not source.resumable:
        raise ValueError(
            "checkpoint_uri: a one-shot iterator cannot be resumed; pass an ActivationStore, "
            "a dump URI or a re-iterable of tensors"
        )
    trainees = []
    for c in mine:
        hook = c.hook_point if c.hook_point and c.hook_point != "input" else source.hooks[0]
        sae = SparseAutoencoder.from_config(
            source.d_model, c.architecture_config(), seed=c.seed
        ).to(dev)
        trainees.append(Trainee(c, sae, hook, dev, data_parallel=layout.mode == "data"))
    ckpt = Checkpoints(checkpoint_uri, storage_options) if checkpoint_uri else None
    t0 = time.perf_counter()
    steps, resumed = _run(
        source,
        trainees,
        mine,
        ckpt=ckpt,
        fingerprint=fingerprint,
        resume=resume,
        init_b_dec=True,
        on_progress=on_progress,
        on_log=on_log,
        progress=progress,
        layout=layout,
    )
    for t in trainees:
        finish(t)
    elapsed = time.perf_counter() - t0
    base = source.source if isinstance(source, RankSlice) else source
    if leaves_store and info.enabled:
        spec = stores if info.is_main else None
        if info.is_main:
            base.evaluation_store()  # completed and published once, by rank 0
        distributed.barrier()
        uri = distributed.broadcast_object(os.fspath(spec.store_uri) if spec else None)
        if not info.is_main:
            base.use_store(ActivationStore(uri, stores.storage_options))
    own: dict[int, TrainResult] = {}
    if layout.mode != "data" or layout.is_main:
        refit_from = base
        if isinstance(base, OnlineSource) and writes_store:
            # the store written while training holds the train split the refit reads
            refit_from = StoreSource(base.evaluation_store(), base.hooks, base.cfg)
        report_phase(on_progress if layout.is_main else None, steps, steps, "refit decoder")
        refits = refit_decoders(refit_from, trainees)  # data-parallel: the main rank's replica
        phase = "evaluate and publish" if evaluate else "publish"
        report_phase(on_progress if layout.is_main else None, steps, steps, phase)
        for i, t, refit in zip(layout.indices, trainees, refits, strict=True):
            own[i] = publish_trainee(
                t,
                out_uris[i],
                base,
                steps,
                resumed,
                elapsed,
                storage_options,
                metadata,
                evaluate,
                {**refit, **convergence_metrics(t, base, steps)},
            )
    published: dict[int, TrainResult] = {}
    for part in distributed.gather_objects(own):  # also waits until every SAE is published
        published.update(part)
    if ckpt is not None and layout.is_main:
        ckpt.remove()
    distributed.barrier()  # nobody returns while rank 0 still removes the checkpoint
    return [published[i] for i in range(len(cfg_list))]


def train_sae(
    model: SparseAutoencoder,
    shard_iterator: Any,
    cfg: SAEConfig | None = None,
    device: str | torch.device | None = None,
    *,
    checkpoint_uri: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    on_progress: ProgressFn | None = None,
    on_log: LogFn | None = None,
    resume: bool = True,
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` in place on ``shard_iterator`` (the seed's call); returns a summary.

    ``shard_iterator``: an ``ActivationStore``, a dump URI or list of URIs, a ``[N, d]`` tensor,
    or an iterable of ``[n, d]`` tensors. The model fixes the architecture and widths; ``cfg``
    gives the schedule (``cfg.k``/``cfg.architecture`` must agree with the model). A model whose
    ``b_dec`` is all zeros (freshly built) gets the data-dependent initialisation. The trained
    model takes raw activations (the training scale is folded into its weights). Under
    torchrun it trains data-parallel and every rank ends with the same weights.
    """
    if not isinstance(model, SparseAutoencoder):
        raise TypeError(f"model: expected a SparseAutoencoder, got {type(model).__name__}")
    if model.is_merged:
        raise ValueError("model: a merged SAE cannot be trained (its latents are fixed aggregates)")
    if cfg is None:
        cfg = SAEConfig.from_parts(model.architecture_config())
    if cfg.k != model.d_sae:
        raise ValueError(f"cfg.k={cfg.k} but the model has k={model.d_sae} latents")
    if cfg.architecture != model.architecture:
        raise ValueError(
            f"cfg.architecture={cfg.architecture!r} but the model is {model.architecture!r}"
        )
    if model.architecture in ("topk", "batchtopk") and cfg.top_k != model.top_k:
        cfg = cfg.model_copy(update={"top_k": model.top_k})
    from integral_superposition.dump.store import ActivationStore

    store_like = isinstance(shard_iterator, ActivationStore | str) or (
        isinstance(shard_iterator, Sequence)
        and bool(shard_iterator)
        and all(isinstance(s, ActivationStore | str) for s in shard_iterator)
    )
    (cfg,) = _check_cfgs([cfg], store_like)
    source = open_source(shard_iterator, [cfg], storage_options)
    if source.d_model != model.d_in:
        raise ValueError(
            f"model.d_model={model.d_in} does not match the activations' d_model={source.d_model}"
        )
    info = join_processes(device, cfg)
    dev = info.device
    on_dev = model.W_enc.device == dev
    _check_training_memory(
        [cfg], model.d_in, dev, sum(p.numel() * 4 for p in model.parameters()) if on_dev else 0
    )
    source.check_finite()
    if checkpoint_uri is not None and not source.resumable:
        raise ValueError("checkpoint_uri: a one-shot iterator cannot be resumed")
    model.to(dev)
    hook = cfg.hook_point if cfg.hook_point and cfg.hook_point != "input" else source.hooks[0]
    fingerprint = run_fingerprint(
        [cfg], source.describe(), {"total": source.total, "d_model": model.d_in}
    )
    layout = process_layout(info, 1, [1.0], modules=False)
    if layout.mode == "data":
        source = RankSlice(source, info.rank, info.world_size)
    t = Trainee(cfg, model, hook, dev, data_parallel=layout.mode == "data")
    ckpt = Checkpoints(checkpoint_uri, storage_options) if checkpoint_uri else None
    init_b_dec = bool((model.b_dec == 0).all())
    t0 = time.perf_counter()
    steps, resumed = _run(
        source,
        [t],
        [cfg],
        ckpt=ckpt,
        fingerprint=fingerprint,
        resume=resume,
        init_b_dec=init_b_dec,
        on_progress=on_progress,
        on_log=on_log,
        progress=progress,
        layout=layout,
    )
    finish(t)
    base = source.source if isinstance(source, RankSlice) else source
    report_phase(on_progress if layout.is_main else None, steps, steps, "refit decoder")
    (refit,) = refit_decoders(base, [t])  # every replica alike: the same data, the same solve
    if isinstance(base, StoreSource):
        model.metadata.update(store_metadata(base.store, hook))
    distributed.barrier()
    if ckpt is not None and layout.is_main:
        ckpt.remove()
    metrics = {k: v for k, v in (t.curve[-1] if t.curve else {}).items()}
    metrics.update(refit)
    metrics.update(convergence_metrics(t, base, steps))
    metrics["train_seconds"] = time.perf_counter() - t0
    return TrainResult(None, None, metrics, steps, t.tokens_seen, resumed, cfg)
