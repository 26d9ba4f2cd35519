"""``isup``: the project's one command line.

``isup run`` runs the whole experiment (the embedded defaults, a preset, or a YAML config);
``dump``, ``train``, ``analyze``, ``merge``, ``steer-eval`` and ``report`` run one step as
its own Prefect flow; ``steer`` prints steered and unsteered generations side by side;
``ls`` lists runs and their outputs; ``server`` starts the Prefect server and UI;
``schema`` prints the config's JSON schema.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from typing import Annotated, Any

import typer
from integral_superposition.flows.sae_steps import STEPS, Step

app = typer.Typer(
    name="isup",
    help="Integral Superposition: dump activations, train SAEs, analyse, merge and steer "
    "their latents - as Prefect flows, locally or on GPU work pools.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOpt = Annotated[
    str | None, typer.Option("--config", "-c", help="Experiment config (YAML file or URI).")
]
PresetOpt = Annotated[
    str | None,
    typer.Option(
        "--preset",
        "-p",
        help="A shipped preset: default, smoke (under a minute) or thorough (full-size evaluations).",
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config field: KEY.PATH=VALUE (repeatable)."),
]
StorageOpt = Annotated[
    str | None, typer.Option("--storage", help="Output root: a directory or s3://bucket/prefix.")
]
NameOpt = Annotated[str | None, typer.Option("--name", help="Experiment name.")]
RunOpt = Annotated[
    str | None, typer.Option("--run", help="Run name (default: a new timestamped id).")
]


def _console():
    from rich.console import Console

    # piped output (CI logs, tests) gets wide lines instead of wrapped tables
    return Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def _table(**kwargs):
    """A rich table: boxed on a terminal, plain columns when piped (logs, grep)."""
    from rich import box
    from rich.table import Table

    return Table(box=box.HEAVY_HEAD if sys.stdout.isatty() else box.SIMPLE, **kwargs)


def _fail(msg: str, code: int = 2) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def _load_cfg(
    config: str | None,
    preset: str | None,
    overrides: list[str] | None,
    storage: str | None = None,
    name: str | None = None,
    run: str | None = None,
    new_run: bool = True,
):
    from integral_superposition.experiment import ConfigError, make_run_id
    from integral_superposition.flows.config import resolve_config

    extra = list(overrides or [])
    if storage:
        extra.append(f"storage={storage}")
    if name:
        extra.append(f"name={name}")
    if run:
        extra.append(f"run={run}")
    try:
        cfg = resolve_config(config, preset, extra)
    except ConfigError as e:
        _fail(str(e))
    if new_run and cfg.run is None:
        cfg = cfg.model_copy(update={"run": make_run_id()})
    return cfg


def _secure(cfg):
    """``cfg`` with credentials given inline moved into a per-run Prefect Secret block (only
    its name reaches Prefect); exits with the reason when that cannot be done."""
    from integral_superposition.tasks.blocks import secure_config

    try:
        return secure_config(cfg)
    except ValueError as e:
        _fail(str(e))


SecretOpt = Annotated[
    str | None,
    typer.Option(
        "--storage-secret",
        help="Prefect Secret block holding storage options (credentials) as a JSON object.",
    ),
]
StorageOptionOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--storage-option",
        help="An fsspec storage option: KEY.PATH=VALUE, e.g. endpoint_url=http://... "
        "(repeatable; credentials are moved into a Secret block first).",
    ),
]


def _storage_args(options: list[str] | None, secret: str | None) -> dict[str, Any]:
    """The ``storage_options`` / ``storage_secret`` parameters of a step flow, credentials
    given inline moved into a Secret block first."""
    from integral_superposition.experiment import ConfigError, apply_overrides, make_run_id
    from integral_superposition.tasks.blocks import move_credentials, secret_block_name

    try:
        parsed = apply_overrides({}, options or [])
        public, name = move_credentials(parsed, secret, secret_block_name("cli", make_run_id()))
    except (ConfigError, ValueError) as e:
        _fail(str(e).replace("storage_options.", "--storage-option "))
    return {"storage_options": public or None, "storage_secret": name}


_SUPERVISE = False  # set by the console script: flows run in a supervised child process


def _api_url() -> str | None:
    """The Prefect API runs are kept on (None: a temporary server that ends with the command)."""
    from integral_superposition.flows import process

    if process.temporary_server_url():
        return None
    return process.api_url()


@contextlib.contextmanager
def _flow_process(enabled: bool = True) -> Iterator[None]:
    """Around a command's input checks, before it runs a flow. From the console script:
    check the API or start a temporary server while the input is checked, then run the
    command in a supervised child process and exit with its code (nothing after the
    ``with`` block runs here). In that child, or called in-process: check the API, and mark
    Crashed the flow runs of processes that died."""
    from integral_superposition.flows import process

    if not enabled:
        yield
        return
    if _SUPERVISE:
        sup = process.Supervisor()
        try:
            sup.prepare()
        except process.PrefectUnavailable as e:
            _fail(str(e), 1)
        try:
            yield
        except BaseException:
            sup.close()
            raise
        try:
            code = sup.run(sys.argv[1:])
        except process.PrefectUnavailable as e:
            typer.echo(f"error: {e}", err=True)
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # everything is stopped; skip a slow interpreter teardown
    try:
        url = _api_url()
        if url:
            process.check_api(url)
    except process.PrefectUnavailable as e:
        _fail(str(e), 1)
    crashed = process.mark_dead_runs_crashed()
    if crashed:
        typer.echo(f"marked Crashed (their process is gone): {', '.join(crashed)}", err=True)
    yield


def _ui_link(flow_run_id: str | None) -> str | None:
    from prefect.settings import get_current_settings

    ui = get_current_settings().ui_url
    if not ui or not flow_run_id or not _api_url():
        return None
    return f"{ui.rstrip('/')}/runs/flow-run/{flow_run_id}"


def _prefect_hint(flow_run_id: str | None) -> str:
    link = _ui_link(flow_run_id)
    if link:
        return f"Prefect UI: {link}"
    from prefect.settings import get_current_settings

    home = get_current_settings().home
    return (
        "Prefect: no PREFECT_API_URL is set, so this run used a temporary local Prefect server;\n"
        f"  its history is kept in the database under {home}. To open the Prefect UI on it,\n"
        "  start the server in"
        " another terminal with `isup server` (or `prefect server start`) and open\n"
        f"  http://127.0.0.1:4200/runs/flow-run/{flow_run_id or ''}\n"
        "  To watch later runs live: prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api"
    )


def _print_run(result, flow_run_id: str | None, wall_s: float) -> None:
    from integral_superposition.storage import browser_url

    con = _console()
    t = _table(title="Steps")
    for col in ("step", "name", "state", "seconds", "output"):
        t.add_column(col, justify="right" if col == "seconds" else "left")
    for s in result.steps:
        secs = "" if s.seconds is None else f"{s.seconds:.1f}"
        t.add_row(s.step, s.name, s.state, secs, s.output.uri if s.output else "")
    con.print(t)
    n_cached = sum(s.state == "Cached" for s in result.steps)
    con.print(f"{len(result.steps)} task runs, {n_cached} cached; wall time {wall_s:.1f} s")
    con.print(f"run folder: {result.run_root}")
    if result.report_uri:
        con.print(f"report:     {result.report_uri}")
        typer.echo(f"open it:    {browser_url(result.report_uri)}")
    typer.echo(_prefect_hint(flow_run_id))


def _run_flow(flow_obj, **params):
    """Call a flow, returning (result or None, flow run id, final state). A URI parameter
    carrying a credential is refused first: flow-run parameters are stored by Prefect."""
    from integral_superposition import storage

    for name, value in params.items():
        if isinstance(value, str):
            try:
                storage.refuse_uri_credentials(value, name)
            except ValueError as e:
                _fail(str(e))
    state = flow_obj(**params, return_state=True)
    fr_id = str(state.state_details.flow_run_id) if state.state_details.flow_run_id else None
    return state, fr_id


def _finish(state, fr_id: str | None) -> Any:
    if state.is_completed():
        return state.result()
    try:
        state.result()
    except Exception as e:
        typer.echo(f"\nthe run {state.name.lower()}: {type(e).__name__}: {e}", err=True)
    typer.echo(_prefect_hint(fr_id), err=True)
    raise typer.Exit(1)


def _plan_line(cfg) -> str:
    """``isup run: demo:4000 through gemma-3-270m on cpu, float32 (auto: ...): dump -> ...;
    about 6 min on this machine``: what runs, where, in which dtype, and roughly how long."""
    from integral_superposition.compute import resolve_compute
    from integral_superposition.estimate import estimate_run

    steps = ["dump", f"train {len(cfg.sae_jobs())} SAE{'s' if len(cfg.sae_jobs()) > 1 else ''}"]
    names = {"analyze": "analyse", "merge": "merge", "steer_eval": "steer", "report": "report"}
    steps += [shown for key, shown in names.items() if getattr(cfg.steps, key)]
    try:
        choice = resolve_compute(cfg.model.dtype, cfg.model.device, arg="model.dtype")
    except ValueError as e:
        _fail(str(e))
    where = choice.describe()
    try:
        when = estimate_run(cfg, choice).line()
    except Exception as e:  # an estimate must never stop a run
        when = f"no time estimate ({type(e).__name__}: {e})"
    return (
        f"isup run: {cfg.data.source} through {cfg.model.model_id} on {where}: "
        f"{' -> '.join(steps)}; {when}"
    )


@app.command()
def run(
    config: ConfigOpt = None,
    preset: PresetOpt = None,
    overrides: SetOpt = None,
    storage: StorageOpt = None,
    name: NameOpt = None,
    run_name: RunOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the resolved config and exit.")
    ] = False,
    new_run: Annotated[
        bool,
        typer.Option(
            "--new-run", help="Start a new run even if an unfinished run of this config exists."
        ),
    ] = False,
) -> None:
    """Run the whole experiment: dump -> train -> analyse -> merge -> steering -> report.

    Without --config or --preset it runs the embedded defaults (the demo corpus through
    gemma-3-270m). Finished steps of earlier runs of the same experiment are reused. Without
    --run, an unfinished run of the same config whose process is gone (killed, crashed) is
    continued: the dump from its completed shards, training from its last checkpoint.
    """
    import time

    from integral_superposition.experiment import make_run_id

    with _flow_process(enabled=not dry_run):
        cfg = _load_cfg(config, preset, overrides, storage, name, run_name, new_run=False)
    con = _console()
    if dry_run:
        con.print(cfg.model_copy(update={"run": cfg.run or make_run_id()}).to_yaml())
        return
    if cfg.run is None:
        from integral_superposition.flows.experiment import resolve_storage_options
        from integral_superposition.runs import find_unfinished_run

        resumed = None if new_run else find_unfinished_run(cfg, resolve_storage_options(cfg))
        cfg = cfg.model_copy(update={"run": resumed or make_run_id()})
        if resumed:
            typer.echo(
                f"resuming the unfinished run {resumed} of {cfg.name} (same config, its process "
                "is gone); --new-run starts a new one"
            )
    jobs = cfg.sae_jobs()
    # plain echo: the plan line must not be wrapped or styled
    typer.echo(_plan_line(cfg))
    con.print(
        f"[bold]experiment[/bold] {cfg.name}  [bold]run[/bold] {cfg.run}  -> {cfg.run_root()}\n"
        f"data {cfg.data.source} | model {cfg.model.model_id} | "
        f"hook points {cfg.dump.resolved_hook_points()} | SAEs {[j.name for j in jobs]}\n"
        f"Prefect API: {_api_url() or 'temporary local server (no PREFECT_API_URL)'}"
    )
    from integral_superposition.flows.experiment import experiment_flow

    cfg = _secure(cfg)
    t0 = time.perf_counter()
    state, fr_id = _run_flow(experiment_flow, cfg=cfg, show_progress=sys.stderr.isatty())
    result = _finish(state, fr_id)
    _print_run(result, fr_id, time.perf_counter() - t0)


@app.command()
def dump(
    config: ConfigOpt = None,
    preset: PresetOpt = None,
    overrides: SetOpt = None,
    storage: StorageOpt = None,
    name: NameOpt = None,
    run_name: RunOpt = None,
    data: Annotated[
        str | None, typer.Option(help="Dataset source (demo:N, a file or URI, hf:..., kaggle:...).")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Model id, directory, .gguf file, gemma-3-270m or tiny:<family>."),
    ] = None,
    layer: Annotated[
        int | None, typer.Option(help="Layer whose input residual stream is dumped.")
    ] = None,
) -> None:
    """Dump activations of the config's dataset through its model (cached)."""
    extra = list(overrides or [])
    extra += [f"data.source={data}"] if data else []
    extra += [f"model.model_id={model}"] if model else []
    extra += [f"dump.layer={layer}"] if layer is not None else []
    with _flow_process():
        cfg = _load_cfg(config, preset, extra, storage, name, run_name)
    cfg = _secure(cfg)
    from integral_superposition.flows.steps import dump_flow

    state, fr_id = _run_flow(dump_flow, cfg=cfg, show_progress=sys.stderr.isatty())
    ref = _finish(state, fr_id)
    # plain echo: rich would wrap (or mark up) long paths and JSON
    typer.echo(f"activation store: {ref.uri}\n{json.dumps(ref.summary, default=str)}")


@app.command()
def train(
    config: ConfigOpt = None,
    preset: PresetOpt = None,
    overrides: SetOpt = None,
    storage: StorageOpt = None,
    name: NameOpt = None,
    run_name: RunOpt = None,
    store: Annotated[
        str | None,
        typer.Option(help="Train on this activation store (default: dump per the config first)."),
    ] = None,
    nproc: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Processes per training (one per GPU) under torchrun, data-parallel "
            "(sets fanout.gpus_per_run).",
        ),
    ] = None,
    distribute_modules: Annotated[
        bool,
        typer.Option(
            "--distribute-modules",
            help="With --nproc: each process trains its own SAEs instead of a slice of every batch.",
        ),
    ] = False,
) -> None:
    """Train the config's SAEs (the base SAE and its sweep) in one pass over the store."""
    overrides = list(overrides or [])
    overrides += [f"fanout.gpus_per_run={nproc}"] if nproc is not None else []
    overrides += ["fanout.distribute_modules=true"] if distribute_modules else []
    with _flow_process():
        cfg = _load_cfg(config, preset, overrides, storage, name, run_name)
    cfg = _secure(cfg)
    from integral_superposition.flows.steps import train_flow

    state, fr_id = _run_flow(
        train_flow, cfg=cfg, store_uri=store, show_progress=sys.stderr.isatty()
    )
    refs = _finish(state, fr_id)
    for r in refs:
        typer.echo(f"{r.name}: {r.uri}\n  {json.dumps(r.summary.get('metrics', {}), default=str)}")


def _params(model_cls, overrides: list[str] | None):
    from integral_superposition.experiment import ConfigError, params_from_overrides

    try:
        return params_from_overrides(model_cls, overrides or [])
    except ConfigError as e:
        _fail(str(e))


SaeOpt = Annotated[
    str, typer.Option("--sae", help="SAE folder (ours, SAELens or sparsify; local or URI).")
]
StoreOpt = Annotated[
    str | None,
    typer.Option("--store", help="Activation store (default: the one recorded by the SAE's run)."),
]
ModelOpt = Annotated[
    str | None, typer.Option("--model", help="Model id for logit lens / CE metrics / generation.")
]
RootOpt = Annotated[
    str | None,
    typer.Option("--run-root", help="Run folder for the output (default: the SAE's run)."),
]
OtherStoreOpt = Annotated[
    bool,
    typer.Option(
        "--other-store",
        help="Use --store even though the SAE was trained on other activations (e.g. held-out data).",
    ),
]
ParamOpt = Annotated[
    list[str] | None, typer.Option("--param", help="A parameter: NAME=VALUE (repeatable).")
]


RunRootArg = Annotated[
    str, typer.Argument(help="The run folder {storage}/{experiment}/{run}.", show_default=False)
]


def _print_output(step: Step, ref: Any) -> None:
    # plain echo: rich would wrap (or mark up) long paths and JSON
    typer.echo(f"{step.output}: {step.where(ref)}")
    if step.print_summary:
        typer.echo(json.dumps(ref.summary, default=str))


def _sae_step_command(step: Step) -> Any:
    """``isup <step.name>``: run the step's flow on one SAE."""

    def command(
        sae: SaeOpt,
        store: StoreOpt = None,
        model: ModelOpt = None,
        run_root: RootOpt = None,
        param: ParamOpt = None,
        storage_option: StorageOptionOpt = None,
        storage_secret: SecretOpt = None,
        other_store: OtherStoreOpt = False,
    ) -> None:
        from integral_superposition.flows.steps import STEP_FLOWS

        with _flow_process():
            params = _params(step.load_params(), param)
        state, fr_id = _run_flow(
            STEP_FLOWS[step.name], sae_uri=sae, store_uri=store, params=params,
            model_id=model, run_root=run_root, **_storage_args(storage_option, storage_secret),
            allow_other_store=other_store,
        )  # fmt: skip
        _print_output(step, _finish(state, fr_id))

    return command


def _run_step_command(step: Step) -> Any:
    """``isup <step.name> RUN_ROOT``: run the step's flow on a finished run."""

    def command(
        run_root: RunRootArg,
        param: ParamOpt = None,
        storage_option: StorageOptionOpt = None,
        storage_secret: SecretOpt = None,
    ) -> None:
        from integral_superposition.flows.steps import STEP_FLOWS

        with _flow_process():
            options = _params(step.load_params(), param)
        state, fr_id = _run_flow(
            STEP_FLOWS[step.name], run_root=run_root, options=options,
            **_storage_args(storage_option, storage_secret),
        )  # fmt: skip
        _print_output(step, _finish(state, fr_id))

    return command


def _step_command(step: Step) -> None:
    """Register ``isup <step.name>`` from a row of the step table."""
    command = (_sae_step_command if step.scope == "sae" else _run_step_command)(step)
    command.__name__ = step.flow_name.removesuffix("_flow")
    command.__doc__ = step.help.replace("``", "")
    app.command(step.name)(command)


for _step in STEPS:
    _step_command(_step)


@app.command()
def steer(
    sae: SaeOpt,
    prompt: Annotated[list[str], typer.Option("--prompt", help="A prompt (repeatable).")],
    latent: Annotated[int | None, typer.Option(help="The latent to edit.")] = None,
    set_to: Annotated[
        float | None, typer.Option("--set-to", help="Clamp the latent to this value.")
    ] = None,
    scale: Annotated[float | None, typer.Option(help="Multiply the latent by this factor.")] = None,
    edit: Annotated[
        list[str] | None,
        typer.Option(
            help="More edits: '42=100', '42=2xmax', '42*3', '42+8', '42:ablate' (repeatable)."
        ),
    ] = None,
    model: ModelOpt = None,
    hook_point: Annotated[
        str | None, typer.Option(help="Where to steer (default: where the SAE was trained).")
    ] = None,
    positions: Annotated[str, typer.Option(help="last_prompt, prompt, generated or all.")] = "all",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 30,
    sample: Annotated[
        bool, typer.Option("--sample/--greedy", help="Sample instead of greedy decoding.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Sampling seed (both runs use it).")] = 0,
    dtype: Annotated[str, typer.Option(help="Model dtype: fp32, bf16 or fp16.")] = "fp32",
) -> None:
    """Print unsteered and steered generations of the prompts side by side."""
    from integral_superposition import sae as sae_lib
    from integral_superposition import steering
    from integral_superposition.experiment import ModelSpec
    from integral_superposition.runs import sae_model_id
    from integral_superposition.tasks.backends import load_backend
    from rich.table import Table

    edits = []
    try:
        if latent is not None or set_to is not None or scale is not None:
            if latent is None:
                _fail("--set-to/--scale need --latent")
            edits.append(steering.set_or_scale_latent(latent, set_to=set_to, scale=scale))
        edits += [steering.parse_edit(e) for e in edit or []]
        if not edits:
            _fail("nothing to steer: give --latent with --set-to or --scale, or --edit")
        model_id = model or sae_model_id(sae)
        backend, _ = load_backend(ModelSpec(model_id=model_id, dtype=dtype))
        loaded = sae_lib.load_sae(sae)
        rows = steering.compare_generations(
            backend, loaded, hook_point, edits, prompt, max_new_tokens, positions,
            do_sample=sample, seed=seed,
        )  # fmt: skip
    except (ValueError, TypeError, FileNotFoundError) as e:
        _fail(str(e))
    where = steering.resolve_sae_hook_point(backend, loaded, hook_point).name
    t = Table(title=f"{', '.join(map(str, edits))} at {where} of {model_id}", show_lines=True)
    t.add_column("prompt")
    t.add_column("unsteered")
    t.add_column("steered")
    for p, base, steered in rows:
        t.add_row(p, base, steered)
    _console().print(t)


@app.command("ls")
def ls_runs(
    storage_root: Annotated[
        str, typer.Argument(help="Storage root (a directory or s3://bucket/prefix).")
    ] = "runs",
    experiment: Annotated[
        str | None, typer.Option("--experiment", "-e", help="Only this experiment.")
    ] = None,
    outputs: Annotated[
        bool, typer.Option("--outputs", "-o", help="List every run's outputs.")
    ] = False,
) -> None:
    """List runs (newest last) and, with --outputs, what each produced or reused."""
    from integral_superposition.runs import absolute_storage, list_runs

    storage_root = absolute_storage(storage_root)  # runs record absolute local paths
    runs = list_runs(storage_root, experiment)
    con = _console()
    if not runs:
        con.print(f"no runs under {storage_root!r}")
        return
    t = _table()
    for col in ("experiment", "run", "finished", "tasks", "cached", "report"):
        t.add_column(col)
    for r in runs:
        steps = r.get("steps", [])
        t.add_row(
            r.get("experiment", ""), r.get("run", ""), r.get("finished") or f"({r.get('state', 'unfinished')})",
            str(len(steps)), str(sum(s.get("state") == "Cached" for s in steps)), r.get("report_uri") or "",
        )  # fmt: skip
    con.print(t)
    if outputs:
        for r in runs:
            con.print(f"\n[bold]{r.get('experiment')}/{r.get('run')}[/bold]  {r['run_root']}")
            for s in r.get("steps", []):
                out = s.get("output") or {}
                where = out.get("uri", "")
                tag = "  (reused)" if where and not where.startswith(r["run_root"]) else ""
                con.print(f"  {s['step']:<10} {s['name']:<28} {s['state']:<10} {where}{tag}")


@app.command()
def server(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the API and UI.")] = 4200,
) -> None:
    """Start the Prefect server and UI (same as `prefect server start`).

    It reads the same database as the temporary server that `isup run` starts when no
    PREFECT_API_URL is set, so earlier runs show up. Point later runs at it with
    `prefect config set PREFECT_API_URL=http://HOST:PORT/api`. The UI talks to this server
    on any port (unless PREFECT_UI_API_URL says otherwise); analytics are off unless
    PREFECT_SERVER_ANALYTICS_ENABLED=true.
    """
    from integral_superposition.flows.process import server_defaults
    from prefect.settings import get_current_settings

    api = f"http://{host}:{port}/api"
    env = {
        **os.environ,
        **server_defaults(),
        "PREFECT_SERVER_API_HOST": host,
        "PREFECT_SERVER_API_PORT": str(port),
    }
    # the UI's API URL defaults to PREFECT_API_URL, or else to port 4200
    if "api_url" not in get_current_settings().server.ui.model_fields_set:
        env["PREFECT_UI_API_URL"] = api
    typer.echo(
        f"Prefect UI: http://{host}:{port}  (API {api})\n"
        f"for live runs: prefect config set PREFECT_API_URL={api}"
    )
    sys.stdout.flush()
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]
    os.execve(sys.executable, cmd, env)


@app.command()
def schema(
    out: Annotated[
        str | None, typer.Option(help="Write the schema to this file instead of printing it.")
    ] = None,
) -> None:
    """Print the JSON schema of the experiment config (also shipped as schemas/experiment.schema.json)."""
    from integral_superposition.flows.config import json_schema, write_schema

    if out:
        try:
            typer.echo(str(write_schema(out)))
        except FileExistsError as e:
            _fail(str(e))
    else:
        typer.echo(json.dumps(json_schema(), indent=2))


def main() -> None:
    """Console-script entry point."""
    from integral_superposition.flows import process

    global _SUPERVISE
    _SUPERVISE = not process.supervised()
    app()


if __name__ == "__main__":
    main()
