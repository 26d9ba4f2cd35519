"""The plain training launcher: ``python -m integral_superposition.sae.launch``.

One process, or N under torchrun (data-parallel by default, ``--distribute-modules`` for
module-parallel)::

    python -m integral_superposition.sae.launch --store ./acts --out ./sae --config sae.yaml
    torchrun --nproc_per_node 4 -m integral_superposition.sae.launch \\
        --store s3://b/acts --out s3://b/sae --config sae.yaml --checkpoint s3://b/ckpt/run1

``--config`` is a YAML file holding one of:

- the fields of one :class:`~integral_superposition.config.SAEConfig` (``k``, ``architecture``,
  ...): the SAE is published at ``--out``;
- ``saes: {name: {SAEConfig fields}, ...}``: several SAEs trained on one pass, published at
  ``--out/<name>`` (or at an entry's own ``out: URI``);
- an experiment config (with an ``sae`` section and optional ``sweep``): its SAEs, named as
  the ``isup train`` step names them, at ``--out/<name>``.

Storage options (credentials) come from the environment variable ``ISUP_STORAGE_OPTIONS``
(a JSON object), never from the command line. Rank 0 writes ``--results`` (JSON: one entry
per SAE with its URI, content hash, metrics and steps). :func:`launch_train_saes` starts N
processes of this module through torchrun from Python and returns the results.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import yaml
from pydantic import ValidationError

from integral_superposition import distributed, storage
from integral_superposition.config import SAEConfig

__all__ = ["STORAGE_OPTIONS_ENV", "launch_train_saes", "main", "read_sae_configs"]

log = logging.getLogger(__name__)

STORAGE_OPTIONS_ENV = "ISUP_STORAGE_OPTIONS"
"""Environment variable holding the storage options (JSON object) of a launched training."""


def read_sae_configs(
    path: str, storage_options: Mapping[str, Any] | None = None
) -> dict[str, tuple[SAEConfig, str | None]]:
    """``{name: (SAEConfig, own output URI or None)}`` from a YAML file (one SAEConfig,
    ``saes:`` or an experiment config; see the module docstring). A single SAEConfig gets the
    name ``""`` (published at ``--out`` itself)."""
    try:
        text = storage.read_bytes(path, storage_options).decode("utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"config={path!r}: no such file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"config={path!r}: not valid YAML ({e})") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(
            f"config={path!r}: expected a mapping (SAEConfig fields, 'saes:' or an experiment "
            f"config), got {type(data).__name__}"
        )
    if "sae" in data or "preset" in data:
        from integral_superposition.experiment import load_config

        return {j.name: (j.cfg, None) for j in load_config(path).sae_jobs()}
    if "saes" in data:
        saes = data["saes"]
        if not isinstance(saes, dict) or not saes:
            raise ValueError(f"config={path!r}: 'saes' must map SAE names to SAEConfig fields")
        items = list(saes.items())
    else:
        items = [("", data)]
    out: dict[str, tuple[SAEConfig, str | None]] = {}
    for name, fields in items:
        if name and (not isinstance(name, str) or "/" in name or name.startswith(".")):
            raise ValueError(f"config={path!r}: SAE name {name!r} is not a folder name")
        fields = dict(fields or {})
        uri = fields.pop("out", None) if name else None
        try:
            out[name] = (SAEConfig.model_validate(fields), None if uri is None else str(uri))
        except ValidationError as e:
            from integral_superposition.overrides import describe_errors

            where = f"saes.{name}" if name else ""
            raise ValueError(
                f"config={path!r}: invalid SAE config: {describe_errors(e, prefix=where)}"
            ) from None
    return out


def _storage_options_from_env() -> dict[str, Any] | None:
    raw = os.environ.get(STORAGE_OPTIONS_ENV)
    if not raw:
        return None
    try:
        opts = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{STORAGE_OPTIONS_ENV}: not a JSON object ({e})") from None
    if not isinstance(opts, dict):
        raise ValueError(
            f"{STORAGE_OPTIONS_ENV}: expected a JSON object, got {type(opts).__name__}"
        )
    return opts


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m integral_superposition.sae.launch",
        description="Train SAEs on an activation store; run it under torchrun for several processes.",
    )
    p.add_argument(
        "--store",
        action="append",
        required=True,
        help="Activation store URI (repeat to concatenate dumps).",
    )
    p.add_argument(
        "--out",
        default=None,
        help="Output URI: the SAE folder, or the parent of one folder per named SAE.",
    )
    p.add_argument(
        "--config",
        required=True,
        help="YAML: SAEConfig fields, 'saes: {name: ...}' or an experiment config.",
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        help="Checkpoint directory URI (resumed when it holds a checkpoint of this run).",
    )
    p.add_argument(
        "--distribute-modules",
        action="store_true",
        help="Each rank trains its own subset of the SAEs instead of a slice of every batch.",
    )
    p.add_argument(
        "--device",
        default=None,
        help="auto (default: cuda:LOCAL_RANK when there is a GPU), cpu, cuda or cuda:N.",
    )
    p.add_argument(
        "--no-resume",
        action="store_true",
        help="Start over even when the checkpoint directory holds a checkpoint.",
    )
    p.add_argument(
        "--no-evaluate", action="store_true", help="Skip the held-out evaluation when publishing."
    )
    p.add_argument("--results", default=None, help="Write the results (JSON) here (rank 0).")
    p.add_argument("--metadata", default=None, help="JSON object added to every SAE's metadata.")
    return p


PROGRESS_PREFIX = "isup-progress"
"""Rank 0 prints ``isup-progress STEP TOTAL`` lines (at most one a second, and the last step);
:func:`launch_train_saes` turns them back into ``on_progress(step, total)`` calls."""


def _print_progress() -> Callable[[int, int], None]:
    last = [0.0]

    def on_progress(step: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 1.0 or step >= total:
            last[0] = now
            print(f"{PROGRESS_PREFIX} {step} {total}", flush=True)

    return on_progress


RESULT_KEYS = frozenset({"name", "uri", "content_hash", "steps", "metrics"})
"""Keys of every row of a results file this launcher writes."""


def check_results_target(uri: str, storage_options: dict[str, Any] | None = None) -> None:
    """Refuse a ``--results`` path that holds something other than an earlier results file of
    this launcher (a JSON list of result rows), before any training: a user's file of the same
    name is never replaced."""
    if not storage.exists(uri, storage_options):
        return
    try:
        rows = json.loads(storage.read_bytes(uri, storage_options))
    except (ValueError, OSError):
        rows = None
    if not (
        isinstance(rows, list)
        and rows
        and all(isinstance(r, dict) and r.keys() >= RESULT_KEYS for r in rows)
    ):
        raise FileExistsError(
            f"--results {uri}: something that is not an earlier results file of this launcher "
            "is there; expected a new path (it is never replaced)"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, train, publish (rank 0) and write ``--results``; returns the exit code."""
    from integral_superposition.sae.train import train_saes

    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    opts = _storage_options_from_env()
    if args.results:
        check_results_target(args.results, opts)
    cfgs = read_sae_configs(args.config, opts)
    names = list(cfgs)
    out_uris = []
    for n, (_, own) in cfgs.items():
        if own is None and not args.out:
            raise SystemExit(f"--out: required (the SAE {n or 'config'!r} has no 'out' of its own)")
        out_uris.append(own or (storage.join(args.out, n) if n else args.out))
    metadata = json.loads(args.metadata) if args.metadata else None
    from integral_superposition.dump.store import ActivationStore

    stores = ActivationStore(args.store if len(args.store) > 1 else args.store[0], opts)
    info = distributed.init(args.device)
    try:
        results = train_saes(
            stores,
            [c for c, _ in cfgs.values()],
            out_uris,
            checkpoint_uri=args.checkpoint,
            storage_options=opts,
            resume=not args.no_resume,
            device=info.device,
            progress=sys.stderr.isatty() and info.is_main,
            on_progress=_print_progress() if info.is_main else None,
            metadata=metadata,
            evaluate=not args.no_evaluate,
            distribute_modules=args.distribute_modules,
        )
        if args.results and info.is_main:
            rows = [
                {
                    **asdict(r),
                    "name": n,
                    "config": r.config.model_dump(mode="json") if r.config else None,
                }
                for n, r in zip(names, results, strict=True)
            ]
            storage.write_json(args.results, rows, opts)
        for n, r in zip(names, results, strict=True):
            if info.is_main:
                log.info("SAE %s: %s (%d steps)", n or "sae", r.uri, r.steps)
    finally:
        distributed.destroy()
    return 0


def launch_train_saes(
    stores: str | Sequence[str],
    cfgs: Sequence[SAEConfig],
    out_uris: Sequence[str],
    *,
    nproc: int,
    checkpoint_uri: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    distribute_modules: bool = False,
    device: str | None = None,
    evaluate: bool = True,
    metadata: Mapping[str, Any] | None = None,
    max_restarts: int = 0,
    on_progress: Callable[[int, int], None] | None = None,
    on_line: Callable[[str], None] | None = None,
    env: Mapping[str, str] | None = None,
) -> list[Any]:
    """Train ``cfgs`` on ``nproc`` processes (one per GPU on a GPU machine) under torchrun and
    return their :class:`~integral_superposition.sae.train.TrainResult` list.

    The arguments mean what they mean for :func:`~integral_superposition.sae.train.train_saes`.
    Storage options reach the workers through the environment, not the command line.
    ``max_restarts``: torchrun restarts all workers after a failure this many times (each
    restart resumes from the last checkpoint; give ``checkpoint_uri``). ``on_progress(step,
    total)`` follows rank 0's steps (about once a second); ``on_line`` receives the workers'
    other output lines (default: this process's stderr); ``env`` adds environment variables.
    """
    from integral_superposition.sae.train import TrainResult

    uris = [stores] if isinstance(stores, str) else [str(s) for s in stores]
    if isinstance(out_uris, str):
        out_uris = [out_uris]
    if len(out_uris) != len(cfgs):
        raise ValueError(
            f"out_uris has {len(out_uris)} entries for {len(cfgs)} configs: expected one URI per config"
        )
    if len(set(out_uris)) != len(out_uris):
        raise ValueError(f"out_uris={list(out_uris)!r}: every SAE needs its own output URI")
    for i, c in enumerate(cfgs):
        if not isinstance(c, SAEConfig):
            raise TypeError(f"cfgs[{i}]: expected an SAEConfig, got {type(c).__name__}")
    with tempfile.TemporaryDirectory(prefix="isup-launch-") as tmp:
        cfg_path = os.path.join(tmp, "saes.yaml")
        saes = {
            f"sae{i:02d}": {**c.model_dump(mode="json"), "out": str(u)}
            for i, (c, u) in enumerate(zip(cfgs, out_uris, strict=True))
        }
        with open(cfg_path, "w") as f:
            yaml.safe_dump({"saes": saes}, f, sort_keys=False)
        results_path = os.path.join(tmp, "results.json")
        args = ["--config", cfg_path, "--results", results_path]
        args += [a for u in uris for a in ("--store", u)]
        if checkpoint_uri:
            args += ["--checkpoint", str(checkpoint_uri)]
        if distribute_modules:
            args.append("--distribute-modules")
        if device:
            args += ["--device", str(device)]
        if not evaluate:
            args.append("--no-evaluate")
        if metadata:
            args += ["--metadata", json.dumps(dict(metadata))]
        extra = dict(env or {})
        if storage_options:
            extra[STORAGE_OPTIONS_ENV] = json.dumps(dict(storage_options))
        pattern = re.compile(rf"{PROGRESS_PREFIX} (\d+) (\d+)")

        def route(line: str) -> None:
            m = pattern.search(line)
            if m is None:
                if on_line is not None:
                    on_line(line)
                else:
                    print(line, file=sys.stderr, flush=True)
            elif on_progress is not None:
                on_progress(int(m.group(1)), int(m.group(2)))

        distributed.run_torchrun(
            nproc, __name__, args, env=extra, on_line=route, max_restarts=max_restarts
        )
        with open(results_path) as f:
            rows = json.load(f)
    results = []
    for row in rows:
        row.pop("name", None)
        cfg = row.pop("config", None)
        results.append(TrainResult(**row, config=SAEConfig.model_validate(cfg) if cfg else None))
    return results


if __name__ == "__main__":
    raise SystemExit(main())
